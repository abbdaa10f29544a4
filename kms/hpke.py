"""``hpke:KEM:KEY`` -- data keys sealed with HPKE (RFC 9180), post-quantum ready.

The recipient kind for escrow and recovery keys, like ``x25519:`` but built
on a standard, with a choice of KEM:

- ``x25519``: DHKEM(X25519, HKDF-SHA256), KEM id 0x0020 (the default);
- ``mlkem768x25519``: ML-KEM-768 + X25519, X-Wing, KEM id 0x647A
  (draft-ietf-hpke-pq), for keys that must outlive a quantum computer: a
  slot stays closed unless both ML-KEM-768 and X25519 are broken.

Both use HKDF-SHA256 (0x0001) and ChaCha20-Poly1305 (0x0003): a 256-bit AEAD
key, and the exact suites of the official RFC 9180 and draft-ietf-hpke-pq
test vectors. Base mode, single shot, through ``cryptography``'s
``hazmat.primitives.hpke`` (nothing hand-made here but the key encodings).

The encryption context goes into HPKE's ``info``, not its ``aad``:
``cryptography``'s public API takes ``info`` only, and RFC 9180 section 8.1
recommends ``info`` for single-shot use. The slot's blob is what
``Suite.encrypt`` returns, ``enc || ciphertext``, and its plaintext is the
bare DEK: a slot opened under another context fails its AEAD tag.

``cryptography`` builds the hybrid private key from its two halves; the
identity file keeps the 32-byte X-Wing seed and expands it as X-Wing does
(SHAKE-256 to 96 bytes: the ML-KEM-768 seed ``d || z``, then the X25519
secret), so the identity and its public key are X-Wing's, byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from sealstore.errors import AuthenticationError, FormatError, KeyUnavailable
from sealstore.format import canonical_json
from sealstore.keys import DEK_SIZE, DataKey, KeySlot, Refusal
from sealstore.kms.x25519 import write_identity_file

__all__ = ["KEMS", "HpkeIdentity", "HpkeRecipient", "generate_identity", "slot_info"]

KIND = "hpke"
_PREFIX = "hpke:"
_SECRET_TAG = "SEALSTORE-HPKE-IDENTITY:"  # noqa: S105 -- a line prefix, not a secret
_INFO_LABEL = b"sealstore/v1/slot/hpke\x00"
_TAG_SIZE = 16
_MLKEM768_PK = 1184


def _low_order(public: bytes) -> bool:
    """A low-order X25519 point makes every shared secret predictable; refuse it."""
    from nacl.bindings import crypto_scalarmult
    from nacl.exceptions import CryptoError

    try:
        crypto_scalarmult(os.urandom(32), public)
    except (CryptoError, RuntimeError, TypeError):
        return True
    return False


def _x25519_public(raw: bytes) -> Any:
    if len(raw) != 32 or _low_order(raw):
        raise ValueError("not a usable X25519 public key")
    return x25519.X25519PublicKey.from_public_bytes(raw)


def _xwing_public(raw: bytes) -> Any:
    if len(raw) != _MLKEM768_PK + 32:
        raise ValueError(f"an ML-KEM-768 + X25519 public key is {_MLKEM768_PK + 32} bytes")
    try:
        pk_m = mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PK])
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("its ML-KEM-768 half is not a valid public key") from None
    return hpke.MLKEM768X25519PublicKey(pk_m, _x25519_public(raw[_MLKEM768_PK:]))


def _x25519_private(secret: bytes) -> tuple[Any, bytes]:
    sk = x25519.X25519PrivateKey.from_private_bytes(secret)
    return sk, sk.public_key().public_bytes_raw()


def _xwing_private(seed: bytes) -> tuple[Any, bytes]:
    expanded = hashlib.shake_256(seed).digest(96)
    sk_m = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
    sk_x = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
    public = sk_m.public_key().public_bytes_raw() + sk_x.public_key().public_bytes_raw()
    return hpke.MLKEM768X25519PrivateKey(sk_m, sk_x), public


@dataclass(frozen=True)
class Kem:
    """One KEM sealstore offers, with its suite and key encodings."""

    name: str
    kem_id: int
    kem: Any
    enc_size: int
    public_size: int
    public: Callable[[bytes], Any]  # raw public key -> cryptography's (ValueError if unusable)
    private: Callable[[bytes], tuple[Any, bytes]]  # 32-byte secret -> (private key, raw public)

    @property
    def suite(self) -> hpke.Suite:
        return hpke.Suite(self.kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)

    @property
    def blob_size(self) -> int:
        return self.enc_size + DEK_SIZE + _TAG_SIZE


KEMS: dict[str, Kem] = {
    "x25519": Kem("x25519", 0x0020, hpke.KEM.X25519, 32, 32, _x25519_public, _x25519_private),
    "mlkem768x25519": Kem(
        "mlkem768x25519",
        0x647A,
        hpke.KEM.MLKEM768_X25519,
        1120,
        _MLKEM768_PK + 32,
        _xwing_public,
        _xwing_private,
    ),
}
KDF_ID = 0x0001  # HKDF-SHA256
AEAD_ID = 0x0003  # ChaCha20-Poly1305


def _enc(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _dec(text: str, size: int, what: str) -> bytes:
    if len(text) != (size * 8 + 5) // 6 or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise ValueError(f"{what} must be {(size * 8 + 5) // 6} base64url characters")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64url") from None
    if len(raw) != size or _enc(raw) != text:
        raise ValueError(f"{what} must encode {size} bytes")
    return raw


def _kem(name: str) -> Kem:
    try:
        return KEMS[name]
    except KeyError:
        raise ValueError(f"unknown HPKE KEM {name!r} (known: {', '.join(KEMS)})") from None


def slot_info(context: Mapping[str, str]) -> bytes:
    """HPKE ``info`` of a slot: ``"sealstore/v1/slot/hpke\\0" || canonical_json(context)``."""
    return _INFO_LABEL + canonical_json(dict(context))


class HpkeRecipient:
    """Wraps data keys to one HPKE public key."""

    def __init__(self, kem: str, public_key: bytes) -> None:
        self.kem = _kem(kem)
        try:
            self._pk = self.kem.public(public_key)
        except ValueError as exc:
            raise ValueError(f"hpke {kem} recipient is not a valid public key ({exc})") from None
        self.key_id = f"{_PREFIX}{kem}:{_enc(public_key)}"

    @classmethod
    def from_uri(cls, uri: str) -> HpkeRecipient:
        """Parse ``hpke:<kem>:<base64url public key>``.

        Raises:
            ValueError: not a valid recipient (unknown KEM, bad encoding, unusable key).
        """
        scheme, _, rest = uri.partition(":")
        kem, sep, key = rest.partition(":")
        if scheme != "hpke" or not sep:
            raise ValueError("not an hpke recipient (expected hpke:<kem>:<base64url public key>)")
        spec = _kem(kem)
        return cls(kem, _dec(key, spec.public_size, f"hpke {kem} recipient"))

    @classmethod
    def unwrapper_for_slot(cls, slot: KeySlot) -> Refusal:
        return Refusal("needs the HPKE identity file of this recipient (pass -i FILE)")

    def wrap(self, dek: DataKey, context: Mapping[str, str]) -> KeySlot:
        blob = self.kem.suite.encrypt(dek.material(), self._pk, info=slot_info(context))
        return KeySlot(KIND, self.key_id, bytes(blob))

    def __repr__(self) -> str:
        return f"HpkeRecipient({self.key_id[:40]!r}...)"

    @staticmethod
    def identity_from_text(text: str, *, source: str = "identity") -> HpkeIdentity:
        return HpkeIdentity.from_text(text, source=source)


class HpkeIdentity:
    """The secret half: opens ``hpke`` slots made for its recipient."""

    __slots__ = ("_secret", "_sk", "kem", "recipient", "source")

    def __init__(self, kem: str, secret: bytes, *, source: str = "identity") -> None:
        self.kem = _kem(kem)
        if len(secret) != 32:
            raise ValueError("an HPKE identity secret is 32 bytes")
        self._sk, public = self.kem.private(secret)
        self._secret = secret
        self.recipient = f"{_PREFIX}{kem}:{_enc(public)}"
        self.source = source

    @classmethod
    def generate(cls, kem: str = "x25519") -> HpkeIdentity:
        """A fresh identity from the OS CSPRNG."""
        return cls(kem, os.urandom(32))

    @classmethod
    def from_text(cls, text: str, *, source: str = "identity") -> HpkeIdentity:
        """Parse an identity file's text (comment lines start with '#').

        Raises:
            FormatError: no identity line, or a malformed one (never the key itself).
        """
        for line in text.splitlines():
            line = line.strip()
            if line.startswith(_SECRET_TAG):
                kem, sep, secret = line[len(_SECRET_TAG) :].partition(":")
                try:
                    if not sep:
                        raise ValueError
                    return cls(kem, _dec(secret, 32, "identity"), source=source)
                except ValueError:
                    raise FormatError(f"{source}: malformed hpke identity") from None
        raise FormatError(f"{source} is not a sealstore HPKE identity file")

    def to_text(self) -> str:
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (
            f"# sealstore hpke identity ({self.kem.name}) -- keep this file secret and offline\n"
            f"# created: {created}\n# recipient: {self.recipient}\n"
            f"{_SECRET_TAG}{self.kem.name}:{_enc(self._secret)}\n"
        )

    def can_unwrap(self, slot: KeySlot) -> bool:
        return slot.kind == KIND and slot.key_id == self.recipient

    def unwrap(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey:
        """Open a slot made for this identity's recipient.

        Raises:
            KeyUnavailable: another recipient's slot.
            AuthenticationError: a slot that names this recipient but does not
                open under *context*: the slot or the context was changed.
        """
        if not self.can_unwrap(slot):
            raise KeyUnavailable(f"slot is not sealed to {self.source}")
        altered = AuthenticationError(
            f"slot names {self.source}'s recipient but does not open with it under this "
            "context (the slot or the context was changed after sealing)"
        )
        if len(slot.blob) != self.kem.blob_size:
            raise altered
        try:
            dek = self.kem.suite.decrypt(slot.blob, self._sk, info=slot_info(context))
        except (InvalidTag, ValueError):
            # ValueError: an enc that is not a usable X25519 point.
            raise altered from None
        return DataKey(dek)

    def __repr__(self) -> str:
        return f"HpkeIdentity(recipient={self.recipient[:40]!r}...)"

    def __reduce__(self) -> Any:
        raise TypeError("identities cannot be pickled")


def generate_identity(
    path: str | os.PathLike[str] | None = None,
    *,
    kem: str = "x25519",
    overwrite: bool = False,
) -> HpkeIdentity:
    """Make a new HPKE identity; if *path* is given, write it there with mode 0600.

    Raises:
        ValueError: an unknown *kem*, or *path* is not a regular file (with *overwrite*).
        FileExistsError: *path* exists and *overwrite* is false.
    """
    ident = HpkeIdentity.generate(kem)
    if path is not None:
        write_identity_file(path, ident.to_text(), overwrite=overwrite)
    return ident
