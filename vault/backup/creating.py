"""``backup create``: an incremental, content-addressed snapshot of the whole store."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sealstore.errors import (
    AuthenticationError,
    BackendError,
    FormatError,
    NotFound,
    SealstoreError,
)
from sealstore.keys import KeySlot
from sealstore.kms.envelope import IdentitySpec
from sealstore.signing import sign_document
from sealstore.vault import freshness
from sealstore.vault.auditing import record
from sealstore.vault.backup.copying import ProgressFor, Stats, _copy, _damage, _run_copies
from sealstore.vault.backup.escrow import _escrow
from sealstore.vault.backup.locks import _claim, _lock
from sealstore.vault.backup.snapshot import (
    CONFIG,
    Snapshot,
    TagRecord,
    VersionRecord,
    _blob_name,
    _doc_path,
    _manifest_from,
    _new_id,
    _verified_snapshots,
    snapshot_ids,
)
from sealstore.vault.manifest import (
    FileEntry,
    Manifest,
    dumps,
    now,
    verify_tag,
)
from sealstore.vault.storage import open_storage


@dataclass
class _Planned:
    record: VersionRecord
    manifest: Manifest | None  # None: carried over from the previous snapshot
    docs: dict[str, bytes]


def create(
    store: Any,
    to: str,
    *,
    recovery_recipients: Sequence[str] = (),
    identities: Sequence[IdentitySpec] = (),
    threads: int = 4,
    progress_for: ProgressFor | None = None,
    force: bool = False,
    **storage_options: Any,
) -> tuple[Snapshot, Stats]:
    """Back the whole store (every tenant) up to *to*; returns the new snapshot.

    Incremental: objects and documents the location already holds (named by
    their digests) are neither read nor copied. Each object copied is hashed
    on the way and must match its signed manifest.

    Damage found in the store does not stop the backup: a version whose
    manifest fails verification, or whose new objects are missing or
    corrupt, is carried over from the previous snapshot if that one had it,
    and otherwise left out. Either way it is named in ``Snapshot.damaged``
    and the CLI exits non-zero.

    Args:
        recovery_recipients: ``hpke:`` or ``x25519:`` recipients; each version's DEK is
            also wrapped to them in the snapshot (key escrow). Needs a key
            that opens each new version (*identities*, or its slots' keys).
        progress_for: called with (label, total bytes) once the copy is
            planned; returns the per-byte progress callback.

    Raises:
        KeyUnavailable: escrow was asked for and a version's DEK does not open here.
        BackendError: the store or the backup location failed (the run can be repeated).
    """
    for r in recovery_recipients:
        # Escrow opens offline with an identity file alone: x25519 or HPKE recipients.
        if not r.startswith(("x25519:", "hpke:")):
            raise ValueError(f"a recovery recipient is an hpke: or x25519: key, not {r[:40]!r}")
        from sealstore.kms.registry import wrapper_for

        wrapper_for(r)  # malformed recipients fail before any work
    t0 = time.monotonic()
    stats = Stats()
    # A snapshot must be signed, by an admin of every tenant: find out before copying.
    signer = store.require("admin", "*")
    dest = open_storage(to, **storage_options)
    _claim(dest, store.id)
    with _lock(dest, "backup", "prune", force=force):
        prev = next(_verified_snapshots(dest, store.root_key), None)
        prev_versions = {v.ref: v for v in prev.versions} if prev else {}
        prev_tags = {(t.tenant, t.name, t.tag): t for t in prev.tags} if prev else {}
        config_raw = store.storage.read(CONFIG)
        planned: list[_Planned] = []
        tags: list[tuple[TagRecord, bytes]] = []
        damaged: list[str] = []

        def carried(ref: str, why: str) -> _Planned | None:
            """Record damage to *ref*; the previous snapshot's copy of it, if there is one."""
            old = prev_versions.get(ref)
            damaged.append(f"{ref}: {why}" + ("; kept from the previous snapshot" if old else ""))
            return _Planned(old, None, {}) if old is not None else None

        sequences: dict[str, bytes] = {}
        for tenant in store.storage.list("tenants"):
            # The tenant's signed sequence: recorded, and every tag file checked
            # against it (an older tag copied back is damage, not the tag).
            try:
                seq = store.sequence(tenant)
            except SealstoreError as exc:
                damaged.append(f"sequence of tenant {tenant}: {exc}")
                seq = None
            if seq is not None:
                sequences[tenant] = freshness.document(store, tenant, seq)
            names = set(store.storage.list(f"tenants/{tenant}/artifacts"))
            names |= set(store.storage.list(f"tenants/{tenant}/refs"))
            for name in sorted(names):
                for version in store.versions(name, tenant=tenant):
                    ref = f"{tenant}/{name}:{version}"
                    try:
                        m, raw = store.manifest_with_bytes(f"{name}:{version}", tenant=tenant)
                        sha = hashlib.sha256(raw).hexdigest()
                        docs = {sha: raw}
                        bom = None
                        if m.bom_sha256 and not m.shredded:
                            bom = m.bom_sha256
                            docs[bom] = store.bom(f"{name}:{version}", tenant=tenant)
                    except (AuthenticationError, FormatError, NotFound) as exc:
                        if (c := carried(ref, str(exc))) is not None:
                            planned.append(c)
                        continue
                    escrow: tuple[KeySlot, ...] = ()
                    if recovery_recipients and not m.shredded:
                        try:
                            escrow = _escrow(
                                store, m, recovery_recipients, identities, prev_versions.get(ref)
                            )
                        except (AuthenticationError, FormatError, NotFound) as exc:
                            # A damaged first object; no key is no damage (KeyUnavailable).
                            if (c := carried(ref, f"cannot escrow: {exc}")) is not None:
                                planned.append(c)
                            continue
                    rec = VersionRecord(
                        tenant,
                        name,
                        version,
                        sha,
                        bom,
                        bool(m.shredded),
                        escrow,
                    )
                    planned.append(_Planned(rec, m, docs))
                for tag in store.storage.list(f"tenants/{tenant}/refs/{name}"):
                    path = f"tenants/{tenant}/refs/{name}/{tag}"
                    try:
                        raw = store.storage.read(path)
                        tv, _ = verify_tag(
                            raw,
                            store.signers_for(tenant, "publisher"),
                            store=store.id,
                            tenant=tenant,
                            name=name,
                            tag=tag,
                        )
                        if seq is not None and seq.tag(name, tag) != (tv, _):
                            raise AuthenticationError(
                                f"names {name}:{tv}, not what the tenant's signed sequence says "
                                "(rolled back?)"
                            )
                    except (AuthenticationError, FormatError, NotFound, ValueError) as exc:
                        damaged.append(f"tag {tenant}/{name}@{tag}: {exc}")
                        old_tag = prev_tags.get((tenant, name, tag))
                        if old_tag is not None:
                            tags.append((old_tag, b""))
                        continue
                    tags.append(
                        (TagRecord(tenant, name, tag, tv, hashlib.sha256(raw).hexdigest()), raw)
                    )

        # A version the previous snapshot had, whose manifest is gone from the store,
        # is damage too (Store.versions lists only versions with a manifest).
        listed = {p.record.ref for p in planned} | {d.split(": ", 1)[0] for d in damaged}
        for ref in sorted(set(prev_versions) - listed):
            if (c := carried(ref, "its manifest is missing from the store")) is not None:
                planned.append(c)

        # Objects: the location's listing once; copy only digests it lacks.
        have = dest.walk("objects")
        todo: dict[str, tuple[FileEntry, _Planned]] = {}
        for p in planned:
            if p.manifest is not None and not p.manifest.shredded:
                for e in p.manifest.files:
                    blob = _blob_name(e.object_digest)
                    if have.get(f"objects/{blob}") != e.object_size:
                        todo.setdefault(blob, (e, p))
        total = sum(e.object_size for e, _ in todo.values())
        progress = progress_for("backup", total) if progress_for else None

        def job(blob: str, e: FileEntry, p: _Planned) -> Callable[[], None]:
            src = store.object_path(p.record.tenant, e.object)
            return lambda: _copy(
                store.storage,
                src,
                dest,
                f"objects/{blob}",
                e.object_digest,
                e.object_size,
                stats,
                progress,
            )

        blobs = list(todo)
        outcomes = _run_copies([job(b, *todo[b]) for b in blobs], threads)
        damage = _damage(outcomes, f"backup to {dest.url} stopped", "what was copied stays")
        failed = {id(todo[blobs[i]][1]): str(exc) for i, exc in damage.items()}
        final: list[_Planned] = []
        for p in planned:
            why = failed.get(id(p))
            if why is None:
                final.append(p)
                continue
            # A shred that ran meanwhile deletes objects: then the tombstone is the version now.
            rec = p.record
            try:
                m, raw = store.manifest_with_bytes(f"{rec.name}:{rec.version}", tenant=rec.tenant)
            except SealstoreError:
                m = None
            if m is not None and m.shredded:
                sha = hashlib.sha256(raw).hexdigest()
                tomb = VersionRecord(rec.tenant, rec.name, rec.version, sha, shredded=True)
                final.append(_Planned(tomb, m, {sha: raw}))
            elif (c := carried(rec.ref, why)) is not None:
                final.append(c)
        dest.sync(f"objects/{b}" for b in blobs)

        # Documents (small; content-named, so rewriting one is harmless).
        have_docs = set(dest.list("docs"))
        docs: dict[str, bytes] = {hashlib.sha256(config_raw).hexdigest(): config_raw}
        for p in final:
            docs.update(p.docs)
        kept_versions = {p.record.ref for p in final}
        tag_records = []
        for t, raw in tags:
            if t.ref not in kept_versions:
                continue
            tag_records.append(t)
            if raw:
                docs[t.doc] = raw
        for data in sequences.values():
            docs[hashlib.sha256(data).hexdigest()] = data
        for sha, data in docs.items():
            if f"sha256-{sha}" not in have_docs:
                dest.put(_doc_path(sha), data)
                stats.docs_written += 1

        objects: dict[str, int] = {}
        for p in final:
            m = p.manifest
            if m is None:  # carried: its objects are the previous snapshot's
                m = _manifest_from(dest, p.record, store.signers, store.id)
            if not m.shredded:
                for e in m.files:
                    objects[_blob_name(e.object_digest)] = e.object_size
        created = now()
        snap = Snapshot(
            id=_new_id(snapshot_ids(dest)),
            store=store.id,
            created=created,
            source=store.url,
            config=hashlib.sha256(config_raw).hexdigest(),
            versions=tuple(p.record for p in final),
            tags=tuple(tag_records),
            objects=objects,
            recipients=tuple(recovery_recipients),
            damaged=tuple(damaged),
            sequences={t: hashlib.sha256(d).hexdigest() for t, d in sequences.items()},
        )
        # Every blob the snapshot names must be there now: a prune that ran
        # meanwhile despite the locks must not leave a snapshot naming missing blobs.
        present = dest.walk("objects")
        gone = [b for b, n in objects.items() if present.get(f"objects/{b}") != n]
        if gone:
            raise BackendError(
                f"backup to {dest.url}: {len(gone)} object(s) vanished from the location while "
                "it ran (a concurrent prune?); run it again"
            )
        doc = sign_document("snapshot", snap.body(), signer)
        dest.put_new(f"snapshots/{snap.id}.json", dumps(doc))  # the commit point
        snap = dataclasses.replace(snap, signer=signer.signing_key_id)
    stats.versions = len(snap.versions)
    stats.objects = len(snap.objects)
    stats.seconds = time.monotonic() - t0
    record(
        store,
        "backup",
        decision="failed" if snap.damaged else "ok",
        detail={
            "to": dest.url,
            "snapshot": snap.id,
            "versions": stats.versions,
            "copied": stats.copied,
            "damaged": len(snap.damaged),
        },
    )
    return snap, stats
