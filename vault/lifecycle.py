"""Changing versions after the push: crypto-shred, key rotation, garbage collection.

Rotation rewrites only the manifest (the slots live there, FORMAT.md), never
an object. Crypto-shredding replaces the manifest with a signed tombstone
that keeps the file list but no key slot, then deletes the objects: with the
wrapped DEK gone from the store, a copy of the ciphertext kept elsewhere no
longer opens with any key the store's users hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from typing import Any

from sealstore.format import read_preamble
from sealstore.kms.envelope import IdentitySpec
from sealstore.kms.rotate import rotate_slots
from sealstore.vault.auditing import record
from sealstore.vault.manifest import Manifest, check_name, now

__all__ = ["check_keep_last", "gc", "prune", "rotate", "shred"]


def _retag(store: Any, m: Manifest, old_digest: str, tenant: str) -> list[str]:
    """Re-sign the tags that named the replaced manifest; returns them."""
    from sealstore.errors import SealstoreError

    moved = []
    for tag in _all_tags(store, tenant, m.name):
        try:
            version, digest = store._read_tag(tenant, m.name, tag)
        except SealstoreError:
            continue
        if version == m.version and digest == old_digest:
            moved.append(tag)
    return moved


def _all_tags(store: Any, tenant: str, name: str) -> list[str]:
    """Tags of the artifact: its tag files and those its tenant's sequence lists."""
    return sorted(set(store.tag_names(name, tenant=tenant)) | set(store.tags(name, tenant=tenant)))


def rotate(
    store: Any,
    ref: str,
    to: Sequence[str],
    *,
    remove: Sequence[str] = (),
    identities: Sequence[IdentitySpec] = (),
    tenant: str | None = None,
) -> Manifest:
    """Re-wrap a version's DEK: add a slot per *to* key, drop the *remove* keys' slots.

    Only the manifest is rewritten (and re-signed, with the tags that named
    it); no object is touched.

    Raises:
        ValueError: nothing to do, or no slot would remain.
        KeyUnavailable: the current slots do not open here.
    """
    from sealstore.vault.store import default_tenant

    tenant = check_name(tenant or default_tenant(), "tenant")
    signer = store.require("admin", tenant)  # before any key service is asked for the key
    store.renew(tenant)
    m, old = store.manifest_with_bytes(ref, tenant=tenant)
    if m.shredded:
        raise ValueError(f"{m.name}:{m.version} was crypto-shredded; nothing to rotate")
    with store.storage.open_read(store.object_path(tenant, m.files[0].object)) as fp:
        pre = read_preamble(fp)
    slots = rotate_slots(
        pre, to, remove=remove, identities=identities, slots=m.slots, context=m.context
    )
    new = dataclasses.replace(m, slots=tuple(slots), signer=signer.signing_key_id)
    tags = _retag(store, m, hashlib.sha256(old).hexdigest(), tenant)
    store.replace_manifest(m, old, new.sign(signer))
    for tag in tags:
        store.tag(f"{m.name}:{m.version}", tag, tenant=tenant, audit=False)
    record(
        store,
        "rotate",
        tenant=tenant,
        artifact=m.name,
        version=m.version,
        detail={"signer": signer.signing_key_id, "keys": [s.key_id for s in slots]},
    )
    return new


def shred(store: Any, ref: str, *, tenant: str | None = None) -> Manifest:
    """Crypto-shred a version: destroy its key slots, delete its objects and its tags.

    Idempotent: run again after an interruption, it finishes the deletions.

    Returns:
        The signed tombstone manifest now stored for the version.
    """
    from sealstore.vault.store import _version_key, default_tenant

    tenant = check_name(tenant or default_tenant(), "tenant")
    store.renew(tenant)
    m, raw = store.manifest_with_bytes(ref, tenant=tenant)
    tomb = m
    if not m.shredded:
        signer = store.require("admin", tenant)
        tomb = dataclasses.replace(m, slots=(), shredded=now(), signer=signer.signing_key_id)
        # The tombstone replaces the manifest first: from this write on no slot exists.
        store.replace_manifest(m, raw, tomb.sign(signer))
    for entry in m.files:
        store.storage.delete(store.object_path(tenant, entry.object))
    latest_moved = False
    dropped: dict[tuple[str, str], None] = {}
    for tag in _all_tags(store, tenant, m.name):
        try:
            version, _ = store._read_tag(tenant, m.name, tag)
        except Exception:
            version = m.version
        if version == m.version:
            store.storage.delete(f"tenants/{tenant}/refs/{m.name}/{tag}")
            dropped[(m.name, tag)] = None
            latest_moved |= tag == "latest"
    if dropped:
        store._commit(tenant, tags=dropped)
    if latest_moved:
        for v in sorted(store.versions(m.name, tenant=tenant), key=_version_key, reverse=True):
            if not store.manifest(f"{m.name}:{v}", tenant=tenant).shredded:
                store.tag(f"{m.name}:{v}", "latest", tenant=tenant, audit=False)
                break
    record(
        store,
        "shred",
        tenant=tenant,
        artifact=m.name,
        version=m.version,
        detail={"signer": tomb.signer, "shredded": tomb.shredded},
    )
    return tomb


def gc(store: Any, *, tenant: str | None = None, grace: float = 3600.0) -> list[str]:
    """Delete objects no manifest of the tenant references, older than *grace* seconds.

    What an interrupted push left behind: finished objects with no manifest,
    and unfinished uploads (S3 multipart uploads a killed writer could not
    abort, local temporary files). The grace period protects pushes in
    flight, whose objects are not referenced until their manifest lands.

    Returns:
        The deleted paths.
    """
    from sealstore.vault.store import default_tenant

    tenant = check_name(tenant or default_tenant(), "tenant")
    referenced = set()
    boms = set()
    for name in store.storage.list(f"tenants/{tenant}/artifacts"):
        for v in store.versions(name, tenant=tenant):
            m = store.manifest(f"{name}:{v}", tenant=tenant)
            if m.bom_sha256:
                boms.add(store.bom_path(tenant, name, v, m.bom_sha256))
            if not m.shredded:  # a tombstone's objects are garbage (an interrupted rm)
                referenced |= {e.object for e in m.files}
    cutoff = time.time() - grace
    deleted = [
        f"(upload) {p}" for p in store.storage.abort_stale_uploads(cutoff, f"objects/{tenant}/")
    ]
    for rel in store.storage.walk(f"tenants/{tenant}/artifacts"):
        # BoMs of pushes that lost a race or died before their manifest.
        if rel.endswith(".cdx.json") and rel not in boms and store.storage.modified(rel) < cutoff:
            store.storage.delete(rel)
            deleted.append(rel)
    for rel in store.storage.walk(f"objects/{tenant}"):
        obj = rel.rsplit("/", 1)[-1]
        if obj in referenced:
            continue
        if store.storage.modified(rel) > cutoff:
            continue
        store.storage.delete(rel)
        deleted.append(rel)
    return deleted


def check_keep_last(keep_last: Any) -> int:
    """*keep_last*, checked: a whole number of at least 1 (not a bool).

    Raises:
        ValueError: anything else.
    """
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
        raise ValueError(f"keep_last must be a whole number of at least 1, not {keep_last!r}")
    return keep_last


def prune(
    store: Any,
    name: str,
    *,
    keep_last: int,
    tenant: str | None = None,
    keep: Sequence[str] = (),
) -> list[str]:
    """Crypto-shred the numbered versions of *name* older than its *keep_last* newest.

    A retention policy for checkpoints. Versions a tag points to (``latest``,
    ``known-good``...) and those in *keep* are never removed (they still
    count among the newest); versions already shredded are not counted. Each removal is
    a :func:`shred` (tombstone manifest, objects deleted, audited).

    Args:
        store: the :class:`~sealstore.vault.store.Store`.
        name: the artifact.
        keep_last: how many of the newest versions to keep (at least 1).
        tenant: the tenant (default ``$SEALSTORE_TENANT`` or ``default``).
        keep: versions never to remove (the one just written).

    Returns:
        The versions shredded, oldest first.

    Raises:
        ValueError: *keep_last* below 1.
        Refused: this process's signer lacks the admin role shred needs.
    """
    from sealstore.vault.store import _version_key, default_tenant

    check_keep_last(keep_last)
    tenant = check_name(tenant or default_tenant(), "tenant")
    # Every tag must be read: one that fails (a damaged file, a backend error)
    # could be protecting a version, and shredding cannot be undone.
    protected = set(keep) | set(store.tags(name, tenant=tenant, skip_damaged=False).values())
    live = [
        v
        for v in sorted(store.versions(name, tenant=tenant), key=_version_key)
        if v.isdigit() and not store.manifest(f"{name}:{v}", tenant=tenant).shredded
    ]
    # The newest keep_last stay; of the older ones, a protected version stays too.
    older = [v for v in live[: max(0, len(live) - keep_last)] if v not in protected]
    removed = []
    for v in older:
        shred(store, f"{name}:{v}", tenant=tenant)
        removed.append(v)
    return removed
