"""Ed25519 signatures over canonical JSON documents (manifests, tags, store config).

A signer is anything with a ``key_id`` (``"ed25519:" + base64(public key)``)
and ``sign(message) -> bytes``; the local keyring is one. Every signed
document carries its signer's key id and the signature over the document's
canonical JSON without the ``signature`` field, prefixed with a domain string
so a signature on one kind of document is never valid for another.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sealstore.errors import AuthenticationError, FormatError
from sealstore.format import canonical_json

__all__ = [
    "Signer",
    "key_id_for",
    "public_key_bytes",
    "sign_document",
    "verify_document",
]

PREFIX = "ed25519:"


@runtime_checkable
class Signer(Protocol):
    """Signs messages with an Ed25519 key it keeps to itself."""

    @property
    def signing_key_id(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


def key_id_for(public: bytes) -> str:
    """The key id of a 32-byte Ed25519 public key."""
    if len(public) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return PREFIX + base64.b64encode(public).decode("ascii")


def public_key_bytes(key_id: str) -> bytes:
    """The public key a key id names.

    Raises:
        FormatError: not an ``ed25519:`` key id.
    """
    if not isinstance(key_id, str) or not key_id.startswith(PREFIX):
        raise FormatError(f"not an Ed25519 key id: {str(key_id)[:80]!r}")
    try:
        raw = base64.b64decode(key_id[len(PREFIX) :].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise FormatError("malformed Ed25519 key id") from None
    if len(raw) != 32:
        raise FormatError("malformed Ed25519 key id")
    return raw


def _message(domain: str, body: Mapping[str, Any]) -> bytes:
    return b"sealstore/v1/" + domain.encode() + b"\x00" + canonical_json(dict(body))


def sign_document(domain: str, body: Mapping[str, Any], signer: Signer) -> dict[str, Any]:
    """*body* with ``signer`` and ``signature`` fields added.

    Raises:
        ValueError: *body* already carries a signature.
    """
    if "signature" in body:
        raise ValueError("document is already signed")
    doc = dict(body, signer=signer.signing_key_id)
    sig = signer.sign(_message(domain, doc))
    return dict(doc, signature=base64.b64encode(sig).decode("ascii"))


def verify_document(
    domain: str, doc: Mapping[str, Any], trusted: Iterable[str], *, what: str
) -> dict[str, Any]:
    """Check *doc*'s signature against the *trusted* key ids; return the body.

    Raises:
        AuthenticationError: unsigned, signed by a key not in *trusted*, or
            the signature does not verify (the document was edited).
    """
    signer, sig = doc.get("signer"), doc.get("signature")
    if not isinstance(signer, str) or not isinstance(sig, str):
        raise AuthenticationError(f"{what} is not signed")
    if signer not in set(trusted):
        raise AuthenticationError(f"{what} is signed by an untrusted key {signer}")
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        raw = base64.b64decode(sig.encode("ascii"), validate=True)
        Ed25519PublicKey.from_public_bytes(public_key_bytes(signer)).verify(
            raw, _message(domain, body)
        )
    except (InvalidSignature, binascii.Error, UnicodeEncodeError, ValueError, FormatError):
        raise AuthenticationError(f"{what}: signature does not verify (edited?)") from None
    return body
