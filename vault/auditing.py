"""Where the store's operations are audited: the log of ``sealstore.audit``, per store.

Push, pull, load, tag, rotate, shred, backup, restore, safe mode and role
changes each append one record before they report success (reads: before
any plaintext is returned). If the record cannot be written the operation
fails -- an unaudited access is the thing the log exists to rule out.

The log lives on the store's own backend (``ROOT/audit/``) unless
``$SEALSTORE_AUDIT`` names another place: a local path or any URL the store
accepts (a reader with read-only access to the bucket keeps its own log).
Each machine writes its own stream, its checkpoints signed by a per-machine
audit key (``$SEALSTORE_HOME/audit.key``), which proves the stream was not
re-chained by someone without that file; it grants nothing in the store.
"""

from __future__ import annotations

import getpass
import os
import socket
import threading
from pathlib import Path
from typing import Any

from sealstore.audit import AuditKey, AuditLog
from sealstore.kms.registry import sealstore_home
from sealstore.vault.storage import open_storage

__all__ = ["AUDIT_ENV", "log_for", "machine_key", "machine_log", "principal", "record"]

AUDIT_ENV = "SEALSTORE_AUDIT"

_lock = threading.Lock()
# Every record is signed with it: read the file once, not on each pull and load.
_keys: dict[Path, AuditKey] = {}


def principal() -> str:
    """Who is acting on this machine: ``user@host``."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def machine_key() -> AuditKey:
    """This machine's audit key (created on first use; read once per process and path)."""
    path = sealstore_home() / "audit.key"
    with _lock:
        key = _keys.get(path)
        if key is None:
            key = _keys[path] = AuditKey.load_or_create(path)
        return key


def machine_log(dest: str | None = None) -> AuditLog:
    """This machine's stream of the log at *dest*, else ``$SEALSTORE_AUDIT``, else
    ``$SEALSTORE_HOME/audit``: for records that belong to no store (a guarded model
    loaded from a file)."""
    dest = dest or os.environ.get(AUDIT_ENV) or str(sealstore_home() / "audit")
    return AuditLog(open_storage(dest), machine_key())


def log_for(store: Any) -> AuditLog:
    """The audit log this process writes *store*'s records to (kept on the store object,
    so that concurrent operations on one store share it and are group committed)."""
    dest = os.environ.get(AUDIT_ENV) or ""
    key = machine_key()
    with _lock:
        cached = getattr(store, "_audit_log", None)
        if cached is not None and cached[0] == (dest, key.signing_key_id):
            return cached[1]
        log = AuditLog(open_storage(dest) if dest else store.storage, key)
        store._audit_log = ((dest, key.signing_key_id), log)
        return log


def record(
    store: Any,
    action: str,
    *,
    tenant: str | None = None,
    artifact: str | None = None,
    version: str | None = None,
    decision: str = "ok",
    code: str | None = None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Append one record for *store* and return it once durable.

    Raises:
        BackendError, AuthenticationError: the record could not be written
            (the caller's operation must then fail).
    """
    return log_for(store).append(
        who=principal(),
        action=action,
        tenant=tenant,
        artifact=artifact,
        version=version,
        decision=decision,
        code=code,
        reason=reason,
        detail={"store": store.id, **(detail or {})},
    )
