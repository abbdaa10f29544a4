"""``backup verify``: a snapshot checked without any key, every document and object hash."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sealstore.errors import (
    AuthenticationError,
    SealstoreError,
)
from sealstore.signing import verify_document
from sealstore.vault.backup.copying import ProgressFor, _hash_blob, _run_copies
from sealstore.vault.backup.snapshot import _blob_name, _manifest_from, _read_doc, load_snapshot
from sealstore.vault.manifest import (
    loads,
    verify_tag,
)
from sealstore.vault.storage import open_storage


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
    res = BackupVerifyResult(
        snap.id, versions=len(snap.versions), objects=len(snap.objects), bytes=snap.size
    )
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
            seq = verify_document(
                "sequence", loads(_read_doc(dest, sha, where), where), signers, what=where
            )
            if (seq.get("store"), seq.get("tenant")) != (snap.store, tenant):
                raise AuthenticationError(f"{where} belongs to another store or tenant")
        except SealstoreError as exc:
            res.problems.append(str(exc))
    for t in snap.tags:
        where = f"tag {t.tenant}/{t.name}@{t.tag}"
        try:
            raw = _read_doc(dest, t.doc, where)
            version, digest = verify_tag(
                raw, signers, store=snap.store, tenant=t.tenant, name=t.name, tag=t.tag
            )
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
