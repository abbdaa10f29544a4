"""Reading and editing signed documents in tests, as an attacker or a damaged disk would.

The fields of a DSSE envelope are in its base64 payload; these helpers read
them without a signature check and write an edited payload that keeps the old
signature (so it no longer verifies).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealstore.format import canonical_json
from sealstore.signing import is_envelope, key_id_for, signer_ids


def fields(doc: dict[str, Any]) -> dict[str, Any]:
    """An envelope's payload fields, or an old-form document's own, unverified."""
    if is_envelope(doc):
        return json.loads(base64.b64decode(doc["payload"]))
    return {k: v for k, v in doc.items() if k not in ("signer", "signature")}


def signer(doc: dict[str, Any]) -> str:
    """The one key id a document names as its signer."""
    [key_id] = signer_ids(doc)
    return key_id


def with_fields(doc: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """*doc* with its fields replaced by *body*, its signature kept (an edit)."""
    assert is_envelope(doc), "not a DSSE envelope"
    return dict(doc, payload=base64.b64encode(canonical_json(body)).decode("ascii"))


def edited(doc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """*doc* with top-level fields changed, its signature kept."""
    return with_fields(doc, dict(fields(doc), **changes))


class SeedSigner:
    """A :class:`~sealstore.signing.Signer` over a fixed Ed25519 seed (vectors, tests)."""

    def __init__(self, seed: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.signing_key_id = key_id_for(self._key.public_key().public_bytes_raw())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def old_form(domain: str, body: dict[str, Any], signer: Any) -> dict[str, Any]:
    """A document as sealstore wrote it before DSSE (docs/FORMAT.md, "The old form"),
    written here from that specification: Ed25519 over ``b"sealstore/v1/" + domain +
    b"\\x00" + canonical JSON`` of the body with its ``signer`` field."""
    doc = dict(body, signer=signer.signing_key_id)
    sig = signer.sign(b"sealstore/v1/" + domain.encode() + b"\x00" + canonical_json(doc))
    return dict(doc, signature=base64.b64encode(sig).decode("ascii"))
