"""A backup location: which store it backs up, and the locks of a backup or prune in flight."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from sealstore.errors import (
    BackendError,
    FormatError,
    NotFound,
)
from sealstore.vault.manifest import (
    dumps,
    loads,
    now,
)
from sealstore.vault.storage import Storage

REPO = "sealstore-backup.json"
REPO_FORMAT = "sealstore-backup-v1"
LOCK_MAX_AGE = 24 * 3600.0  # a lock older than this is a killed process's


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
