"""Key escrow: each version's DEK also wrapped to offline recovery recipients.

Done at backup time (the DEK must open here, once); at restore time the escrow
slots join the version's manifest only after they prove to open it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

from sealstore.errors import (
    KeyUnavailable,
)
from sealstore.format import Preamble, read_preamble
from sealstore.keys import KeySlot
from sealstore.kms.envelope import IdentitySpec
from sealstore.vault.backup.snapshot import VersionRecord
from sealstore.vault.manifest import (
    Manifest,
)


def _first_preamble(store: Any, m: Manifest) -> Preamble | None:
    """The preamble of the version's first object: what its DEK must commit to."""
    if not m.files:
        return None
    with store.storage.open_read(store.object_path(m.tenant, m.files[0].object)) as fp:
        return read_preamble(fp)


def _escrow(
    store: Any,
    m: Manifest,
    recipients: Sequence[str],
    identities: Sequence[IdentitySpec],
    prev: VersionRecord | None,
) -> tuple[KeySlot, ...]:
    """The version's DEK wrapped to each recovery recipient (carried over when already done)."""
    from sealstore.kms.registry import wrapper_for
    from sealstore.vault.pull import unwrap_version_key

    have = {s.key_id: s for s in (prev.escrow if prev else ())}
    todo = [r for r in recipients if r not in have]
    slots = [have[r] for r in recipients if r in have]
    if todo:
        try:
            dek = unwrap_version_key(m, _first_preamble(store, m), identities)
        except KeyUnavailable as exc:
            raise KeyUnavailable(
                f"cannot escrow {m.tenant}/{m.name}:{m.version} to the recovery key: {exc}"
            ) from None
        with dek:
            slots += [wrapper_for(r).wrap(dek, m.context) for r in todo]
    return tuple(slots)


def _add_escrow(store: Any, rec: VersionRecord, identities: Sequence[IdentitySpec]) -> bool:
    """Add the snapshot's escrow slots to the version's manifest, once they prove to open it."""
    from sealstore.vault.lifecycle import _retag
    from sealstore.vault.pull import unwrap_version_key

    m, raw = store.manifest_with_bytes(f"{rec.name}:{rec.version}", tenant=rec.tenant)
    present = [s.to_json() for s in m.slots]
    missing = [s for s in rec.escrow if s.to_json() not in present]
    if not missing:
        return False
    # Proof first: the escrow opens, to the key the objects commit to.
    escrow_only = dataclasses.replace(m, slots=tuple(missing))
    with unwrap_version_key(escrow_only, _first_preamble(store, m), identities):
        pass
    signer = store.require("admin", rec.tenant)
    new = dataclasses.replace(m, slots=(*m.slots, *missing), signer=signer.signing_key_id)
    tags = _retag(store, m, hashlib.sha256(raw).hexdigest(), rec.tenant)
    store.replace_manifest(m, raw, new.sign(signer))
    for tag in tags:  # every tag that named the old manifest, made after the snapshot too
        store.tag(f"{m.name}:{m.version}", tag, tenant=rec.tenant, audit=False)
    return True
