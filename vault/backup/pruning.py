"""``backup prune``: keep the newest snapshots, delete the rest and the blobs no kept one needs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sealstore.errors import (
    AuthenticationError,
    SealstoreError,
)
from sealstore.vault.backup.locks import _check_repo, _lock
from sealstore.vault.backup.snapshot import load_snapshot, snapshot_ids
from sealstore.vault.storage import open_storage


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
