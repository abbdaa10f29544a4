"""``x25519:RECIPIENT`` -- data keys sealed to an X25519 public key (libsodium sealed box).

For escrow and recovery: wrapping needs only the public recipient, unwrapping
needs the identity file, which can stay offline. The sealed box has no
associated data, so the slot seals ``DEK || SHA-256(label || context)`` and
unwrapping checks the hash: a slot only opens under the context it was made for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nacl.bindings import crypto_scalarmult
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from sealstore.errors import AuthenticationError, FormatError, KeyUnavailable
from sealstore.format import canonical_json
from sealstore.fsutil import atomic_file, is_stream_target
from sealstore.keys import DEK_SIZE, DataKey, KeySlot, Refusal

__all__ = ["X25519Identity", "X25519Recipient", "generate_identity"]

_PREFIX = "x25519:"
_SECRET_TAG = "SEALSTORE-X25519-IDENTITY:"  # noqa: S105 -- a line prefix, not a secret
_LABEL = b"sealstore/v1/slot/x25519\x00"


def _enc(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _dec(text: str, what: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]{43}", text):
        raise ValueError(f"{what} must be 43 base64url characters")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64url") from None
    if len(raw) != 32:
        raise ValueError(f"{what} must encode 32 bytes")
    return raw


def _context_hash(context: Mapping[str, str]) -> bytes:
    return hashlib.sha256(_LABEL + canonical_json(dict(context))).digest()


class X25519Recipient:
    """Wraps data keys to one X25519 public key."""

    def __init__(self, public_key: bytes) -> None:
        try:
            # A low-order point (e.g. all zeros) would make every shared secret
            # predictable; libsodium refuses the scalar multiplication for them.
            crypto_scalarmult(os.urandom(32), public_key)
        except (CryptoError, RuntimeError, TypeError):
            raise ValueError("x25519 recipient is not a valid public key") from None
        self._pk = PublicKey(public_key)
        self.key_id = _PREFIX + _enc(public_key)

    @classmethod
    def from_uri(cls, uri: str) -> X25519Recipient:
        """Parse ``x25519:<base64url public key>``.

        Raises:
            ValueError: not a valid recipient.
        """
        if not uri.startswith(_PREFIX):
            raise ValueError(f"not an x25519 recipient: {uri!r}")
        return cls(_dec(uri[len(_PREFIX) :], "x25519 recipient"))

    @classmethod
    def unwrapper_for_slot(cls, slot: KeySlot) -> Refusal:
        # Only an identity file opens these; say so in the slot's cause.
        return Refusal("needs the identity file of this recipient (pass -i FILE)")

    def wrap(self, dek: DataKey, context: Mapping[str, str]) -> KeySlot:
        blob = SealedBox(self._pk).encrypt(dek.material() + _context_hash(context))
        return KeySlot("x25519", self.key_id, bytes(blob))

    def __repr__(self) -> str:
        return f"X25519Recipient({self.key_id!r})"

    @staticmethod
    def identity_from_text(text: str, *, source: str = "identity") -> X25519Identity:
        return X25519Identity.from_text(text, source=source)


class X25519Identity:
    """The secret half: unwraps slots sealed to its recipient."""

    __slots__ = ("_sk", "recipient", "source")

    def __init__(self, secret_key: bytes, *, source: str = "identity") -> None:
        self._sk = PrivateKey(secret_key)
        self.recipient = _PREFIX + _enc(bytes(self._sk.public_key))
        self.source = source

    @classmethod
    def from_text(cls, text: str, *, source: str = "identity") -> X25519Identity:
        """Parse an identity file's text (comment lines start with '#').

        Raises:
            FormatError: no identity line, or a malformed one.
        """
        for line in text.splitlines():
            line = line.strip()
            if line.startswith(_SECRET_TAG):
                try:
                    return cls(_dec(line[len(_SECRET_TAG) :], "identity"), source=source)
                except ValueError:
                    raise FormatError(f"{source}: malformed x25519 identity") from None
        raise FormatError(f"{source} is not a sealstore identity file")

    def to_text(self) -> str:
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (
            "# sealstore x25519 identity -- keep this file secret and offline\n"
            f"# created: {created}\n# recipient: {self.recipient}\n"
            f"{_SECRET_TAG}{_enc(bytes(self._sk))}\n"
        )

    def can_unwrap(self, slot: KeySlot) -> bool:
        return slot.kind == "x25519" and slot.key_id == self.recipient

    def unwrap(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey:
        """Open a slot sealed to this identity's recipient.

        Raises:
            KeyUnavailable: another recipient's slot.
            AuthenticationError: a slot that names this recipient but does not
                open, or was sealed under another encryption context: the slot
                or the context was changed after sealing.
        """
        if not self.can_unwrap(slot):
            raise KeyUnavailable(f"slot is not sealed to {self.source}")
        try:
            payload = SealedBox(self._sk).decrypt(slot.blob)
        except CryptoError:
            raise AuthenticationError(
                f"slot names {self.source}'s recipient but does not open with it (altered)"
            ) from None
        return dek_from_payload(payload, _context_hash(context))

    def __repr__(self) -> str:
        return f"X25519Identity(recipient={self.recipient!r})"

    def __reduce__(self) -> Any:
        raise TypeError("identities cannot be pickled")


def dek_from_payload(payload: bytes, context_hash: bytes) -> DataKey:
    """The DEK of a recipient slot's opened payload, ``DEK || SHA-256(label || context)``.

    The shared last step of the recipient kinds whose cipher takes no
    associated data (x25519 sealed boxes, age files).

    Raises:
        AuthenticationError: not 64 bytes, or made under another context
            (compared in constant time).
    """
    if len(payload) != DEK_SIZE + 32 or not hmac.compare_digest(payload[DEK_SIZE:], context_hash):
        raise AuthenticationError(
            "slot was sealed under another encryption context "
            "(the context or the slot was changed after sealing)"
        )
    return DataKey(payload[:DEK_SIZE])


def write_identity_file(path: str | os.PathLike[str], text: str, *, overwrite: bool) -> None:
    """Write an identity file's *text* at *path* with mode 0600.

    Raises:
        ValueError: *path* is not a regular file (with *overwrite*).
        FileExistsError: *path* exists and *overwrite* is false.
    """
    p = Path(path)
    if overwrite:
        # A secret key goes to a regular file only: never written through a
        # device, FIFO or /dev/fd path, and replaced atomically.
        if is_stream_target(p):
            raise ValueError(f"{p} is not a regular file: an identity is not written there")
        with atomic_file(p, mode=0o600) as out:
            out.write(text.encode())
        return
    try:
        # O_EXCL: an existing path, a symlink included, is never written through.
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise FileExistsError(f"identity file {p} already exists") from None
    os.fchmod(fd, 0o600)  # whatever the umask
    with os.fdopen(fd, "w", encoding="utf-8") as fp:
        fp.write(text)


def generate_identity(
    path: str | os.PathLike[str] | None = None, *, overwrite: bool = False
) -> X25519Identity:
    """Make a new identity; if *path* is given, write it there with mode 0600."""
    ident = X25519Identity(bytes(PrivateKey.generate()))
    if path is not None:
        write_identity_file(path, ident.to_text(), overwrite=overwrite)
    return ident
