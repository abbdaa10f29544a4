"""Backups of a store: incremental, content-addressed, signed snapshots; verify; restore; prune.

Layout of a backup location (any fsspec URL the store supports: file://, s3://, memory://)::

    BACKUP/sealstore-backup.json     which store this location backs up
    BACKUP/snapshots/ID.json         a signed snapshot: manifests, BoMs, tags, object digests
    BACKUP/objects/blake3-HEX        a store object (ciphertext), named by its digest
    BACKUP/docs/sha256-HEX           the store config, a manifest, a BoM or a tag, by SHA-256
    BACKUP/locks/backup|prune        a backup or prune in flight (they exclude each other)

Only what the store itself holds leaves it: sealed objects (key slots
detached), signed manifests (whose slots are wrapped DEKs), BoMs and tags.
Never a plaintext byte or an unwrapped key. With recovery recipients each
version's DEK is also wrapped to an offline X25519 key, inside the signed
snapshot, so losing the KMS or Vault key loses nothing.

Everything in a backup is named by its content, so a backup copies exactly
what the location lacks: an unchanged store reads no object data at all. A
snapshot is written last and only after every blob it names is in place: a
backup that dies leaves blobs and no snapshot, and its re-run copies only the
rest. Restoring checks every byte against the signed manifests before it
counts as done, repairs what is missing or damaged, never resurrects a
version crypto-shredded since, and is idempotent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sealstore.errors import (
    AuthenticationError,
    BackendError,
    FormatError,
    KeyUnavailable,
    NotFound,
    SealstoreError,
)
from sealstore.format import Preamble, read_preamble
from sealstore.keys import KeySlot
from sealstore.kms.envelope import IdentitySpec
from sealstore.parallel import run_jobs
from sealstore.signing import sign_document, verify_document
from sealstore.vault import freshness
from sealstore.vault.auditing import record
from sealstore.vault.digest import ObjectHasher, digests_equal
from sealstore.vault.manifest import (
    FileEntry,
    Manifest,
    check_name,
    dumps,
    loads,
    now,
    parse_ref,
    verify_tag,
)
from sealstore.vault.s3limits import timed_out
from sealstore.vault.storage import Storage, open_storage

__all__ = [
    "BackupVerifyResult",
    "RestoreReport",
    "Snapshot",
    "Stats",
    "create",
    "list_snapshots",
    "load_snapshot",
    "prune",
    "restore",
    "verify",
]

REPO = "sealstore-backup.json"
REPO_FORMAT = "sealstore-backup-v1"
SNAPSHOT_FORMAT = "sealstore-snapshot-v1"
CONFIG = "sealstore.json"
LOCK_MAX_AGE = 24 * 3600.0  # a lock older than this is a killed process's
_BLOCK = 8 << 20
_SNAPSHOT_ID = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9a-f]{8}(\.[0-9a-f]{4})*")

ProgressFor = Callable[[str, int], Callable[[int], None]]


# -- the records a snapshot holds ------------------------------------------------------


@dataclass(frozen=True)
class VersionRecord:
    """One version in a snapshot: its manifest and BoM (by SHA-256) and its escrow slots."""

    tenant: str
    name: str
    version: str
    manifest: str
    bom: str | None = None
    shredded: bool = False
    escrow: tuple[KeySlot, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.tenant}/{self.name}:{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "name": self.name,
            "version": self.version,
            "manifest": self.manifest,
            "bom": self.bom,
            "shredded": self.shredded,
            "escrow": [s.to_json() for s in self.escrow],
        }

    @classmethod
    def from_json(cls, d: Any) -> VersionRecord:
        try:
            rec = cls(
                tenant=check_name(d["tenant"], "tenant"),
                name=check_name(d["name"], "artifact name"),
                version=check_name(d["version"], "version"),
                manifest=_hex(d["manifest"]),
                bom=None if d.get("bom") is None else _hex(d["bom"]),
                shredded=bool(d.get("shredded", False)),
                escrow=tuple(KeySlot.from_json(s) for s in d.get("escrow", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"snapshot version record is malformed: {exc}") from None
        return rec


@dataclass(frozen=True)
class TagRecord:
    tenant: str
    name: str
    tag: str
    version: str
    doc: str  # SHA-256 of the signed tag file

    @property
    def ref(self) -> str:
        """The version the tag names, as ``TENANT/NAME:VERSION`` (like ``VersionRecord.ref``)."""
        return f"{self.tenant}/{self.name}:{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("tenant", "name", "tag", "version", "doc")}

    @classmethod
    def from_json(cls, d: Any) -> TagRecord:
        try:
            return cls(
                tenant=check_name(d["tenant"], "tenant"),
                name=check_name(d["name"], "artifact name"),
                tag=check_name(d["tag"], "tag"),
                version=check_name(d["version"], "version"),
                doc=_hex(d["doc"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"snapshot tag record is malformed: {exc}") from None


@dataclass(frozen=True)
class Snapshot:
    """A verified snapshot: what the store held when the backup ran."""

    id: str
    store: str
    created: str
    source: str
    config: str  # SHA-256 of the store config document
    versions: tuple[VersionRecord, ...]
    tags: tuple[TagRecord, ...]
    objects: dict[str, int]  # blob name (blake3-HEX) -> size
    recipients: tuple[str, ...] = ()
    damaged: tuple[str, ...] = ()
    signer: str | None = None
    # tenant -> SHA-256 of its signed sequence document (sealstore.vault.freshness)
    sequences: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(self.objects.values())

    def docs(self) -> set[str]:
        out = {self.config}
        for v in self.versions:
            out.add(v.manifest)
            if v.bom:
                out.add(v.bom)
        out |= {t.doc for t in self.tags}
        out |= set(self.sequences.values())
        return out

    def blobs(self) -> set[str]:
        """Every path of the backup location this snapshot needs."""
        return {f"docs/sha256-{d}" for d in self.docs()} | {f"objects/{o}" for o in self.objects}

    def body(self) -> dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT,
            "id": self.id,
            "store": self.store,
            "created": self.created,
            "source": self.source,
            "config": self.config,
            "versions": [v.to_json() for v in self.versions],
            "tags": [t.to_json() for t in self.tags],
            "objects": dict(sorted(self.objects.items())),
            "recipients": list(self.recipients),
            "damaged": list(self.damaged),
            "sequences": dict(sorted(self.sequences.items())),
        }


def _hex(value: Any) -> str:
    if (
        not isinstance(value, str)
        or len(value) != 64
        or not all(c in "0123456789abcdef" for c in value)
    ):
        raise ValueError(f"not a SHA-256: {str(value)[:80]!r}")
    return value


def _blob_name(digest: str) -> str:
    """``blake3:HEX`` -> ``blake3-HEX`` (a backup object's name)."""
    alg, _, hexpart = digest.partition(":")
    return f"{alg}-{hexpart}"


def _doc_path(sha: str) -> str:
    return f"docs/sha256-{sha}"


def _manifest_from(
    dest: Storage, rec: VersionRecord, signers: Iterable[str], store_id: str
) -> Manifest:
    """A version's manifest as the backup holds it, verified."""
    return Manifest.verify(
        _read_doc(dest, rec.manifest, f"the manifest of {rec.ref}"),
        signers, store=store_id, tenant=rec.tenant, name=rec.name, version=rec.version,
    )  # fmt: skip


# -- the counters every long operation reports -------------------------------------------


@dataclass
class Stats:
    """What a backup or restore did. ``read_bytes`` counts object bytes read from the source."""

    versions: int = 0
    objects: int = 0
    copied: int = 0
    copied_bytes: int = 0
    read_bytes: int = 0
    docs_written: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, read: int = 0, copied: int = 0, copied_bytes: int = 0) -> None:
        with self._lock:
            self.read_bytes += read
            self.copied += copied
            self.copied_bytes += copied_bytes

    def summary(self, what: str) -> str:
        from sealstore.progress import counted, human_bytes

        rate = self.copied_bytes / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{what}: {counted(self.versions, 'version')}, {counted(self.objects, 'object')}, "
            f"{self.copied} copied ({human_bytes(self.copied_bytes)}, {human_bytes(rate)}/s), "
            f"{counted(self.docs_written, 'document')} written, {self.seconds:.1f} s"
        )


# -- the location ------------------------------------------------------------------------


def _claim(dest: Storage, store_id: str) -> None:
    """Mark *dest* as holding backups of *store_id*; refuse one that holds another store's."""
    doc = {"format": REPO_FORMAT, "store": store_id, "created": now()}
    with contextlib.suppress(FileExistsError):
        dest.put_new(REPO, dumps(doc))
    _check_repo(dest, store_id)


def _check_repo(dest: Storage, store_id: str | None = None) -> str:
    try:
        doc = loads(dest.read(REPO), f"{dest.url}/{REPO}")
    except NotFound:
        raise NotFound(f"no sealstore backup at {dest.url}") from None
    if doc.get("format") != REPO_FORMAT or not isinstance(doc.get("store"), str):
        raise FormatError(f"{dest.url} is not a sealstore backup location")
    if store_id is not None and doc["store"] != store_id:
        raise ValueError(
            f"{dest.url} holds backups of store {doc['store']}, not {store_id}: "
            "use another location"
        )
    return str(doc["store"])


@contextlib.contextmanager
def _lock(dest: Storage, mine: str, other: str, force: bool = False) -> Any:
    """Hold ``locks/MINE`` while refusing to start during a recent ``locks/OTHER``.

    Mine is written first and the other's checked after: two that start together
    both see each other and both refuse, rather than both running.
    """
    dest.put(f"locks/{mine}", dumps({"started": now()}))
    try:
        if not force:
            try:
                age = time.time() - dest.modified(f"locks/{other}")
            except NotFound:
                age = None
            if age is not None and age < LOCK_MAX_AGE:
                raise BackendError(
                    f"a backup {other} on {dest.url} is running or was killed "
                    f"{age / 60:.0f} minutes ago; re-run it to completion, or use --force"
                )
        yield
    finally:
        # Best effort: when the location has gone away, the error that says so wins;
        # a lock left behind only makes the other operation ask for a re-run or --force.
        with contextlib.suppress(Exception):
            dest.delete(f"locks/{mine}")


# -- snapshots -----------------------------------------------------------------------------


def _new_id(existing: Sequence[str]) -> str:
    """A snapshot id that sorts after every existing one: UTC time to the microsecond."""
    new = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(4)
    if existing and new <= existing[-1]:
        # The clock went back: extend the newest id, so that "latest" stays right.
        new = f"{existing[-1]}.{secrets.token_hex(2)}"
    return check_name(new, "snapshot id")


def snapshot_ids(dest: Storage) -> list[str]:
    """The ids of the snapshots at *dest*, oldest first (files not named like one are ignored)."""
    names = [n[: -len(".json")] for n in dest.list("snapshots") if n.endswith(".json")]
    return sorted(n for n in names if _SNAPSHOT_ID.fullmatch(n))


def _read_doc(dest: Storage, sha: str, what: str) -> bytes:
    try:
        data = dest.read(_doc_path(sha))
    except NotFound:
        raise NotFound(f"{what} ({_doc_path(sha)}) is missing from the backup") from None
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), sha):
        raise AuthenticationError(f"{what} ({_doc_path(sha)}) is corrupt in the backup")
    return data


def _trusted_root(store_id: str, root: str | None) -> str:
    from sealstore.vault.store import pinned_root

    pinned = pinned_root(store_id)
    if root is not None:
        if pinned is not None and pinned != root:
            raise AuthenticationError(
                f"store {store_id} is pinned here to root key {pinned}, not {root}"
            )
        return root
    if pinned is None:
        raise AuthenticationError(
            f"store {store_id} is not trusted on this machine: give its root key "
            "(--root KEY, from the store's owner) to check its backups"
        )
    return pinned


def load_snapshot(
    dest: Storage, snapshot_id: str, *, root: str | None = None
) -> tuple[Snapshot, dict[str, Any]]:
    """A snapshot, verified: its config against the store's root key, itself against the signers.

    Returns:
        The snapshot and the store's verified config body.

    Raises:
        NotFound: no such snapshot (``latest``: none at all).
        AuthenticationError: a signature fails, or the store is not trusted here.
    """
    store_id = _check_repo(dest)
    if snapshot_id == "latest":
        ids = snapshot_ids(dest)
        if not ids:
            raise NotFound(f"no snapshot in {dest.url}")
        snapshot_id = ids[-1]
    check_name(snapshot_id, "snapshot id")
    where = f"snapshot {snapshot_id} in {dest.url}"
    try:
        doc = loads(dest.read(f"snapshots/{snapshot_id}.json"), where)
    except NotFound:
        raise NotFound(f"no snapshot {snapshot_id} in {dest.url}") from None
    if doc.get("store") != store_id or doc.get("id") != snapshot_id:
        raise AuthenticationError(f"{where} belongs to another store or name")
    from sealstore.vault.store import _verify_config

    config_sha = _hex(doc.get("config"))
    config_doc = loads(_read_doc(dest, config_sha, "the store config"), "store config")
    if config_doc.get("id") != store_id:
        raise AuthenticationError(f"{where}: its store config is another store's")
    config = _verify_config(config_doc, _trusted_root(store_id, root), dest.url)
    body = verify_document("snapshot", doc, config["signers"], what=where)
    if body.get("format") != SNAPSHOT_FORMAT:
        raise FormatError(f"{where}: unknown format {body.get('format')!r}")
    try:
        objects = {str(k): int(v) for k, v in dict(body["objects"]).items()}
        snap = Snapshot(
            id=snapshot_id,
            store=store_id,
            created=str(body["created"]),
            source=str(body.get("source", "")),
            config=config_sha,
            versions=tuple(VersionRecord.from_json(v) for v in body["versions"]),
            tags=tuple(TagRecord.from_json(t) for t in body["tags"]),
            objects=objects,
            recipients=tuple(str(r) for r in body.get("recipients", [])),
            damaged=tuple(str(d) for d in body.get("damaged", [])),
            signer=body.get("signer"),
            sequences={
                check_name(t, "tenant"): _hex(h)
                for t, h in dict(body.get("sequences") or {}).items()
            },
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FormatError(f"{where} is malformed: {exc}") from None
    return snap, config


def list_snapshots(url: str, **storage_options: Any) -> list[dict[str, Any]]:
    """Each snapshot's id, time, counts and size (read, not verified: see :func:`verify`)."""
    dest = open_storage(url, **storage_options)
    _check_repo(dest)
    out = []
    for sid in snapshot_ids(dest):
        try:
            doc = loads(dest.read(f"snapshots/{sid}.json"), sid)
            objects = doc.get("objects") or {}
            out.append(
                {
                    "id": sid,
                    "created": doc.get("created"),
                    "source": doc.get("source"),
                    "versions": len(doc.get("versions") or []),
                    "tags": len(doc.get("tags") or []),
                    "objects": len(objects),
                    "bytes": sum(int(v) for v in objects.values()),
                    "recipients": list(doc.get("recipients") or []),
                    "damaged": len(doc.get("damaged") or []),
                }
            )
        except (SealstoreError, ValueError, TypeError, AttributeError) as exc:
            out.append({"id": sid, "error": f"{type(exc).__name__}: {exc}"})
    return out


# -- copying -------------------------------------------------------------------------------


def _copy(
    src: Storage,
    src_path: str,
    dst: Storage,
    dst_path: str,
    digest: str,
    size: int,
    stats: Stats,
    progress: Callable[[int], None] | None,
) -> None:
    """Copy one object, hashing it on the way; it appears at *dst_path* only if it matches.

    Raises:
        NotFound: the source object is missing.
        AuthenticationError: the source's bytes are not the ones the manifest signs.
    """
    hasher = ObjectHasher(digest.partition(":")[0])
    n = 0
    with src.open_stream(src_path) as fp, dst.open_write(dst_path) as out:
        while block := fp.read(_BLOCK):
            hasher.update(block)
            out.write(block)
            n += len(block)
            stats.add(read=len(block))
            if progress is not None:
                progress(len(block))
        if n != size or not digests_equal(hasher.text(), digest):
            # Raised inside open_write: the partial copy is discarded, never published.
            raise AuthenticationError(f"{src_path} in {src.url} does not match its manifest")
    stats.add(copied=1, copied_bytes=n)


def _run_copies(jobs: list[Callable[[], None]], threads: int) -> list[BaseException | None]:
    """Run copy jobs on *threads* workers; each job's exception (or None), in order.

    A BaseException that is not an Exception (an interrupt) stops everything
    and is raised at once, as is a backend that stopped answering (a timeout:
    every later job would wait for it again): what was copied stays, and a
    re-run copies the rest.
    """

    def outcome(job: Callable[[], None]) -> Callable[[], BaseException | None]:
        def run() -> BaseException | None:
            try:
                job()
            except Exception as exc:
                if timed_out(exc):
                    raise
                return exc
            return None

        return run

    return run_jobs([outcome(job) for job in jobs], threads)


def _damage(outcomes: list[BaseException | None], stopped: str, kept: str) -> dict[int, Exception]:
    """The copies that found damage (missing, corrupt), by index.

    A failing backend (a server gone, a full disk) stops the whole operation
    instead: nothing after it could succeed, and a re-run resumes.
    """
    out: dict[int, Exception] = {}
    for i, exc in enumerate(outcomes):
        if exc is None:
            continue
        if isinstance(exc, BackendError):
            raise BackendError(f"{stopped}: {exc} ({kept}; run it again to resume)") from exc
        if not isinstance(exc, (AuthenticationError, NotFound)):
            raise exc
        out[i] = exc
    return out


# -- backup create -------------------------------------------------------------------------


@dataclass
class _Planned:
    record: VersionRecord
    manifest: Manifest | None  # None: carried over from the previous snapshot
    docs: dict[str, bytes]


def _verified_snapshots(dest: Storage, root: str) -> Iterator[Snapshot]:
    """The snapshots at *dest* that verify under *root*, newest first (the others skipped)."""
    for sid in reversed(snapshot_ids(dest)):
        try:
            yield load_snapshot(dest, sid, root=root)[0]
        except (SealstoreError, ValueError):
            continue


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
                        tenant, name, version, sha, bom,
                        bool(m.shredded), escrow,
                    )  # fmt: skip
                    planned.append(_Planned(rec, m, docs))
                for tag in store.storage.list(f"tenants/{tenant}/refs/{name}"):
                    path = f"tenants/{tenant}/refs/{name}/{tag}"
                    try:
                        raw = store.storage.read(path)
                        tv, _ = verify_tag(raw, store.signers_for(tenant, "publisher"),
                                           store=store.id, tenant=tenant, name=name,
                                           tag=tag)  # fmt: skip
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
            return lambda: _copy(store.storage, src, dest, f"objects/{blob}",
                                 e.object_digest, e.object_size, stats, progress)  # fmt: skip

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
    record(store, "backup", decision="failed" if snap.damaged else "ok",
           detail={"to": dest.url, "snapshot": snap.id, "versions": stats.versions,
                   "copied": stats.copied, "damaged": len(snap.damaged)})  # fmt: skip
    return snap, stats


# -- verify ----------------------------------------------------------------------------


@dataclass
class BackupVerifyResult:
    """What ``backup verify`` found: ``problems`` names each missing or corrupt piece."""

    snapshot: str
    versions: int = 0
    objects: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _hash_blob(
    dest: Storage, path: str, digest: str, progress: Callable[[int], None] | None
) -> bool:
    hasher = ObjectHasher(digest.partition(":")[0])
    with dest.open_stream(path) as fp:
        while block := fp.read(_BLOCK):
            hasher.update(block)
            if progress is not None:
                progress(len(block))
    return digests_equal(hasher.text(), digest)


def _digest_of(blob: str) -> str:
    alg, _, hexpart = blob.partition("-")
    return f"{alg}:{hexpart}"


def verify(
    url: str,
    snapshot_id: str = "latest",
    *,
    root: str | None = None,
    threads: int = 4,
    progress_for: ProgressFor | None = None,
    **storage_options: Any,
) -> BackupVerifyResult:
    """Check a snapshot without any key: signatures, every document and every object's hash.

    Returns a result listing each problem (what is missing or corrupt, and
    which versions it belongs to) rather than stopping at the first.

    Raises:
        NotFound, AuthenticationError: the snapshot itself is missing or its
            signature (or its store config's) does not verify -- then nothing
            in it can be trusted enough to check further.
    """
    dest = open_storage(url, **storage_options)
    snap, config = load_snapshot(dest, snapshot_id, root=root)
    res = BackupVerifyResult(snap.id, versions=len(snap.versions), objects=len(snap.objects),
                             bytes=snap.size)  # fmt: skip
    signers = config["signers"]
    users: dict[str, list[str]] = {}
    digests: dict[str, str] = {}
    for rec in snap.versions:
        try:
            m = _manifest_from(dest, rec, signers, snap.store)
        except SealstoreError as exc:
            res.problems.append(f"{rec.ref}: {exc}")
            continue
        if bool(m.shredded) != rec.shredded:
            res.problems.append(f"{rec.ref}: the snapshot and the manifest disagree on shredding")
        if rec.bom != (None if m.shredded else m.bom_sha256):
            res.problems.append(f"{rec.ref}: the snapshot and the manifest disagree on the BoM")
        if rec.bom:
            try:
                _read_doc(dest, rec.bom, f"the BoM of {rec.ref}")
            except SealstoreError as exc:
                res.problems.append(str(exc))
        if any(s.kind not in ("x25519", "hpke") for s in rec.escrow):
            res.problems.append(f"{rec.ref}: an escrow slot is not an hpke or x25519 slot")
        digests[rec.ref] = rec.manifest
        if m.shredded:
            continue
        for e in m.files:
            blob = _blob_name(e.object_digest)
            users.setdefault(blob, []).append(f"{rec.tenant}/{m.name}:{m.version}/{e.path}")
            if snap.objects.get(blob) != e.object_size:
                res.problems.append(f"{rec.ref}: object {blob} is not listed in the snapshot")
    for tenant, sha in sorted(snap.sequences.items()):
        where = f"sequence of tenant {tenant}"
        try:
            seq = loads(_read_doc(dest, sha, where), where)
            verify_document("sequence", seq, signers, what=where)
            if (seq.get("store"), seq.get("tenant")) != (snap.store, tenant):
                raise AuthenticationError(f"{where} belongs to another store or tenant")
        except SealstoreError as exc:
            res.problems.append(str(exc))
    for t in snap.tags:
        where = f"tag {t.tenant}/{t.name}@{t.tag}"
        try:
            raw = _read_doc(dest, t.doc, where)
            version, digest = verify_tag(raw, signers, store=snap.store, tenant=t.tenant,
                                         name=t.name, tag=t.tag)  # fmt: skip
        except SealstoreError as exc:
            res.problems.append(str(exc))
            continue
        if version != t.version or digest != digests.get(t.ref):
            res.problems.append(f"{where} does not name a manifest of the snapshot")
    have = dest.walk("objects")
    todo = []
    for blob, size in sorted(snap.objects.items()):
        used = ", ".join(users.get(blob, ["no version"])[:3])
        got = have.get(f"objects/{blob}")
        if got is None:
            res.problems.append(f"object {blob} ({used}) is missing from the backup")
        elif got != size:
            res.problems.append(f"object {blob} ({used}) is {got} bytes, not {size}")
        else:
            todo.append((blob, size, used))
    progress = progress_for("verify", sum(s for _, s, _ in todo)) if progress_for else None

    def job(blob: str, used: str) -> Callable[[], None]:
        def run() -> None:
            if not _hash_blob(dest, f"objects/{blob}", _digest_of(blob), progress):
                raise AuthenticationError(f"object {blob} ({used}) is corrupt (hash mismatch)")

        return run

    for exc in _run_copies([job(b, u) for b, _, u in todo], threads):
        if exc is not None:
            res.problems.append(str(exc) if isinstance(exc, SealstoreError) else repr(exc))
    return res


# -- restore ---------------------------------------------------------------------------


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
            try:
                doc = loads(current, f"{storage.url}/{CONFIG}")
            except FormatError:
                doc = {"id": snap.store}
            if doc.get("id") != snap.store:
                raise ValueError(
                    f"{storage.url} holds another store ({doc.get('id')}), not {snap.store}"
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
        missing = [str(r) for r in refs
                   if not any(v.name == r.name and r.version in (None, v.version)
                              for v in versions)]  # fmt: skip
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
    shredded = {v.ref for sn in _verified_snapshots(dest, config["root"])
                for v in sn.versions if v.shredded}  # fmt: skip
    writes: list[tuple[VersionRecord, Manifest, bytes | None]] = []
    jobs: list[tuple[VersionRecord, FileEntry]] = []
    for rec in sorted(versions, key=lambda v: v.ref):
        try:
            snap_raw = _read_doc(dest, rec.manifest, f"the manifest of {rec.ref}")
            m = Manifest.verify(snap_raw, signers, store=snap.store, tenant=rec.tenant,
                                name=rec.name, version=rec.version)  # fmt: skip
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
    record(store, "restore", tenant=tenant, decision="failed" if report.problems else "ok",
           detail={"from": dest.url, "snapshot": snap.id, "versions": report.versions,
                   "repaired": len(report.repaired), "known_good": bool(known_good),
                   "problems": len(report.problems)})  # fmt: skip
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
            _copy(dest, f"objects/{blob}", store.storage, obj, e.object_digest, e.object_size,
                  stats, progress)  # fmt: skip
        except NotFound:
            raise NotFound(f"object {blob} is missing from the backup") from None
        except AuthenticationError:
            raise AuthenticationError(f"object {blob} is corrupt in the backup") from None

    return run


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
        _, digest = verify_tag(raw, signers, store=snap.store, tenant=t.tenant, name=t.name,
                               tag=t.tag)  # fmt: skip
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


# -- prune -----------------------------------------------------------------------------


@dataclass
class PruneReport:
    kept: list[str]
    removed: list[str]
    blobs_removed: int = 0
    bytes_freed: int = 0


def prune(
    url: str,
    keep: int,
    *,
    root: str | None = None,
    force: bool = False,
    grace: float = 3600.0,
    **storage_options: Any,
) -> PruneReport:
    """Keep the *keep* newest snapshots; delete the others and every blob no kept one needs.

    Every kept snapshot is verified first: if one does not verify, nothing is
    deleted (what it needs cannot be known). Snapshots go before blobs, so an
    interrupted prune leaves only unreferenced blobs, never a kept snapshot
    missing one. Blobs of a backup that was killed are removed too.
    """
    if keep < 1:
        raise ValueError("--keep must be at least 1")
    dest = open_storage(url, **storage_options)
    _check_repo(dest)
    with _lock(dest, "prune", "backup", force=force):
        ids = snapshot_ids(dest)
        kept, drop = ids[-keep:], ids[:-keep]
        needed: set[str] = set()
        for sid in kept:
            try:
                needed |= load_snapshot(dest, sid, root=root)[0].blobs()
            except SealstoreError as exc:
                raise AuthenticationError(
                    f"snapshot {sid} does not verify ({exc}); refusing to prune"
                ) from None
        for sid in drop:
            dest.delete(f"snapshots/{sid}.json")
        report = PruneReport(kept, drop)
        cutoff = time.time() - grace
        for path, size in {**dest.walk("objects"), **dest.walk("docs")}.items():
            # Young blobs may be a running backup's (the lock is advisory): spared.
            if path not in needed and dest.modified(path) < cutoff:
                dest.delete(path)
                report.blobs_removed += 1
                report.bytes_freed += size
        dest.abort_stale_uploads(cutoff, "objects/")
    return report
