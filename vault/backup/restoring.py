"""``backup restore``: a store brought back to a snapshot, checked byte for byte, idempotent."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sealstore.errors import (
    AuthenticationError,
    FormatError,
    NotFound,
    SealstoreError,
)
from sealstore.kms.envelope import IdentitySpec
from sealstore.signing import claimed_body
from sealstore.vault import freshness
from sealstore.vault.auditing import record
from sealstore.vault.backup.copying import (
    ProgressFor,
    Stats,
    _copy,
    _damage,
    _hash_blob,
    _run_copies,
)
from sealstore.vault.backup.escrow import _add_escrow
from sealstore.vault.backup.snapshot import (
    CONFIG,
    Snapshot,
    TagRecord,
    VersionRecord,
    _blob_name,
    _read_doc,
    _verified_snapshots,
    load_snapshot,
)
from sealstore.vault.manifest import (
    FileEntry,
    Manifest,
    loads,
    parse_ref,
    verify_tag,
)
from sealstore.vault.storage import Storage, open_storage


@dataclass
class RestoreReport:
    """What a restore did: versions written, repairs, tags, and what it would not do."""

    snapshot: str
    store: str
    versions: int = 0
    restored: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    untagged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)

    @property
    def changed(self) -> bool:
        return bool(self.restored or self.repaired or self.tags or self.untagged)


def _target_store(
    url: str, snap: Snapshot, config_raw: bytes, config: dict[str, Any], opts: dict[str, Any]
) -> tuple[Any, list[str]]:
    """The store to restore into: the snapshot's store, created there from it if absent."""
    from sealstore.vault.store import Store, _save_pin, _verify_config

    storage = open_storage(url, **opts)
    repaired = []
    try:
        current: bytes | None = storage.read(CONFIG)
    except NotFound:
        current = None
    if current != config_raw:
        keep = False
        if current is not None:
            where = f"{storage.url}/{CONFIG}"
            try:
                doc = loads(current, where)
                claimed = claimed_body("store", doc, what=where)
            except (AuthenticationError, FormatError):
                doc, claimed = {}, {"id": snap.store}  # damaged: put back
            if claimed.get("id") != snap.store:
                raise ValueError(
                    f"{storage.url} holds another store ({claimed.get('id')}), not {snap.store}"
                )
            with contextlib.suppress(AuthenticationError, FormatError):
                _verify_config(doc, config["root"], storage.url)
                keep = True  # the store's own config, valid (signers added since, say)
        if not keep:
            storage.put(CONFIG, config_raw)  # a local root's folders are made by put
            repaired.append(f"store config ({'missing' if current is None else 'damaged'})")
    _save_pin(snap.store, config["root"], storage.url)
    return Store.open(url, **opts), repaired


def _select(
    snap: Snapshot, artifacts: Sequence[str] | None, tenant: str | None, known_good: bool
) -> tuple[list[VersionRecord], list[TagRecord]]:
    versions = [v for v in snap.versions if tenant is None or v.tenant == tenant]
    tags = [t for t in snap.tags if tenant is None or t.tenant == tenant]
    if artifacts:
        refs = [parse_ref(a) for a in artifacts]
        if any(r.tag for r in refs):
            raise ValueError("--artifact takes NAME or NAME:VERSION")

        def wanted(name: str, version: str) -> bool:
            return any(r.name == name and r.version in (None, version) for r in refs)

        versions = [v for v in versions if wanted(v.name, v.version)]
        tags = [t for t in tags if wanted(t.name, t.version)]
        missing = [
            str(r)
            for r in refs
            if not any(v.name == r.name and r.version in (None, v.version) for v in versions)
        ]
        if missing:
            raise NotFound(f"snapshot {snap.id} has no {missing[0]}")
    if known_good:
        from sealstore.vault.safemode import KNOWN_GOOD

        good = {(t.tenant, t.name): t.version for t in tags if t.tag == KNOWN_GOOD}
        if not good:
            raise NotFound(f"snapshot {snap.id} has no version tagged {KNOWN_GOOD}")
        versions = [v for v in versions if good.get((v.tenant, v.name)) == v.version]
        tags = [t for t in tags if good.get((t.tenant, t.name)) == t.version and t.tag != "latest"]
    return versions, tags


def restore(
    url: str,
    snapshot_id: str = "latest",
    *,
    store: Any = None,
    to: str | None = None,
    artifacts: Sequence[str] | None = None,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    known_good: bool = False,
    root: str | None = None,
    threads: int = 4,
    progress_for: ProgressFor | None = None,
    store_options: dict[str, Any] | None = None,
    **storage_options: Any,
) -> RestoreReport:
    """Bring a store back to a snapshot: the versions, their objects and BoMs, and the tags.

    Every object already in the store is hashed; one that is missing or does
    not match is copied from the backup (hashed again on the way). A manifest
    that is missing or fails its signature is put back; a valid one is kept
    (a rotation since the snapshot stays). A version crypto-shredded since
    the snapshot is never brought back. Tags are set to the snapshot's. Run
    twice, the second run changes nothing.

    Args:
        store: the :class:`Store` to restore into, or *to*, a store URL (an
            empty location becomes the snapshot's store, same id and root).
        artifacts: only these (``NAME`` or ``NAME:VERSION``).
        identities: recovery identities: where the snapshot holds escrow
            slots they open, each restored version's manifest gets them (and
            is re-signed by this machine's signing key), so it opens with the
            recovery identity even if every other key is gone.
        known_good: only each artifact's ``known-good`` version and the tags
            naming it; ``latest`` is pointed at it and the artifact's other
            tags are removed -- the store's safe-mode target, repaired.
    """
    from sealstore.vault.store import default_store_url

    dest = open_storage(url, **storage_options)
    snap, config = load_snapshot(dest, snapshot_id, root=root)
    config_raw = _read_doc(dest, snap.config, "the store config")
    report = RestoreReport(snap.id, "")
    if store is None:
        store, report.repaired = _target_store(
            to or default_store_url(), snap, config_raw, config, dict(store_options or {})
        )
    elif store.id != snap.store:
        raise ValueError(f"snapshot {snap.id} is of store {snap.store}, not {store.id}")
    report.store = store.url
    t0 = time.monotonic()
    versions, tags = _select(snap, artifacts, tenant, known_good)
    signers = config["signers"]
    stats = report.stats
    # Versions any snapshot here records as shredded (load_snapshot checks the store id).
    shredded = {
        v.ref for sn in _verified_snapshots(dest, config["root"]) for v in sn.versions if v.shredded
    }
    writes: list[tuple[VersionRecord, Manifest, bytes | None]] = []
    jobs: list[tuple[VersionRecord, FileEntry]] = []
    for rec in sorted(versions, key=lambda v: v.ref):
        try:
            snap_raw = _read_doc(dest, rec.manifest, f"the manifest of {rec.ref}")
            m = Manifest.verify(
                snap_raw,
                signers,
                store=snap.store,
                tenant=rec.tenant,
                name=rec.name,
                version=rec.version,
            )
        except SealstoreError as exc:
            report.problems.append(f"{rec.ref}: {exc}")
            continue
        path = f"{store.version_dir(rec.tenant, rec.name, rec.version)}/manifest.json"
        try:
            current_raw: bytes | None = store.storage.read(path)
        except NotFound:
            current_raw = None
        current = None
        if current_raw is not None:
            with contextlib.suppress(AuthenticationError, FormatError):
                # With the roles: a tombstone a mere publisher signed is not a shred.
                current = store.check_manifest(current_raw, rec.tenant, rec.name, rec.version)
        if not m.shredded and ((current is not None and current.shredded) or rec.ref in shredded):
            # Never un-shred: not when the store says so, nor when any snapshot here
            # recorded the tombstone (the store's copy may have been deleted since).
            report.skipped.append(f"{rec.ref}: crypto-shredded since the snapshot; not restored")
            continue
        if current is not None and current.files != m.files:
            report.problems.append(f"{rec.ref}: the store's manifest lists other files")
            continue
        report.versions += 1
        # A valid manifest in the store is kept (a rotation since); anything else is replaced.
        write = None if current is not None else snap_raw
        if write is not None:
            state = "missing" if current_raw is None else "damaged"
            report.repaired.append(f"manifest of {rec.ref} ({state})")
        writes.append((rec, m, write))
        if m.shredded:
            continue
        if rec.bom:
            bom_path = store.bom_path(rec.tenant, rec.name, rec.version, rec.bom)
            try:
                ok = hashlib.sha256(store.storage.read(bom_path)).hexdigest() == rec.bom
            except NotFound:
                ok = False
            if not ok:
                store.storage.put(bom_path, _read_doc(dest, rec.bom, f"the BoM of {rec.ref}"))
                report.repaired.append(f"BoM of {rec.ref}")
                stats.docs_written += 1
        jobs += [(rec, e) for e in m.files]
    # Each object: hashed where it is; copied from the backup if missing or damaged.
    progress = (
        progress_for("restore", sum(e.object_size for _, e in jobs)) if progress_for else None
    )
    outcomes = _run_copies(
        [_restore_job(dest, store, rec, e, stats, report, progress) for rec, e in jobs], threads
    )
    failed: set[str] = set()
    stopped = f"restore into {store.url} stopped"
    for i, exc in _damage(outcomes, stopped, "nothing unverified was published").items():
        report.problems.append(f"{jobs[i][0].ref}: {exc}")
        failed.add(jobs[i][0].ref)
    store.storage.sync(store.object_path(rec.tenant, e.object) for rec, e in jobs)
    listed: dict[str, dict[tuple[str, str], str]] = {t.tenant: {} for t in tags}
    for rec, _m, write in writes:
        if rec.ref in failed:
            continue
        path = f"{store.version_dir(rec.tenant, rec.name, rec.version)}/manifest.json"
        if write is not None:
            store.storage.put(path, write)
            report.restored.append(rec.ref)
            stats.docs_written += 1
        sha = hashlib.sha256(write if write is not None else store.storage.read(path))
        listed.setdefault(rec.tenant, {})[(rec.name, rec.version)] = sha.hexdigest()
    # A restore moves tags and manifests back on purpose: it writes a new sequence
    # with a serial above any seen (never a rollback), built on the newest one
    # that verifies, or on what the store holds now if none does.
    for t_name, versions_now in sorted(listed.items()):
        freshness.commit(store, t_name, versions=versions_now, rebase=True)
    for rec, m, _write in writes:
        if rec.ref in failed:
            continue
        if identities and rec.escrow and not m.shredded:
            try:
                if _add_escrow(store, rec, identities):
                    report.repaired.append(f"escrow slots added to {rec.ref}")
            except SealstoreError as exc:
                report.problems.append(f"{rec.ref}: escrow: {exc}")
    restored = [rec for rec, _, _ in writes if rec.ref not in failed]
    _restore_tags(dest, store, snap, signers, tags, restored, known_good, report)
    stats.versions = report.versions
    stats.objects = sum(len(m.files) for _, m, _ in writes if not m.shredded)
    stats.seconds = time.monotonic() - t0
    record(
        store,
        "restore",
        tenant=tenant,
        decision="failed" if report.problems else "ok",
        detail={
            "from": dest.url,
            "snapshot": snap.id,
            "versions": report.versions,
            "repaired": len(report.repaired),
            "known_good": bool(known_good),
            "problems": len(report.problems),
        },
    )
    return report


def _restore_job(
    dest: Storage,
    store: Any,
    rec: VersionRecord,
    e: FileEntry,
    stats: Stats,
    report: RestoreReport,
    progress: Callable[[int], None] | None,
) -> Callable[[], None]:
    obj = store.object_path(rec.tenant, e.object)
    blob = _blob_name(e.object_digest)

    def run() -> None:
        try:
            ok = store.storage.size(obj) == e.object_size and _hash_blob(
                store.storage, obj, e.object_digest, progress
            )
        except NotFound:
            ok = False
        if ok:
            stats.add(read=e.object_size)
            return
        report.repaired.append(f"object of {rec.ref}/{e.path}")
        try:
            _copy(
                dest,
                f"objects/{blob}",
                store.storage,
                obj,
                e.object_digest,
                e.object_size,
                stats,
                progress,
            )
        except NotFound:
            raise NotFound(f"object {blob} is missing from the backup") from None
        except AuthenticationError:
            raise AuthenticationError(f"object {blob} is corrupt in the backup") from None

    return run


def _restore_tags(
    dest: Storage,
    store: Any,
    snap: Snapshot,
    signers: Iterable[str],
    tags: Sequence[TagRecord],
    restored: Sequence[VersionRecord],
    known_good: bool,
    report: RestoreReport,
) -> None:
    refs = {rec.ref for rec in restored}
    for t in tags:
        if t.ref in refs:
            _set_tag(dest, store, t, signers, snap, report)
    if not known_good:
        return
    from sealstore.vault.safemode import KNOWN_GOOD

    for rec in sorted(restored, key=lambda r: r.ref):
        # latest -> the known-good version; every other tag of the artifact goes.
        keep = {t.tag for t in tags if (t.tenant, t.name) == (rec.tenant, rec.name)}
        keep |= {"latest", KNOWN_GOOD}
        _point(store, rec.tenant, rec.name, rec.version, "latest", report)
        named = set(store.tag_names(rec.name, tenant=rec.tenant))
        for tag in sorted(named | set(store.tags(rec.name, tenant=rec.tenant))):
            if tag not in keep:
                store.untag(rec.name, tag, tenant=rec.tenant)
                report.untagged.append(f"{rec.tenant}/{rec.name}@{tag}")


def _set_tag(
    dest: Storage,
    store: Any,
    t: TagRecord,
    signers: Iterable[str],
    snap: Snapshot,
    report: RestoreReport,
) -> None:
    where = f"{t.tenant}/{t.name}@{t.tag}"
    try:
        raw = _read_doc(dest, t.doc, f"tag {where}")
        _, digest = verify_tag(
            raw, signers, store=snap.store, tenant=t.tenant, name=t.name, tag=t.tag
        )
        now_digest = hashlib.sha256(store.manifest_bytes(t.name, t.version, tenant=t.tenant))
    except SealstoreError as exc:
        report.problems.append(f"tag {where}: {exc}")
        return
    if digest == now_digest.hexdigest():
        path = f"tenants/{t.tenant}/refs/{t.name}/{t.tag}"
        try:
            current = store.storage.read(path)
        except NotFound:
            current = None
        if current != raw:
            store.storage.put(path, raw)
            report.tags.append(f"{where} -> {t.version}")
        try:
            served = store._read_tag(t.tenant, t.name, t.tag)
        except SealstoreError:
            served = None
        if served != (t.version, digest):
            store._commit(t.tenant, tags={(t.name, t.tag): (t.version, digest)})
        return
    # The manifest changed since (escrow added, a rotation): the old tag no longer names it.
    _point(store, t.tenant, t.name, t.version, t.tag, report)


def _point(
    store: Any, tenant: str, name: str, version: str, tag: str, report: RestoreReport
) -> None:
    """Make *tag* name the version's current manifest, re-signing only if it does not already."""
    where = f"{tenant}/{name}@{tag}"
    try:
        current = store._read_tag(tenant, name, tag)
        digest = hashlib.sha256(store.manifest_bytes(name, version, tenant=tenant)).hexdigest()
        if current == (version, digest):
            return
    except SealstoreError:
        pass
    try:
        store.tag(f"{name}:{version}", tag, tenant=tenant, audit=False)
        report.tags.append(f"{where} -> {version} (re-signed)")
    except SealstoreError as exc:
        report.problems.append(f"tag {where}: {exc}")
