"""Reading and editing signed documents in tests, as an attacker or a damaged disk would.

The fields of a DSSE envelope are in its base64 payload; these helpers read
them without a signature check and write an edited payload that keeps the old
signature (so it no longer verifies).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from sealstore.format import canonical_json
from sealstore.signing import is_envelope, signer_ids


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
