"""Safe mode (ETSI TS 104 033 resilience): serve only what is known to be good.

While a store is in safe mode, every read that decrypts -- ``pull``, the
loaders, ``from_pretrained``, checkpoints -- is served only the version that
the artifact's signed ``known-good`` tag names, and only if that manifest's
signature verifies and its hash is the one the tag signs. A bare ``NAME``
then means ``NAME@known-good`` (not ``latest``); anything else is refused
(``Refused``, exit 8). Verification, backups, restores and tagging still work,
so an operator can repair the store and mark the version to fall back to.

The state is one signed document, ``ROOT/safe-mode.json``, with a serial
number that only grows. Each machine remembers the highest serial it has seen
(in its trust file), so someone who can write the bucket cannot leave safe
mode by deleting the document or putting an older one back: that reads as a
rollback and every serve is refused until a signer writes a newer state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from sealstore.errors import AuthenticationError, FormatError, NotFound, Refused
from sealstore.signing import sign_document, unverified_fields, verify_document
from sealstore.vault.manifest import Manifest, Ref, check_name, dumps, loads, now, parse_ref

__all__ = ["KNOWN_GOOD", "SafeModeState", "enter", "exit_safe_mode", "serving_manifest", "status"]

PATH = "safe-mode.json"
FORMAT = "sealstore-safe-mode-v1"
KNOWN_GOOD = "known-good"
_COUNTER = "safe-mode"


@dataclass(frozen=True)
class SafeModeState:
    enabled: bool
    serial: int = 0
    since: str | None = None
    reason: str = ""
    signer: str | None = None


def status(store: Any) -> SafeModeState:
    """The store's verified safe-mode state.

    Raises:
        AuthenticationError: the state document is unsigned, edited, signed by
            a key that is not the store's, or older than one this machine has
            seen (a rollback: deleted or replaced by an older copy).
    """
    from sealstore.vault.store import pin_counter, pinned_counter

    seen = pinned_counter(store.id, _COUNTER)
    try:
        data = store.storage.read(PATH)
    except NotFound:
        if seen:
            raise AuthenticationError(
                f"the safe-mode state of store {store.url} is gone, but this machine has seen "
                f"serial {seen}: refusing (a signer can write a new state: sealstore safe-mode "
                "enter|exit)"
            ) from None
        return SafeModeState(enabled=False)
    where = f"safe-mode state of {store.url}"
    body = verify_document(
        "safe-mode", loads(data, where), store.signers_for("*", "admin"), what=where
    )
    serial = body.get("serial")
    if (
        body.get("format") != FORMAT
        or body.get("store") != store.id
        or not isinstance(body.get("enabled"), bool)
        or not isinstance(serial, int)
        or isinstance(serial, bool)
    ):
        raise AuthenticationError(f"{where} is malformed or belongs to another store")
    if serial < seen:
        raise AuthenticationError(
            f"{where} has serial {serial}, older than {seen} seen here: refusing a rollback"
        )
    if serial > seen:  # the trust file is written only when the floor rises
        pin_counter(store.id, _COUNTER, serial)
    return SafeModeState(
        enabled=body["enabled"],
        serial=serial,
        since=body.get("since"),
        reason=str(body.get("reason") or ""),
        signer=body.get("signer"),
    )


def _write(store: Any, enabled: bool, reason: str) -> SafeModeState:
    from sealstore.vault.store import pin_counter, pinned_counter

    try:
        current = status(store)
    except AuthenticationError:
        # A signer may overwrite a damaged or rolled-back state. Its serial, unverified,
        # is still a floor: machines that saw it must accept what is written now.
        current = SafeModeState(enabled=False, serial=_unverified_serial(store))
    serial = max(current.serial, pinned_counter(store.id, _COUNTER)) + 1
    signer = store.require("admin", "*")
    body = {
        "format": FORMAT,
        "store": store.id,
        "enabled": enabled,
        "serial": serial,
        "since": now(),
        "reason": reason,
    }
    store.storage.put(PATH, dumps(sign_document("safe-mode", body, signer)))
    pin_counter(store.id, _COUNTER, serial)
    from sealstore.vault.auditing import record

    record(
        store,
        "safe-mode.enter" if enabled else "safe-mode.exit",
        reason=reason or None,
        detail={"serial": serial, "signer": signer.signing_key_id},
    )
    return SafeModeState(enabled, serial, body["since"], reason, signer.signing_key_id)


def _unverified_serial(store: Any) -> int:
    try:
        serial = unverified_fields(loads(store.storage.read(PATH), PATH)).get("serial")
    except (NotFound, FormatError):
        return 0
    return serial if isinstance(serial, int) and not isinstance(serial, bool) else 0


def enter(store: Any, reason: str = "") -> SafeModeState:
    """Put the store in safe mode (signed by this machine's signing key, a store signer)."""
    return _write(store, True, reason)


def exit_safe_mode(store: Any, reason: str = "") -> SafeModeState:
    """Leave safe mode: every verified version is served again."""
    return _write(store, False, reason)


def serving_manifest(store: Any, ref: str | Ref, *, tenant: str | None = None) -> Manifest:
    """See :meth:`sealstore.vault.store.Store.serving_manifest`."""
    from sealstore.vault.store import default_tenant

    tenant = check_name(tenant or default_tenant(), "tenant")
    state = status(store)
    if not state.enabled:
        return store.manifest(ref, tenant=tenant)  # type: ignore[no-any-return]
    r = parse_ref(ref) if isinstance(ref, str) else ref
    try:
        version, digest = store._read_tag(tenant, r.name, KNOWN_GOOD)
    except NotFound:
        raise Refused(
            f"store {store.url} is in safe mode and {r.name} has no {KNOWN_GOOD} version "
            f"in tenant {tenant}"
        ) from None
    wanted = r.version
    if r.tag is not None and r.tag != KNOWN_GOOD:
        wanted = store._read_tag(tenant, r.name, r.tag)[0]
    if wanted is not None and wanted != version:
        raise Refused(
            f"store {store.url} is in safe mode: only {r.name}@{KNOWN_GOOD} "
            f"({r.name}:{version}) is served, not {r}"
        )
    data = store.manifest_bytes(r.name, version, tenant=tenant)
    if hashlib.sha256(data).hexdigest() != digest:
        raise Refused(
            f"store {store.url} is in safe mode and the manifest of {r.name}:{version} is not "
            f"the one tagged {KNOWN_GOOD}"
        )
    m = Manifest.verify(
        data,
        store.signers_for(tenant, "publisher"),
        store=store.id,
        tenant=tenant,
        name=r.name,
        version=version,
    )
    if m.shredded:
        raise Refused(f"{r.name}@{KNOWN_GOOD} ({r.name}:{version}) was crypto-shredded")
    return m
