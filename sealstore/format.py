"""The sealed-file format v1: constants, the header, key derivation, the preamble codec.

Layout (docs/FORMAT.md is normative)::

    magic   8 bytes  b"\\x89SEAL\\r\\n\\x1a"
    hlen    u32 LE   header length
    header  hlen     canonical UTF-8 JSON object (authenticated: AAD of every chunk)
    slen    u32 LE   key-slot section length (0 = slots held elsewhere)
    slots   slen     UTF-8 JSON list of key slots (not authenticated: rotation rewrites it)
    chunks           ciphertext || 16-byte tag, chunk_size plaintext bytes each, the last shorter

This module parses and builds the preamble and derives keys; it never touches
chunk payloads (``stream.py`` does) and never calls a key provider.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealstore.errors import AuthenticationError, FormatError, UnsupportedVersion
from sealstore.keys import DataKey, KeySlot

__all__ = [
    "CHUNK_MAX",
    "CHUNK_MIN",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_SUITE",
    "MAGIC",
    "SUITES",
    "TAG_SIZE",
    "Header",
    "Preamble",
    "build_preamble",
    "canonical_json",
    "derive_keys",
    "parse_preamble",
    "read_preamble",
    "read_preamble_from",
]

MAGIC = b"\x89SEAL\r\n\x1a"
VERSION = 1
SUITES = ("AES-256-GCM", "CHACHA20-POLY1305")
DEFAULT_SUITE = "AES-256-GCM"
CHUNK_MIN = 64 * 1024
CHUNK_MAX = 64 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
TAG_SIZE = 16
SALT_SIZE = 32
NONCE_PREFIX_SIZE = 7
COMMITMENT_SIZE = 32
# Bounds a reader enforces before allocating: a header is a few hundred bytes,
# a slot section a few KiB even with many recipients.
MAX_HEADER_SIZE = 64 * 1024
MAX_SLOTS_SIZE = 1024 * 1024
MAX_SLOTS = 256
_U32 = struct.Struct("<I")
_HEADER_FIELDS = frozenset(
    {"v", "suite", "chunk_size", "salt", "nonce_prefix", "commitment", "context", "plaintext_size"}
)
_REQUIRED_FIELDS = _HEADER_FIELDS - {"plaintext_size"}


def canonical_json(obj: Any) -> bytes:
    """Encode *obj* the way v1 writers must: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, name: str, size: int) -> bytes:
    if not isinstance(value, str):
        raise FormatError(f"header field {name!r} must be a base64 string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise FormatError(f"header field {name!r} is not valid base64") from exc
    if len(raw) != size:
        raise FormatError(f"header field {name!r} must hold {size} bytes, not {len(raw)}")
    return raw


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A ``json.loads`` ``object_pairs_hook`` that refuses a key given twice (FormatError)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _loads(data: bytes, what: str) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what} is not valid UTF-8") from exc
    try:
        obj = json.loads(text, object_pairs_hook=reject_duplicate_keys, parse_constant=_no_constant)
    except FormatError:
        raise
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON") from exc
    try:
        # JSON can spell a lone surrogate (\ud800) that UTF-8 cannot carry; slots
        # and contexts are bound as UTF-8, so such a string is refused anywhere.
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{what} holds a lone surrogate") from None
    return obj


def _no_constant(name: str) -> Any:
    raise FormatError(f"JSON constant {name} is not allowed")


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class Header:
    """The authenticated header of a sealed file.

    Build one with :meth:`Header.new`; a reader gets one from :func:`parse_preamble`.
    """

    suite: str
    chunk_size: int
    salt: bytes
    nonce_prefix: bytes
    commitment: bytes
    context: Mapping[str, str] = field(default_factory=dict)
    plaintext_size: int | None = None
    v: int = VERSION

    @classmethod
    def new(
        cls,
        dek: DataKey,
        *,
        suite: str = DEFAULT_SUITE,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        context: Mapping[str, str] | None = None,
        plaintext_size: int | None = None,
    ) -> tuple[Header, bytes]:
        """Make a header with fresh salt and nonce prefix for *dek*.

        Returns:
            ``(header, payload_key)``: the payload key is what chunks are sealed with.

        Raises:
            ValueError: an unknown suite, a bad chunk size or context.
        """
        check_params(suite, chunk_size)
        context = dict(context or {})
        _check_context(context, ValueError)
        if plaintext_size is not None and not _is_uint(plaintext_size):
            raise ValueError("plaintext_size must be a non-negative int")
        salt = os.urandom(SALT_SIZE)
        payload_key, commitment = derive_keys(dek, salt, suite)
        header = cls(
            suite=suite,
            chunk_size=chunk_size,
            salt=salt,
            nonce_prefix=os.urandom(NONCE_PREFIX_SIZE),
            commitment=commitment,
            context=context,
            plaintext_size=plaintext_size,
        )
        return header, payload_key

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "v": self.v,
            "suite": self.suite,
            "chunk_size": self.chunk_size,
            "salt": _b64(self.salt),
            "nonce_prefix": _b64(self.nonce_prefix),
            "commitment": _b64(self.commitment),
            "context": dict(self.context),
        }
        if self.plaintext_size is not None:
            obj["plaintext_size"] = self.plaintext_size
        return obj

    def encode(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def decode(cls, data: bytes) -> Header:
        """Parse header bytes; raise ``FormatError`` / ``UnsupportedVersion`` if malformed."""
        obj = _loads(data, "header")
        if not isinstance(obj, dict):
            raise FormatError("header must be a JSON object")
        version = obj.get("v")
        if not isinstance(version, int) or isinstance(version, bool):
            raise FormatError("header field 'v' must be an integer")
        if version != VERSION:
            raise UnsupportedVersion(
                f"sealed-file version {version} is not supported (this reads v1)"
            )
        unknown = set(obj) - _HEADER_FIELDS
        if unknown:
            raise FormatError(f"unknown header field(s): {', '.join(sorted(unknown))}")
        missing = _REQUIRED_FIELDS - set(obj)
        if missing:
            raise FormatError(f"missing header field(s): {', '.join(sorted(missing))}")
        suite = obj["suite"]
        if not isinstance(suite, str):
            raise FormatError("header field 'suite' must be a string")
        if suite not in SUITES:
            raise UnsupportedVersion(f"cipher suite {suite!r} is not supported")
        chunk_size = obj["chunk_size"]
        if not _is_uint(chunk_size) or not _valid_chunk_size(chunk_size):
            raise FormatError(
                "header field 'chunk_size' must be a power of two from 64 KiB to 64 MiB"
            )
        context = obj["context"]
        if not isinstance(context, dict):
            raise FormatError("header field 'context' must be an object")
        _check_context(context, FormatError)
        size = obj.get("plaintext_size")
        if size is not None and not _is_uint(size):
            raise FormatError("header field 'plaintext_size' must be a non-negative integer")
        return cls(
            suite=suite,
            chunk_size=chunk_size,
            salt=_unb64(obj["salt"], "salt", SALT_SIZE),
            nonce_prefix=_unb64(obj["nonce_prefix"], "nonce_prefix", NONCE_PREFIX_SIZE),
            commitment=_unb64(obj["commitment"], "commitment", COMMITMENT_SIZE),
            context=context,
            plaintext_size=size,
        )


def _valid_chunk_size(n: int) -> bool:
    return CHUNK_MIN <= n <= CHUNK_MAX and n & (n - 1) == 0


def check_params(suite: str, chunk_size: int) -> None:
    """Raise ``ValueError`` unless *suite* and *chunk_size* are valid for v1 writers."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    if not _is_uint(chunk_size) or not _valid_chunk_size(chunk_size):
        raise ValueError("chunk_size must be a power of two from 64 KiB to 64 MiB")


def _check_context(context: Mapping[Any, Any], error: type[Exception]) -> None:
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise error("encryption context keys and values must be strings")
        try:
            key.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            # JSON can spell a lone surrogate (\ud800); UTF-8 cannot carry it, and
            # slots bind the context as UTF-8.
            raise error("encryption context holds a lone surrogate") from None


def derive_keys(dek: DataKey, salt: bytes, suite: str) -> tuple[bytes, bytes]:
    """HKDF-SHA256(DEK, salt, "sealstore/v1/" + suite) -> (payload key, commitment)."""
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=salt,
        info=b"sealstore/v1/" + suite.encode("ascii"),
    ).derive(dek.material())
    return okm[:32], okm[32:]


def open_payload_key(header: Header, dek: DataKey) -> bytes:
    """Derive the payload key, checking the key commitment first (constant time).

    Raises:
        AuthenticationError: *dek* is not the key this header was sealed under.
    """
    payload_key, commitment = derive_keys(dek, header.salt, header.suite)
    if not hmac.compare_digest(commitment, header.commitment):
        raise AuthenticationError(
            "key does not match the header's key commitment (wrong key or tampered header)"
        )
    return payload_key


@dataclass(frozen=True)
class Preamble:
    """Everything before the first chunk."""

    header: Header
    header_bytes: bytes
    slots: tuple[KeySlot, ...]
    slots_size: int  # slen as stored: 0 means the slots are detached

    @property
    def aad(self) -> bytes:
        """SHA-256(magic || hlen || header): the associated data of every chunk."""
        return header_aad(self.header_bytes)

    @property
    def payload_offset(self) -> int:
        return len(MAGIC) + 4 + len(self.header_bytes) + 4 + self.slots_size

    def with_slots(self, slots: list[KeySlot] | tuple[KeySlot, ...]) -> bytes:
        """This preamble's bytes with another slot section (for key rotation).

        The header bytes are kept exactly as stored -- not re-encoded -- since
        every chunk's AAD is their hash.
        """
        return _assemble(self.header_bytes, encode_slots(tuple(slots)))


def header_aad(header_bytes: bytes) -> bytes:
    return hashlib.sha256(MAGIC + _U32.pack(len(header_bytes)) + header_bytes).digest()


def encode_slots(slots: tuple[KeySlot, ...] | list[KeySlot]) -> bytes:
    if not slots:
        return b""
    return canonical_json([slot.to_json() for slot in slots])


def build_preamble(header: Header, slots: Sequence[KeySlot] = ()) -> bytes:
    """The bytes before the first chunk. With no slots, slen is 0 (slots held elsewhere)."""
    return _assemble(header.encode(), encode_slots(tuple(slots)))


def _assemble(hbytes: bytes, sbytes: bytes) -> bytes:
    return MAGIC + _U32.pack(len(hbytes)) + hbytes + _U32.pack(len(sbytes)) + sbytes


def decode_slots(data: bytes) -> tuple[KeySlot, ...]:
    obj = _loads(data, "key-slot section")
    if not isinstance(obj, list) or not obj:
        raise FormatError("key-slot section must be a non-empty JSON list")
    if len(obj) > MAX_SLOTS:
        raise FormatError(f"more than {MAX_SLOTS} key slots")
    return tuple(KeySlot.from_json(item) for item in obj)


def parse_preamble(data: bytes) -> Preamble:
    """Parse a preamble from the start of *data* (it may hold more bytes after it).

    Raises:
        FormatError: bad magic, lengths out of bounds, malformed header or slots, or
            *data* ends inside the preamble.
        UnsupportedVersion: a version or suite this release does not read.
    """
    view = memoryview(data)
    if len(view) < len(MAGIC) or bytes(view[: len(MAGIC)]) != MAGIC:
        raise FormatError("not a sealed file (bad magic)")
    pos = len(MAGIC)
    hlen = _read_u32(view, pos, "header length")
    if hlen == 0 or hlen > MAX_HEADER_SIZE:
        raise FormatError(f"header length {hlen} out of bounds")
    pos += 4
    if len(view) < pos + hlen:
        raise FormatError("file ends inside the header")
    header_bytes = bytes(view[pos : pos + hlen])
    header = Header.decode(header_bytes)
    pos += hlen
    slen = _read_u32(view, pos, "key-slot length")
    if slen > MAX_SLOTS_SIZE:
        raise FormatError(f"key-slot section length {slen} out of bounds")
    pos += 4
    if len(view) < pos + slen:
        raise FormatError("file ends inside the key-slot section")
    slots = decode_slots(bytes(view[pos : pos + slen])) if slen else ()
    return Preamble(header, header_bytes, slots, slen)


def _read_u32(view: memoryview, pos: int, what: str) -> int:
    if len(view) < pos + 4:
        raise FormatError(f"file ends inside the {what}")
    return int(_U32.unpack_from(view, pos)[0])


def read_preamble(fp: BinaryIO) -> Preamble:
    """Read and parse the preamble from a binary file positioned at its start.

    Leaves *fp* positioned at the first chunk. Raises as :func:`parse_preamble`.
    """
    got = bytearray()

    def head(n: int) -> bytes:
        while len(got) < n:
            part = fp.read(n - len(got))
            if not part:
                break
            got.extend(part)
        return bytes(got[:n])

    return read_preamble_from(head)


def read_preamble_from(head: Callable[[int], bytes]) -> Preamble:
    """Parse the preamble of a source that *head(n)* reads the first *n* bytes of.

    *head* returns fewer bytes only at the end of the input. It is called with
    growing *n* and never past the preamble, whose length comes from the two
    length fields, bounds-checked before anything is read. Raises as
    :func:`parse_preamble`.
    """
    fixed = len(MAGIC) + 4
    start = head(fixed)
    if len(start) >= len(MAGIC) and start[: len(MAGIC)] != MAGIC:
        raise FormatError("not a sealed file (bad magic)")
    if len(start) < fixed:
        raise FormatError("file ends inside the preamble")
    (hlen,) = _U32.unpack_from(start, len(MAGIC))
    if hlen == 0 or hlen > MAX_HEADER_SIZE:
        raise FormatError(f"header length {hlen} out of bounds")
    upto_slen = head(fixed + hlen + 4)
    if len(upto_slen) < fixed + hlen + 4:
        raise FormatError("file ends inside the header")
    (slen,) = _U32.unpack_from(upto_slen, fixed + hlen)
    if slen > MAX_SLOTS_SIZE:
        raise FormatError(f"key-slot section length {slen} out of bounds")
    return parse_preamble(head(fixed + hlen + 4 + slen))
