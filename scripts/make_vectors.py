#!/usr/bin/env python3
"""Write the sealed-file v1 known-answer vectors into ``docs/vectors/``.

Usage::

    .venv/bin/python scripts/make_vectors.py [--out DIR]

Rerunning rewrites every ``NAME.seal`` / ``NAME.json`` pair in *DIR* (default
``docs/vectors``) and removes stale pairs; the output is byte-for-byte
identical on every run, so a diff after rerunning means the generator (or a
primitive it calls) changed.

Determinism: every key, salt, nonce prefix, plaintext and ephemeral key comes
from SHAKE-256 over a fixed label, never from ``os.urandom``. That includes
the X25519 slots: a libsodium sealed box normally draws a fresh ephemeral key
pair, so this script builds the box from its definition (``epk || crypto_box(m,
nonce=BLAKE2b-192(epk || pk), pk, esk)``) with a derived ephemeral key and
checks that libsodium opens it. Real writers MUST use fresh randomness for
all of these; the fixed values here are public test keys.

The ``hpke`` slots likewise: an HPKE library draws its own ephemeral key, so
a DHKEM(X25519) slot is built here from RFC 9180's definition (Encap with a
derived ephemeral key, the key schedule, one ChaCha20-Poly1305 seal) and
checked to open with ``cryptography``'s HPKE. The ML-KEM-768 + X25519 slot
cannot be rebuilt that way without an ML-KEM implementation of our own
(ML-KEM encapsulation draws randomness no API lets us fix), so it is a
recorded answer: ``_XWING_RECORDED`` was made once by ``cryptography``'s
``Suite.encrypt`` for the fixed identity, DEK and context below, and every
run checks that it still opens to that DEK, a decrypt-only known answer.

The files are built from the format's definition in ``docs/FORMAT.md``, not
by ``SealWriter``: the header, the chunks and the slots are assembled by hand
(that is the only way to write the negative cases), and for well-formed files
the preamble is checked against ``sealstore.format.build_preamble``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from nacl import bindings
from nacl.encoding import RawEncoder
from nacl.hash import blake2b
from nacl.public import PrivateKey, SealedBox

from sealstore.format import MAGIC, Header, build_preamble, canonical_json, derive_keys
from sealstore.keys import DataKey, KeySlot
from sealstore.stream import chunk_nonce

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "vectors"

EXPECTATIONS = ("ok", "AuthenticationError", "FormatError", "UnsupportedVersion", "KeyUnavailable")
AES = "AES-256-GCM"
CHACHA = "CHACHA20-POLY1305"
CS = 64 * 1024
SMALL_HEX_LIMIT = 256  # ok vectors whose plaintext is at most this long also carry it in hex
_U32 = struct.Struct("<I")


def det(label: str, n: int) -> bytes:
    """*n* fixed pseudo-random bytes named by *label* (SHAKE-256, so stable everywhere)."""
    return hashlib.shake_256(b"sealstore/v1/vectors/" + label.encode()).digest(n)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


# -- the public test keys -------------------------------------------------------------

DEK = det("dek/primary", 32)
DEK_OTHER = det("dek/other", 32)
IDENTITY_SK = det("x25519/identity", 32)
IDENTITY_PK = bytes(PrivateKey(IDENTITY_SK).public_key)
OTHER_SK = det("x25519/other-identity", 32)
OTHER_PK = bytes(PrivateKey(OTHER_SK).public_key)
RECIPIENT = "x25519:" + b64url(IDENTITY_PK)
IDENTITY_LINE_PREFIX = "SEALSTORE-X25519-IDENTITY:"
IDENTITY_TEXT = (
    "# sealstore x25519 identity -- a PUBLIC TEST KEY from docs/vectors, never use it\n"
    f"# recipient: {RECIPIENT}\n"
    f"{IDENTITY_LINE_PREFIX}{b64url(IDENTITY_SK)}\n"
)

KEYRING_ID = "5ea1ed00-7e57-4000-8000-00000000000a"
KEYRING_CREATED = "2025-01-01T00:00:00Z"
KEK_ID = "k1"
KEK = det("local/kek-k1", 32)
LOCAL_KEY_ID = "local:vectors-keyring.json"
_LOCAL_SLOT_LABEL = b"sealstore/v1/slot/local\x00"
_X25519_SLOT_LABEL = b"sealstore/v1/slot/x25519\x00"

CONTEXT = {
    "tenant": "acme",
    "artifact": "llama-3-8b",
    "version": "7",
    "path": "model-00001-of-00004.safetensors",
    "content_type": "application/vnd.safetensors",
    # Non-ASCII text is written raw (ensure_ascii=False), and keys sort by code
    # point: U+FF61 sorts before U+1F511, the reverse of UTF-16 code-unit order.
    "owner": "Zoë Ångström",
    "\uff61": "halfwidth",
    "\U0001f511": "key",
}


def _keyring_text() -> str:
    """A ``kdf: none`` keyring holding KEK k1, as ``sealstore.kms.local`` writes one."""
    public = {
        "format": "sealstore-keyring-v1",
        "id": KEYRING_ID,
        "created": KEYRING_CREATED,
        "kdf": {"alg": "none"},
        "keks": [{"id": KEK_ID, "created": KEYRING_CREATED}],
        "current": KEK_ID,
    }
    nonce = det("local/keyring-nonce", 12)
    secret = canonical_json({KEK_ID: base64.b64encode(KEK).decode()})
    sealed = nonce + AESGCM(bytes(32)).encrypt(nonce, secret, canonical_json(public))
    doc = dict(public, sealed=base64.b64encode(sealed).decode())
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


KEYRING_TEXT = _keyring_text()


# -- slots ----------------------------------------------------------------------------


def x25519_slot(
    label: str,
    dek: bytes,
    context: dict[str, str],
    *,
    to: bytes = IDENTITY_PK,
    key_id: str | None = None,
) -> KeySlot:
    """An x25519 slot: crypto_box_seal(DEK || SHA-256(label || canonical_json(context)))."""
    message = dek + hashlib.sha256(_X25519_SLOT_LABEL + canonical_json(context)).digest()
    esk = PrivateKey(det(f"x25519-ephemeral/{label}", 32))
    epk = bytes(esk.public_key)
    nonce = blake2b(epk + to, digest_size=24, encoder=RawEncoder)
    blob = epk + bindings.crypto_box(message, nonce, to, bytes(esk))
    for sk in (IDENTITY_SK, OTHER_SK):
        if bytes(PrivateKey(sk).public_key) == to:
            assert SealedBox(PrivateKey(sk)).decrypt(blob) == message
    return KeySlot("x25519", key_id or "x25519:" + b64url(to), blob)


# -- hpke slots (RFC 9180 base mode, HKDF-SHA256, ChaCha20-Poly1305) -----------------

HPKE_SK = det("hpke/x25519-identity", 32)
HPKE_PK = x25519.X25519PrivateKey.from_private_bytes(HPKE_SK).public_key().public_bytes_raw()
HPKE_OTHER_PK = (
    x25519.X25519PrivateKey.from_private_bytes(det("hpke/x25519-other-identity", 32))
    .public_key()
    .public_bytes_raw()
)
HPKE_RECIPIENT = "hpke:x25519:" + b64url(HPKE_PK)
HPKE_IDENTITY_TEXT = (
    "# sealstore hpke identity (x25519) -- a PUBLIC TEST KEY from docs/vectors, never use it\n"
    f"# recipient: {HPKE_RECIPIENT}\n"
    f"SEALSTORE-HPKE-IDENTITY:x25519:{b64url(HPKE_SK)}\n"
)
XWING_SEED = det("hpke/mlkem768x25519-identity", 32)
_XWING_EXPANDED = hashlib.shake_256(XWING_SEED).digest(96)
_XWING_SK = hpke.MLKEM768X25519PrivateKey(
    mlkem.MLKEM768PrivateKey.from_seed_bytes(_XWING_EXPANDED[:64]),
    x25519.X25519PrivateKey.from_private_bytes(_XWING_EXPANDED[64:]),
)
XWING_PK = (
    mlkem.MLKEM768PrivateKey.from_seed_bytes(_XWING_EXPANDED[:64]).public_key().public_bytes_raw()
    + x25519.X25519PrivateKey.from_private_bytes(_XWING_EXPANDED[64:])
    .public_key()
    .public_bytes_raw()
)
XWING_RECIPIENT = "hpke:mlkem768x25519:" + b64url(XWING_PK)
XWING_IDENTITY_TEXT = (
    "# sealstore hpke identity (mlkem768x25519) -- a PUBLIC TEST KEY from docs/vectors, "
    "never use it\n"
    f"# recipient: {XWING_RECIPIENT}\n"
    f"SEALSTORE-HPKE-IDENTITY:mlkem768x25519:{b64url(XWING_SEED)}\n"
)
XWING_CONTEXT = {"tenant": "acme", "artifact": "escrow", "path": "model.safetensors"}
_HPKE_INFO_LABEL = b"sealstore/v1/slot/hpke\x00"
_HPKE_SUITE_ID = b"HPKE" + bytes.fromhex("002000010003")
_CHACHA = hpke.AEAD.CHACHA20_POLY1305
_XWING_RECORDED = (
    "5hjK3N7DxQ0DeUJOZ3w0CypBL4xagsEawz6IcaSvgwyNCYXTCHMCc49tJgwboUhF0GPZ8bjpBFm/VSXlwd0iKTBF"
    "7QMfBP53Q6gDQYX/0O9TH22nHwu+9vvNDqf3AU+fZCmx4Stfav2Z67GfunTe0+DAdkzYjk2tRn7TsiVSNKrIcpN9"
    "2e32tvQVIxeBFikk/J0TaL03DOI21LniJ5cJm2/TU0jMe3p7H4EN0nxj80B5tn77iePTdfx8uKk9fakWqXmS03gj"
    "aQmjity21HLSQNo9Cm7YrVCJ0I+cLX38MjdeLRyAZS+e9trv3L+qsalX+LSmLX1rdXAYjo0l6b/hw+lXAaIwuM2Q"
    "lmpTicxTs0MgSUb0j0T5BEmUMuSbEfw7YiBYnunAN8CN9T8fSoOP8FTRgFehqCuAAi5gYxeBW4Pd9KGrRSds98m1"
    "hk8Go8fv13cu+CtYV00F4uoN1dq/HktTV9rnMxNbcFMetkIHVw3BB5rxaLhwRU/SDwcfl9pIki1WKDSAOPWEnxoU"
    "llNjEJ92ncv9YCVJb2Z+zHI0fX03ywr33H2d3SoKWJoTlo6h7SAY1Is8XdQLtZ3LH8VBKVafVQABvb4oqv6ND/4l"
    "jypjkwimicR/IV7Zps1XiGEQBaPLyngL7trjB1dfzTT3jyzsebyuhLXSRgpDVI0kiWPgmdnMOT3SexEMo/sf8SVV"
    "M+UydLb7fPuJrbDgtJ/C9f3CtqZuJKf8Y1cq0jnTJSl71teM9D/19S6snTM+8KKW67tHkJGRKCNvbuL8Ql0XyZWJ"
    "h2cHxOV+hgopVTO+ASasx28IEMq8CdKRpAtxz0XnouOwbN6qj0K56aVTeWMXaNMU9kkkyGmg5BR4MVmKaBT82z+K"
    "T5ZISieFfLe5PTM8jKXKjet7iUXFnazydqcyWkSHkTYcQwXd9Cr7yED6ReuJE5ukjHWXr7mlZy45upS88+aV/zr5"
    "cAFKQxbL35cLMagcJLy6mALxAopyHb8izFFJFuJed8dGXwiy+UOLUmG3UFIdovZzUuW4D9DJcNhsPJW0aRpaRu1Z"
    "8jR8rByrnp/+9wUrGyTbCCdsWpX0SUJXl7mtX3G1Oxo3mPxBJM1ULViSsEOjdnFA76uAk5HDktOJ7I5M2a/DIDud"
    "YB0aIIIxKDreUJxr6Gj67ZaETEECkCwmkUNT+vFAt9VGU9OUzcoObql0qBQKfO9a+9OWH6OZNuP7I99NmZUOF/gG"
    "/FcM9/Mjwye9cZF9VgeZcONPvdl9LrxyO53X65yDR35HvialIoK5XusI6H66ztrhxT0C8vCQqw3aqoqZ0pkyG8Hv"
    "4dnKUpu1+Dt6yOjZCY+wbwCuXgB9mfLrkbheSQ8qtAZD1KQT+S+XONzj77qB2WvSt/PMhVEPELXbyxG2SE2Rh3X3"
    "SxF5gx+7L5QjMJof2OdBR59pXH9wzU7mlityG8Dj6Ua8bNbN8XW2aWAjlsSvSgl3/mzdlSGueiqHs4CGx8nvetFr"
    "T/Q2n79Y/dJcHh8b8sbJbP4cKvjpwnkrfLGzdYURC2WVFjGOrYDWmOXtmJcxHw=="
)


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(32), ikm, "sha256").digest()


def _hkdf_expand(prk: bytes, info: bytes, n: int) -> bytes:
    out, block, i = b"", b"", 1
    while len(out) < n:
        block = hmac.new(prk, block + info + bytes([i]), "sha256").digest()
        out, i = out + block, i + 1
    return out[:n]


def _labeled(suite_id: bytes, label: bytes, data: bytes) -> bytes:
    return b"HPKE-v1" + suite_id + label + data


def hpke_seal_x25519(pk_r: bytes, sk_e: bytes, info: bytes, pt: bytes) -> bytes:
    """RFC 9180 SealBase with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305."""
    esk = x25519.X25519PrivateKey.from_private_bytes(sk_e)
    enc = esk.public_key().public_bytes_raw()
    dh = esk.exchange(x25519.X25519PublicKey.from_public_bytes(pk_r))
    kem_id = b"KEM\x00\x20"
    eae_prk = _hkdf_extract(b"", _labeled(kem_id, b"eae_prk", dh))
    length = (32).to_bytes(2, "big")
    shared = _hkdf_expand(eae_prk, length + _labeled(kem_id, b"shared_secret", enc + pk_r), 32)
    sid = _HPKE_SUITE_ID
    context = (
        b"\x00"
        + _hkdf_extract(b"", _labeled(sid, b"psk_id_hash", b""))
        + _hkdf_extract(b"", _labeled(sid, b"info_hash", info))
    )
    secret = _hkdf_extract(shared, _labeled(sid, b"secret", b""))
    key = _hkdf_expand(secret, length + _labeled(sid, b"key", context), 32)
    nonce = _hkdf_expand(
        secret, (12).to_bytes(2, "big") + _labeled(sid, b"base_nonce", context), 12
    )
    return enc + ChaCha20Poly1305(key).encrypt(nonce, pt, b"")


def hpke_slot(
    label: str,
    dek: bytes,
    context: dict[str, str],
    *,
    to: bytes = HPKE_PK,
    key_id: str | None = None,
) -> KeySlot:
    """An hpke x25519 slot: SealBase(pk, info = label || canonical_json(context), DEK)."""
    info = _HPKE_INFO_LABEL + canonical_json(context)
    blob = hpke_seal_x25519(to, det(f"hpke-ephemeral/{label}", 32), info, dek)
    if to == HPKE_PK:
        sk = x25519.X25519PrivateKey.from_private_bytes(HPKE_SK)
        suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, _CHACHA)
        assert suite.decrypt(blob, sk, info=info) == dek
    return KeySlot("hpke", key_id or "hpke:x25519:" + b64url(to), blob)


def xwing_slot(dek: bytes) -> KeySlot:
    """The recorded ML-KEM-768 + X25519 slot (see the module doc), checked to open."""
    blob = base64.b64decode("".join(_XWING_RECORDED))
    info = _HPKE_INFO_LABEL + canonical_json(XWING_CONTEXT)
    suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, _CHACHA)
    assert suite.decrypt(blob, _XWING_SK, info=info) == dek
    return KeySlot("hpke", XWING_RECIPIENT, blob)


def local_slot(label: str, dek: bytes, context: dict[str, str]) -> KeySlot:
    """A local-keyring slot: nonce || AES-256-GCM(KEK, nonce, DEK, aad)."""
    aad = b"".join(
        (
            _LOCAL_SLOT_LABEL,
            KEYRING_ID.encode(),
            b"\x00",
            KEK_ID.encode(),
            b"\x00",
            canonical_json(context),
        )
    )
    nonce = det(f"local-nonce/{label}", 12)
    blob = nonce + AESGCM(KEK).encrypt(nonce, dek, aad)
    return KeySlot("local", LOCAL_KEY_ID, blob, {"keyring": KEYRING_ID, "kek": KEK_ID})


def foreign_slot(label: str) -> KeySlot:
    """A slot of a kind no reader here knows (a key service this build lacks)."""
    return KeySlot("example-kms", f"example-kms://keys/{label}", det(f"foreign/{label}", 60))


def encode_slots(slots: list[KeySlot]) -> bytes:
    return canonical_json([slot.to_json() for slot in slots]) if slots else b""


# -- files ----------------------------------------------------------------------------


def u32(n: int) -> bytes:
    return _U32.pack(n)


def aad_of(header: bytes) -> bytes:
    return hashlib.sha256(MAGIC + u32(len(header)) + header).digest()


@dataclass
class Parts:
    """A sealed file in pieces, so a vector can damage exactly one of them."""

    header: bytes
    slots: bytes
    chunks: list[bytes]
    magic: bytes = MAGIC

    def preamble(self) -> bytes:
        return self.magic + u32(len(self.header)) + self.header + u32(len(self.slots)) + self.slots

    def assemble(self) -> bytes:
        return self.preamble() + b"".join(self.chunks)


def split(plaintext: bytes, chunk_size: int) -> list[bytes]:
    """The writer's split: full chunks, then the rest; empty input is one empty chunk."""
    return [plaintext[i : i + chunk_size] for i in range(0, len(plaintext), chunk_size)] or [b""]


def seal_chunks(
    suite: str,
    key: bytes,
    prefix: bytes,
    aad: bytes,
    pieces: list[bytes],
    last_flags: list[bool] | None = None,
) -> list[bytes]:
    """STREAM: chunk i under nonce prefix || u32_be(i) || last, AAD = SHA-256(preamble head)."""
    flags = last_flags or [i == len(pieces) - 1 for i in range(len(pieces))]
    # An unsupported suite still gets a well-formed payload, so its header is the one defect.
    aead = ChaCha20Poly1305(key) if suite == CHACHA else AESGCM(key)
    return [
        aead.encrypt(chunk_nonce(prefix, i, flags[i]), piece, aad) for i, piece in enumerate(pieces)
    ]


HeaderEdit = Callable[[dict[str, Any]], dict[str, Any] | bytes]


def make_file(
    label: str,
    plaintext: bytes,
    *,
    dek: bytes = DEK,
    suite: str = AES,
    chunk_size: int = CS,
    context: dict[str, str] | None = None,
    declare_size: bool = False,
    slots: list[KeySlot] | None = None,
    edit: HeaderEdit | None = None,
    last_flags: list[bool] | None = None,
    pieces: list[bytes] | None = None,
) -> Parts:
    """A sealed file under a salt and nonce prefix derived from *label*.

    *slots* defaults to one x25519 slot for the test identity; *edit* rewrites
    the header JSON object (or returns raw header bytes) before the chunks are
    sealed under it, so a malformed header still has a payload that matches it.
    *pieces* overrides how the plaintext is cut into chunks; *last_flags* which
    chunks are sealed as final.
    """
    context = dict(context or {})
    salt = det(f"salt/{label}", 32)
    prefix = det(f"nonce-prefix/{label}", 7)
    payload_key, commitment = derive_keys(DataKey(dek), salt, suite)
    header = Header(
        suite=suite,
        chunk_size=chunk_size,
        salt=salt,
        nonce_prefix=prefix,
        commitment=commitment,
        context=context,
        plaintext_size=len(plaintext) if declare_size else None,
    )
    if slots is None:
        slots = [x25519_slot(label, dek, context)]
    header_bytes = header.encode()
    if edit is not None:
        edited = edit(header.to_json())
        header_bytes = edited if isinstance(edited, bytes) else canonical_json(edited)
    parts = Parts(header_bytes, encode_slots(slots), [])
    if edit is None:
        # The hand-built preamble is exactly what the implementation writes.
        assert parts.preamble() == build_preamble(header, slots)
    if pieces is None:
        pieces = split(plaintext, chunk_size)
    assert b"".join(pieces) == plaintext
    parts.chunks = seal_chunks(suite, payload_key, prefix, aad_of(header_bytes), pieces, last_flags)
    return parts


def text(label: str, n: int) -> bytes:
    """*n* bytes of fixed pseudo-random plaintext."""
    return det(f"plaintext/{label}", n)


# -- the vectors ----------------------------------------------------------------------


@dataclass
class Vector:
    name: str
    description: str
    expect: str
    data: bytes
    dek: bytes | None = DEK
    identity: bool | str = True  # True: the X25519 identity; a string: that identity's text
    keyring: bool = False
    detached_slots: list[KeySlot] | None = None
    plaintext: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        assert self.expect in EXPECTATIONS
        assert (self.expect == "ok") == (self.plaintext is not None)
        obj: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "expect": self.expect,
            "dek": self.dek.hex() if self.dek is not None else None,
            "identity": (
                self.identity
                if isinstance(self.identity, str)
                else (IDENTITY_TEXT if self.identity else None)
            ),
            "keyring": KEYRING_TEXT if self.keyring else None,
            "detached_slots": (
                [slot.to_json() for slot in self.detached_slots]
                if self.detached_slots is not None
                else None
            ),
            "file_size": len(self.data),
            "file_sha256": hashlib.sha256(self.data).hexdigest(),
        }
        if self.plaintext is not None:
            obj["plaintext_size"] = len(self.plaintext)
            obj["plaintext_sha256"] = hashlib.sha256(self.plaintext).hexdigest()
            if len(self.plaintext) <= SMALL_HEX_LIMIT:
                obj["plaintext_hex"] = self.plaintext.hex()
        return obj


def ok(name: str, description: str, plaintext: bytes, parts: Parts, **kw: Any) -> Vector:
    return Vector(name, description, "ok", parts.assemble(), plaintext=plaintext, **kw)


def bad(name: str, expect: str, description: str, data: bytes | Parts, **kw: Any) -> Vector:
    raw = data.assemble() if isinstance(data, Parts) else data
    return Vector(name, description, expect, raw, **kw)


def _ok_vectors() -> list[Vector]:
    out: list[Vector] = []
    sizes = [
        ("empty", 0, "empty plaintext: one chunk that is only a tag, flagged final"),
        ("cs_minus_1", CS - 1, "chunk_size - 1 bytes: one short final chunk"),
        ("cs", CS, "exactly chunk_size bytes: one full chunk, flagged final (no empty chunk)"),
        ("cs_plus_1", CS + 1, "chunk_size + 1 bytes: a full chunk, then a 1-byte final chunk"),
        ("2cs_plus_500", 2 * CS + 500, "2 * chunk_size + 500 bytes: two full chunks and 500"),
    ]
    for suite, tag in ((AES, "aes"), (CHACHA, "chacha")):
        for size_name, n, what in sizes:
            if suite == CHACHA and size_name in ("cs_minus_1", "cs"):
                continue  # the AES vectors cover these edges; keep the directory small
            name = f"{tag}_{size_name}"
            pt = text(name, n)
            parts = make_file(name, pt, suite=suite)
            out.append(ok(name, f"{suite}, 64 KiB chunks, {what}.", pt, parts))

    pt = b"sealstore test vector: ChaCha20-Poly1305 with 128 KiB chunks\n"
    out.append(
        ok(
            "chacha_cs_128k",
            "CHACHA20-POLY1305 with chunk_size 131072 and a short text plaintext.",
            pt,
            make_file("chacha_cs_128k", pt, suite=CHACHA, chunk_size=2 * CS),
        )
    )

    pt = text("context_and_size", 3000)
    out.append(
        ok(
            "context_and_size",
            "An encryption context (non-ASCII values, keys outside the BMP) and plaintext_size; "
            "the x25519 slot is bound to the canonical JSON of the context.",
            pt,
            make_file("context_and_size", pt, context=CONTEXT, declare_size=True),
        )
    )

    pt = b"hello, sealstore\n"
    detached = [x25519_slot("example_detached", DEK, {})]
    out.append(
        ok(
            "example_detached",
            "The worked example of FORMAT.md: slen = 0, the key slots are held elsewhere "
            "(detached_slots stands in for the store manifest).",
            pt,
            make_file("example_detached", pt, slots=[]),
            detached_slots=detached,
        )
    )

    pt = text("multiple_slots", 500)
    slots = [
        x25519_slot("multiple_slots/0", DEK, {}, to=OTHER_PK),
        foreign_slot("multiple_slots/1"),
        x25519_slot("multiple_slots/2", DEK, {}),
    ]
    out.append(
        ok(
            "multiple_slots",
            "Three slots: another recipient's, one of an unknown kind, then the identity's; "
            "a reader skips the first two and opens the third.",
            pt,
            make_file("multiple_slots", pt, slots=slots),
        )
    )

    pt = text("slot_mismatch_then_valid", 500)
    slots = [
        x25519_slot("slot_mismatch_then_valid/0", DEK_OTHER, {}),
        x25519_slot("slot_mismatch_then_valid/1", DEK, {}),
    ]
    out.append(
        ok(
            "slot_mismatch_then_valid",
            "Slot 0 opens but to a DEK the header does not commit to; the reader moves on and "
            "slot 1 gives the right DEK.",
            pt,
            make_file("slot_mismatch_then_valid", pt, slots=slots),
            dek=None,
        )
    )

    pt = text("local_keyring", 700)
    ctx = {"tenant": "acme", "artifact": "tokenizer"}
    out.append(
        ok(
            "local_keyring",
            "One local-keyring slot bound to the context; the keyring is the kdf 'none' "
            "keyring in the 'keyring' field.",
            pt,
            make_file(
                "local_keyring", pt, context=ctx, slots=[local_slot("local_keyring", DEK, ctx)]
            ),
            identity=False,
            keyring=True,
        )
    )

    pt = text("header_noncanonical", 200)

    def noncanonical(obj: dict[str, Any]) -> bytes:
        # Reversed key order, spaces and a trailing newline: legal JSON, not canonical.
        return json.dumps(dict(reversed(list(obj.items()))), indent=1).encode() + b"\n"

    out.append(
        ok(
            "header_noncanonical",
            "A header that is valid but not canonical JSON (key order, whitespace). Readers "
            "accept it and authenticate the bytes as stored, never a re-encoding.",
            pt,
            make_file("header_noncanonical", pt, edit=noncanonical),
        )
    )

    pt = text("plaintext_size_null", 100)
    out.append(
        ok(
            "plaintext_size_null",
            "plaintext_size is present as JSON null, which readers treat as absent.",
            pt,
            make_file("plaintext_size_null", pt, edit=lambda o: {**o, "plaintext_size": None}),
        )
    )

    pt = text("header_at_size_bound", 100)

    def pad_to(total: int) -> HeaderEdit:
        def edit(obj: dict[str, Any]) -> bytes:
            raw = canonical_json(obj)
            return raw + b" " * (total - len(raw))

        return edit

    out.append(
        ok(
            "header_at_size_bound",
            "hlen = 65536 = MAX_HEADER_SIZE exactly (the header padded with trailing spaces).",
            pt,
            make_file("header_at_size_bound", pt, edit=pad_to(64 * 1024)),
        )
    )

    pt = text("slots_at_count_bound", 100)
    slots = [foreign_slot(f"slots_at_count_bound/{i}") for i in range(255)]
    slots.append(x25519_slot("slots_at_count_bound", DEK, {}))
    out.append(
        ok(
            "slots_at_count_bound",
            "256 = MAX_SLOTS key slots; the last one is the identity's.",
            pt,
            make_file("slots_at_count_bound", pt, slots=slots),
        )
    )
    return out


def _flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[pos] ^= mask
    return bytes(out)


def _auth_vectors() -> list[Vector]:
    A = "AuthenticationError"
    out: list[Vector] = []

    parts = make_file("header_byte_flipped", text("header_byte_flipped", 300))
    pos = parts.header.index(b'"nonce_prefix":"') + len(b'"nonce_prefix":"')
    parts.header = _flip(parts.header, pos)  # one base64 letter, so it still parses
    out.append(
        bad(
            "header_byte_flipped",
            A,
            "One byte of the header flipped (the first base64 letter of nonce_prefix): the "
            "header parses, the key commitment (which covers only DEK, salt and suite) still "
            "matches and the slot still opens, but every chunk's AAD and nonce changed.",
            parts,
        )
    )

    ctx = {"tenant": "acme", "artifact": "llama-3-8b"}
    parts = make_file("header_context_changed", text("header_context_changed", 300), context=ctx)
    pos = parts.header.index(b'"acme"') + 4
    parts.header = _flip(parts.header, pos)  # "acme" -> "acmd"
    # The slot is bound to the original context, so through the slots this
    # would be KeyUnavailable: the vector is for the DEK path only.
    out.append(
        bad(
            "header_context_changed",
            A,
            "One byte of the header's context flipped ('acme' -> 'acmd'); the header still "
            "parses and the commitment still matches, but every chunk's AAD changed. DEK path "
            "only (through the slot, the context binding fails first: KeyUnavailable).",
            parts,
            identity=False,
        )
    )

    parts = make_file("commitment_flipped", text("commitment_flipped", 300))
    obj = json.loads(parts.header)
    raw = bytearray(base64.b64decode(obj["commitment"]))
    raw[0] ^= 0x80
    obj["commitment"] = base64.b64encode(bytes(raw)).decode()
    parts.header = canonical_json(obj)
    out.append(
        bad(
            "commitment_flipped",
            A,
            "One bit of the key commitment flipped: the DEK no longer matches the header "
            "(through the slots: the only slot opens to a DEK failing the commitment).",
            parts,
        )
    )

    out.append(
        bad(
            "slot_swapped",
            A,
            "The only slot was replaced by a slot (to the same identity, same context) "
            "holding another file's DEK: it opens, the commitment check fails.",
            make_file(
                "slot_swapped",
                text("slot_swapped", 300),
                slots=[x25519_slot("slot_swapped", DEK_OTHER, {})],
            ),
            dek=None,
        )
    )

    parts = make_file("chunks_swapped", text("chunks_swapped", 2 * CS + 500))
    parts.chunks[0], parts.chunks[1] = parts.chunks[1], parts.chunks[0]
    out.append(
        bad("chunks_swapped", A, "2 * chunk_size + 500 bytes, chunks 0 and 1 swapped.", parts)
    )

    parts = make_file("chunk_duplicated", text("chunk_duplicated", CS + 100))
    parts.chunks.insert(1, parts.chunks[0])
    out.append(
        bad(
            "chunk_duplicated",
            A,
            "chunk_size + 100 bytes; chunk 0 written twice (chunks: 0, 0, 1).",
            parts,
        )
    )

    parts = make_file("truncated_at_chunk_boundary", text("truncated_at_chunk_boundary", CS + 100))
    del parts.chunks[1]
    out.append(
        bad(
            "truncated_at_chunk_boundary",
            A,
            "chunk_size + 100 bytes with the final chunk dropped: what is left is one full "
            "chunk that was not sealed as final.",
            parts,
        )
    )

    parts = make_file("truncated_mid_chunk", text("truncated_mid_chunk", CS + 100))
    parts.chunks[1] = parts.chunks[1][:-50]
    out.append(
        bad(
            "truncated_mid_chunk",
            A,
            "chunk_size + 100 bytes with the last 50 bytes cut off (the final chunk is short).",
            parts,
        )
    )

    parts = make_file("truncated_inside_tag", text("truncated_inside_tag", CS + 100))
    parts.chunks[1] = parts.chunks[1][:10]
    out.append(
        bad(
            "truncated_inside_tag",
            A,
            "chunk_size + 100 bytes cut 10 bytes into the final chunk: the payload length "
            "leaves a remainder of 10 (1..15 is never a valid chunk).",
            parts,
        )
    )

    parts = make_file("truncated_to_preamble", text("truncated_to_preamble", 300))
    parts.chunks = []
    out.append(
        bad(
            "truncated_to_preamble",
            A,
            "The file ends right after the preamble: no chunk at all.",
            parts,
        )
    )

    parts = make_file("trailing_bytes", text("trailing_bytes", 1000))
    out.append(
        bad(
            "trailing_bytes",
            A,
            "A valid 1000-byte file followed by one extra zero byte.",
            parts.assemble() + b"\x00",
        )
    )

    parts = make_file("trailing_chunk", text("trailing_chunk", CS))
    extra = make_file("trailing_chunk/donor", text("trailing_chunk", 10)).chunks[0]
    parts.chunks.append(extra)
    out.append(
        bad(
            "trailing_chunk",
            A,
            "A valid chunk_size-byte file followed by a 26-byte chunk from another file.",
            parts,
        )
    )

    out.append(
        bad(
            "wrong_dek",
            A,
            "A valid file opened with a DEK other than its own (the dek field is the wrong key).",
            make_file("wrong_dek", text("wrong_dek", 300)),
            dek=DEK_OTHER,
            identity=False,
        )
    )

    parts = make_file("ciphertext_flipped", text("ciphertext_flipped", 1000))
    parts.chunks[0] = _flip(parts.chunks[0], 500)
    out.append(bad("ciphertext_flipped", A, "One ciphertext bit of the only chunk flipped.", parts))

    parts = make_file("tag_flipped", text("tag_flipped", 1000))
    parts.chunks[0] = _flip(parts.chunks[0], len(parts.chunks[0]) - 1, 0x80)
    out.append(bad("tag_flipped", A, "One bit of the only chunk's tag flipped.", parts))

    out.append(
        bad(
            "final_chunk_not_flagged",
            A,
            "A single chunk sealed with last = 0: a writer that never finished (or a "
            "truncation) must not authenticate.",
            make_file(
                "final_chunk_not_flagged",
                text("final_chunk_not_flagged", 1000),
                last_flags=[False],
            ),
        )
    )

    out.append(
        bad(
            "first_chunk_flagged_final",
            A,
            "chunk_size + 100 bytes where chunk 0 was also sealed with last = 1.",
            make_file(
                "first_chunk_flagged_final",
                text("first_chunk_flagged_final", CS + 100),
                last_flags=[True, True],
            ),
        )
    )

    parts = make_file("chunk_from_other_file", text("chunk_from_other_file", 1000))
    donor = make_file("chunk_from_other_file/donor", text("chunk_from_other_file", 1000))
    parts.chunks[0] = donor.chunks[0]
    out.append(
        bad(
            "chunk_from_other_file",
            A,
            "The only chunk replaced by the same plaintext sealed in another file under the "
            "same DEK (a different salt, so a different payload key and AAD).",
            parts,
        )
    )

    pt = text("empty_final_chunk_after_full", CS)
    out.append(
        bad(
            "empty_final_chunk_after_full",
            A,
            "chunk_size bytes sealed as a full non-final chunk plus an empty final chunk (a "
            "16-byte tag): every tag verifies, but an empty final chunk is legal only as the "
            "only chunk.",
            make_file("empty_final_chunk_after_full", pt, pieces=[pt, b""]),
        )
    )

    out.append(
        bad(
            "plaintext_size_mismatch",
            A,
            "The header declares plaintext_size 1001; the payload holds 1000 bytes, every chunk "
            "sealed correctly under that header.",
            make_file(
                "plaintext_size_mismatch",
                text("plaintext_size_mismatch", 1000),
                edit=lambda o: {**o, "plaintext_size": 1001},
            ),
        )
    )

    parts = make_file("forged_empty_payload", text("forged_empty_payload", 1000))
    parts.chunks = [bytes(16)]
    out.append(
        bad(
            "forged_empty_payload",
            A,
            "No plaintext_size; the payload replaced by 16 zero bytes, which parses as one "
            "empty final chunk whose tag does not verify.",
            parts,
        )
    )

    parts = make_file("forged_empty_payload_sized", b"", declare_size=True)
    parts.chunks = [bytes(16)]
    out.append(
        bad(
            "forged_empty_payload_sized",
            A,
            "An empty plaintext with plaintext_size 0, its only chunk (a bare tag) replaced by "
            "16 zero bytes: the geometry matches plaintext_size, but the tag does not verify.",
            parts,
        )
    )
    return out


def _format_vectors() -> list[Vector]:
    F = "FormatError"
    out: list[Vector] = []
    pt = text("format", 100)

    def edited(name: str, description: str, edit: HeaderEdit, **kw: Any) -> None:
        out.append(bad(name, F, description, make_file(name, pt, edit=edit), **kw))

    parts = make_file("bad_magic", pt)
    parts.magic = b"\x89SEAL\n\n\x1a"
    out.append(bad("bad_magic", F, "The magic's CR changed to LF ('\\x89SEAL\\n\\n\\x1a').", parts))

    out.append(
        bad(
            "truncated_in_magic",
            F,
            "The file is the first 5 bytes of the magic.",
            MAGIC[:5],
        )
    )

    edited(
        "chunk_size_not_power_of_two",
        "chunk_size 100000: within bounds, not a power of two.",
        lambda o: {**o, "chunk_size": 100000},
    )
    edited(
        "chunk_size_too_small",
        "chunk_size 32768: a power of two below 64 KiB.",
        lambda o: {**o, "chunk_size": 32 * 1024},
    )
    edited(
        "chunk_size_too_large",
        "chunk_size 134217728: a power of two above 64 MiB.",
        lambda o: {**o, "chunk_size": 128 * 1024 * 1024},
    )
    edited(
        "chunk_size_float",
        "chunk_size written as the JSON number 65536.0 (a fraction part: not an integer).",
        lambda o: canonical_json(o).replace(b'"chunk_size":65536', b'"chunk_size":65536.0'),
    )
    edited(
        "header_duplicate_key",
        "The header has the key 'suite' twice (same value both times).",
        lambda o: canonical_json(o).replace(
            b'"suite":"AES-256-GCM"', b'"suite":"AES-256-GCM","suite":"AES-256-GCM"'
        ),
    )
    edited(
        "header_unknown_field",
        "A v1 header with an extra field 'compression'.",
        lambda o: {**o, "compression": "none"},
    )
    edited(
        "header_missing_field",
        "A header without 'nonce_prefix'.",
        lambda o: {k: v for k, v in o.items() if k != "nonce_prefix"},
    )
    edited(
        "header_missing_context",
        "A header without 'context' (an empty context is written as {}, never omitted).",
        lambda o: {k: v for k, v in o.items() if k != "context"},
    )
    edited(
        "header_nan",
        "plaintext_size is the non-standard JSON constant NaN.",
        lambda o: canonical_json(o)[:-1] + b',"plaintext_size":NaN}',
    )
    edited(
        "header_base64_unpadded",
        "salt in base64 without its '=' padding.",
        lambda o: {**o, "salt": o["salt"].rstrip("=")},
    )
    edited(
        "header_base64url",
        "nonce_prefix in the URL-safe base64 alphabet ('-' and '_'), not the standard one.",
        lambda o: {
            **o,
            "nonce_prefix": base64.urlsafe_b64encode(b"\xfb\xff\xfe\xfb\xff\xfe\x00").decode(),
        },
    )
    edited(
        "header_salt_wrong_length",
        "salt holds 16 bytes instead of 32.",
        lambda o: {**o, "salt": base64.b64encode(det("short-salt", 16)).decode()},
    )
    edited(
        "header_not_utf8",
        "A context value holds the byte 0xFF: the header is not UTF-8.",
        lambda o: canonical_json({**o, "context": {"tenant": "acme?"}}).replace(b"?", b"\xff"),
    )
    edited(
        "header_utf8_bom",
        "The header starts with a UTF-8 byte order mark (EF BB BF).",
        lambda o: b"\xef\xbb\xbf" + canonical_json(o),
    )
    edited(
        "header_not_object",
        "The header is a JSON array, not an object.",
        lambda o: canonical_json(sorted(o)),
    )
    edited(
        "context_value_not_string",
        "A context value is the number 7, not a string.",
        lambda o: {**o, "context": {"version": 7}},
    )
    edited(
        "version_not_integer",
        'v is the string "1".',
        lambda o: {**o, "v": "1"},
    )
    edited(
        "header_lone_surrogate",
        "A context value is the escaped lone surrogate \\ud800: not a Unicode string, so it "
        "has no canonical UTF-8 form and cannot be bound into a slot.",
        lambda o: canonical_json({**o, "context": {"tenant": "?"}}).replace(b"?", b"\\ud800"),
    )

    parts = make_file("hlen_zero", pt)
    out.append(
        bad(
            "hlen_zero",
            F,
            "hlen = 0 (then the bytes of a valid header follow).",
            parts.magic + u32(0) + parts.preamble()[12:] + b"".join(parts.chunks),
        )
    )

    parts = make_file(
        "header_over_size_bound",
        pt,
        edit=lambda o: canonical_json(o) + b" " * (64 * 1024 + 1 - len(canonical_json(o))),
    )
    out.append(
        bad(
            "header_over_size_bound",
            F,
            "hlen = 65537, one over MAX_HEADER_SIZE; otherwise a valid file (a header padded "
            "with trailing spaces).",
            parts,
        )
    )

    parts = make_file("slen_over_size_bound", pt)
    head = parts.magic + u32(len(parts.header)) + parts.header
    out.append(
        bad(
            "slen_over_size_bound",
            F,
            "slen = 1048577, one over MAX_SLOTS_SIZE; the file ends after the slots and "
            "chunks of a valid file (a reader must not try to read that much).",
            head + u32(1024 * 1024 + 1) + parts.slots + b"".join(parts.chunks),
        )
    )

    parts = make_file("truncated_in_header", pt)
    out.append(
        bad(
            "truncated_in_header",
            F,
            "The file ends 20 bytes into the header.",
            parts.assemble()[: 12 + 20],
        )
    )

    parts = make_file("truncated_in_slots", pt)
    cut = len(parts.preamble()) - 10
    out.append(
        bad(
            "truncated_in_slots",
            F,
            "The file ends 10 bytes before the end of the key-slot section.",
            parts.assemble()[:cut],
        )
    )

    parts = make_file("slots_empty_list", pt)
    parts.slots = b"[]"
    out.append(
        bad(
            "slots_empty_list",
            F,
            "slen = 2 and the slot section is [] (no slots is written as slen = 0).",
            parts,
        )
    )

    slots = [foreign_slot(f"slots_over_count_bound/{i}") for i in range(256)]
    slots.append(x25519_slot("slots_over_count_bound", DEK, {}))
    out.append(
        bad(
            "slots_over_count_bound",
            F,
            "257 key slots, one over MAX_SLOTS; the last one is the identity's.",
            make_file("slots_over_count_bound", pt, slots=slots),
        )
    )

    parts = make_file("slot_blob_not_base64", pt)
    slot_obj = json.loads(parts.slots)
    slot_obj[0]["blob"] = slot_obj[0]["blob"][:-4] + "!!!!"
    parts.slots = canonical_json(slot_obj)
    out.append(
        bad(
            "slot_blob_not_base64",
            F,
            "The slot's blob is not valid base64 (slots are parsed strictly even though they "
            "are not authenticated).",
            parts,
        )
    )

    parts = make_file("slot_missing_kind", pt)
    slot_obj = json.loads(parts.slots)
    del slot_obj[0]["kind"]
    parts.slots = canonical_json(slot_obj)
    out.append(bad("slot_missing_kind", F, "The only slot has no 'kind'.", parts))
    return out


def _version_vectors() -> list[Vector]:
    U = "UnsupportedVersion"
    pt = text("version", 100)
    return [
        bad(
            "version_2",
            U,
            "v = 2; otherwise a valid v1 file.",
            make_file("version_2", pt, edit=lambda o: {**o, "v": 2}),
        ),
        bad(
            "version_2_new_fields",
            U,
            "v = 2 with a field v1 does not know and without 'nonce_prefix': the version is "
            "checked before the fields, so this is UnsupportedVersion, not FormatError.",
            make_file(
                "version_2_new_fields",
                pt,
                edit=lambda o: {
                    **{k: v for k, v in o.items() if k != "nonce_prefix"},
                    "v": 2,
                    "nonce": "AAAA",
                },
            ),
        ),
        bad(
            "unknown_suite",
            U,
            "suite 'XCHACHA20-POLY1305', which v1 does not define.",
            make_file("unknown_suite", pt, suite="XCHACHA20-POLY1305"),
        ),
    ]


def _key_vectors() -> list[Vector]:
    K = "KeyUnavailable"
    # A slot that names a key the reader holds yet does not open under the
    # header's context was altered, or the context was: tampering (FORMAT.md 10.1).
    A = "AuthenticationError"
    out: list[Vector] = []
    pt = text("keys", 100)
    out.append(
        bad(
            "slot_other_recipient",
            K,
            "The only slot is sealed to another X25519 recipient.",
            make_file(
                "slot_other_recipient",
                pt,
                slots=[x25519_slot("slot_other_recipient", DEK, {}, to=OTHER_PK)],
            ),
            dek=None,
        )
    )
    out.append(
        bad(
            "slot_does_not_open",
            A,
            "The slot names the identity's recipient, but its sealed box was made for another "
            "key: it does not open, so the slot was altered.",
            make_file(
                "slot_does_not_open",
                pt,
                slots=[x25519_slot("slot_does_not_open", DEK, {}, to=OTHER_PK, key_id=RECIPIENT)],
            ),
            dek=None,
        )
    )
    ctx = {"tenant": "acme"}
    out.append(
        bad(
            "slot_other_context",
            A,
            'The x25519 slot was sealed under the context {"tenant": "globex"}; the header '
            'says {"tenant": "acme"}.',
            make_file(
                "slot_other_context",
                pt,
                context=ctx,
                slots=[x25519_slot("slot_other_context", DEK, {"tenant": "globex"})],
            ),
            dek=None,
        )
    )
    out.append(
        bad(
            "local_slot_other_context",
            A,
            'The local slot\'s AAD names the context {"tenant": "globex"}; the header says '
            '{"tenant": "acme"}.',
            make_file(
                "local_slot_other_context",
                pt,
                context=ctx,
                slots=[local_slot("local_slot_other_context", DEK, {"tenant": "globex"})],
            ),
            dek=None,
            identity=False,
            keyring=True,
        )
    )
    out.append(
        bad(
            "slot_unknown_kind",
            K,
            "The only slot is of a kind no provider here handles ('example-kms').",
            make_file("slot_unknown_kind", pt, slots=[foreign_slot("slot_unknown_kind")]),
            dek=None,
        )
    )
    out.append(
        bad(
            "detached_without_manifest",
            K,
            "slen = 0 and no detached slots are supplied: there is nothing to unwrap.",
            make_file("detached_without_manifest", pt, slots=[]),
            dek=None,
        )
    )
    return out


def _hpke_vectors() -> list[Vector]:
    out: list[Vector] = []
    pt = text("hpke", 100)
    out.append(
        ok(
            "hpke_x25519",
            "One hpke slot, DHKEM(X25519): the context (non-ASCII, keys outside the BMP) is in "
            "HPKE's info, so the identity opens it only under this header's context.",
            pt,
            make_file(
                "hpke_x25519", pt, context=CONTEXT, slots=[hpke_slot("hpke_x25519", DEK, CONTEXT)]
            ),
            identity=HPKE_IDENTITY_TEXT,
        )
    )
    out.append(
        ok(
            "hpke_mlkem768x25519",
            "One hpke slot, ML-KEM-768 + X25519 (X-Wing): a recorded slot (decrypt-only known "
            "answer; see docs/vectors/README.md).",
            pt,
            make_file("hpke_mlkem768x25519", pt, context=XWING_CONTEXT, slots=[xwing_slot(DEK)]),
            identity=XWING_IDENTITY_TEXT,
        )
    )
    flipped = xwing_slot(DEK)
    flipped = KeySlot("hpke", flipped.key_id, _flip(flipped.blob, 1000))
    out.append(
        bad(
            "hpke_mlkem768x25519_enc_flipped",
            "AuthenticationError",
            "The recorded X-Wing slot with one bit of its ML-KEM ciphertext flipped: ML-KEM's "
            "implicit rejection gives another shared secret and the AEAD tag fails.",
            make_file(
                "hpke_mlkem768x25519_enc_flipped", pt, context=XWING_CONTEXT, slots=[flipped]
            ),
            dek=None,
            identity=XWING_IDENTITY_TEXT,
        )
    )
    ctx = {"tenant": "acme"}
    slot = hpke_slot("hpke_enc_flipped", DEK, ctx)
    out.append(
        bad(
            "hpke_enc_flipped",
            "AuthenticationError",
            "The hpke slot names the identity, but one bit of its enc (the ephemeral public key) "
            "is flipped: another shared secret, the tag fails.",
            make_file(
                "hpke_enc_flipped",
                pt,
                context=ctx,
                slots=[KeySlot("hpke", slot.key_id, _flip(slot.blob, 3))],
            ),
            dek=None,
            identity=HPKE_IDENTITY_TEXT,
        )
    )
    out.append(
        bad(
            "hpke_slot_other_context",
            "AuthenticationError",
            'The hpke slot was sealed with the context {"tenant": "globex"} in its info; the '
            'header says {"tenant": "acme"}.',
            make_file(
                "hpke_slot_other_context",
                pt,
                context=ctx,
                slots=[hpke_slot("hpke_slot_other_context", DEK, {"tenant": "globex"})],
            ),
            dek=None,
            identity=HPKE_IDENTITY_TEXT,
        )
    )
    out.append(
        bad(
            "hpke_slot_other_recipient",
            "KeyUnavailable",
            "The only slot is an hpke slot for another recipient.",
            make_file(
                "hpke_slot_other_recipient",
                pt,
                context=ctx,
                slots=[hpke_slot("hpke_slot_other_recipient", DEK, ctx, to=HPKE_OTHER_PK)],
            ),
            dek=None,
            identity=HPKE_IDENTITY_TEXT,
        )
    )
    return out


def build_vectors() -> list[Vector]:
    vectors = (
        _ok_vectors()
        + _auth_vectors()
        + _format_vectors()
        + _version_vectors()
        + _key_vectors()
        + _hpke_vectors()
    )
    names = [v.name for v in vectors]
    assert len(names) == len(set(names)), "duplicate vector names"
    return vectors


def write_vectors(out_dir: Path) -> list[Vector]:
    """Write every vector into *out_dir*, removing pairs no longer generated."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vectors = build_vectors()
    names = {v.name for v in vectors}
    for old in [*out_dir.glob("*.seal"), *out_dir.glob("*.json")]:
        if old.stem not in names:
            old.unlink()
    for vec in vectors:
        (out_dir / f"{vec.name}.seal").write_bytes(vec.data)
        body = json.dumps(vec.to_json(), indent=2, ensure_ascii=False) + "\n"
        (out_dir / f"{vec.name}.json").write_text(body, encoding="utf-8")
    return vectors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    vectors = write_vectors(args.out)
    counts: dict[str, int] = {}
    for vec in vectors:
        counts[vec.expect] = counts.get(vec.expect, 0) + 1
    total = sum(len(v.data) for v in vectors)
    summary = ", ".join(f"{counts.get(e, 0)} {e}" for e in EXPECTATIONS)
    print(f"wrote {len(vectors)} vectors ({summary}), {total} bytes, to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
