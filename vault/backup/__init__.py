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

from sealstore.vault.backup.copying import ProgressFor, Stats
from sealstore.vault.backup.creating import create
from sealstore.vault.backup.locks import LOCK_MAX_AGE, REPO, REPO_FORMAT
from sealstore.vault.backup.pruning import PruneReport, prune
from sealstore.vault.backup.restoring import RestoreReport, restore
from sealstore.vault.backup.snapshot import (
    CONFIG,
    SNAPSHOT_FORMAT,
    Snapshot,
    TagRecord,
    VersionRecord,
    list_snapshots,
    load_snapshot,
    snapshot_ids,
)
from sealstore.vault.backup.verifying import BackupVerifyResult, verify

__all__ = [
    "CONFIG",
    "LOCK_MAX_AGE",
    "REPO",
    "REPO_FORMAT",
    "SNAPSHOT_FORMAT",
    "BackupVerifyResult",
    "ProgressFor",
    "PruneReport",
    "RestoreReport",
    "Snapshot",
    "Stats",
    "TagRecord",
    "VersionRecord",
    "create",
    "list_snapshots",
    "load_snapshot",
    "prune",
    "restore",
    "snapshot_ids",
    "verify",
]
