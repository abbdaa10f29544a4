"""Write the DSSE known-answer vectors of this folder (run from the repository root).

    .venv/bin/python tests/data/dsse/generate.py

The key is RFC 8032's Ed25519 test 1 (its seed); every signature is
deterministic, so running this again rewrites the same bytes. The envelopes
are sealstore's own output, frozen; the old-form documents are written here
from the old form's specification (docs/FORMAT.md, "Signed documents"), not
by sealstore, which no longer writes them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root, for tests.signed_docs

from sealstore.format import canonical_json  # noqa: E402
from sealstore.signing import sign_document  # noqa: E402
from tests.signed_docs import SeedSigner, old_form  # noqa: E402

SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
STORE = "0b6c8f4e-2f4a-4c61-9d0e-5a1f3c2b7e90"
SHA = "5f2b" + "0" * 56 + "a1c3"
TIME = "2026-01-01T00:00:00Z"


def bodies(key_id: str) -> dict[str, dict[str, Any]]:
    return {
        "store": {
            "format": "sealstore-store-v1",
            "id": STORE,
            "created": TIME,
            "root": key_id,
            "signers": [key_id],
            "access": {},
        },
        "manifest": {
            "format": "sealstore-manifest-v1",
            "store": STORE,
            "tenant": "default",
            "name": "gpt2",
            "version": "1",
            "created": TIME,
            "parent": None,
            "context": {"tenant": "default", "artifact": "gpt2", "version": "1"},
            "files": [],
            "slots": [],
            "bom_sha256": None,
            "shredded": None,
        },
        "tag": {
            "format": "sealstore-tag-v1",
            "store": STORE,
            "tenant": "default",
            "name": "gpt2",
            "tag": "latest",
            "version": "1",
            "manifest_sha256": SHA,
            "created": TIME,
        },
        "safe-mode": {
            "format": "sealstore-safe-mode-v1",
            "store": STORE,
            "enabled": True,
            "serial": 1,
            "since": TIME,
            "reason": "incident 7: é ü ∑",
        },
        "sequence": {
            "format": "sealstore-sequence-v1",
            "store": STORE,
            "tenant": "default",
            "serial": 3,
            "expires": "2026-01-08T00:00:00Z",
            "lifetime": 604800,
            "artifacts": {"gpt2": {"versions": {"1": SHA}, "tags": {"latest": ["1", SHA]}}},
        },
        "snapshot": {
            "format": "sealstore-snapshot-v1",
            "id": "20260101T000000Z",
            "store": STORE,
            "created": TIME,
            "source": "file:///srv/store",
            "config": SHA,
            "versions": [],
            "tags": [],
            "objects": {},
        },
        "audit-checkpoint": {
            "format": "sealstore-audit-checkpoint-v1",
            "stream": "host-1",
            "seq": 41,
            "head": SHA,
            "time": TIME,
        },
    }


def main() -> None:
    signer = SeedSigner(SEED)
    (HERE / "key.json").write_text(
        json.dumps({"seed": SEED.hex(), "keyid": signer.signing_key_id}, indent=1) + "\n"
    )
    for kind, body in bodies(signer.signing_key_id).items():
        (HERE / f"{kind}.payload.json").write_bytes(canonical_json(body))
        env = sign_document(kind, body, signer)
        (HERE / f"{kind}.envelope.json").write_text(
            json.dumps(env, indent=1, sort_keys=True) + "\n"
        )
        old = old_form(kind, body, signer)
        (HERE / f"{kind}.legacy.json").write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
