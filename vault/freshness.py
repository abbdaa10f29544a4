"""The signed per-tenant sequence: which tags and manifests are current, and until when.

A signed tag names its manifest's hash, and a manifest its location, but an
older tag or manifest is just as validly signed as the current one: copied
back into the bucket, it would be served. So every write of a tag or a
manifest also writes a new **sequence document** for the tenant (a TUF
snapshot and timestamp in one):

    ROOT/tenants/T/sequence.json              the current document (what readers read)
    ROOT/tenants/T/sequence/NNNNNNNNNNNN.json the same documents by serial (writers' commit)

Signed by a publisher (or admin) of the tenant, it carries a ``serial`` that
every write raises, an ``expires`` time, and per artifact the SHA-256 of every
version's manifest and the (version, manifest SHA-256) of every tag. Readers
resolve tags through it -- one small object, read instead of the tag file --
and check that the manifest they serve is the one it lists. Each machine
keeps the highest serial it has seen per tenant in its trust file (beside
the store pins), so a rolled-back document is refused, and an expired one
(a frozen store: an old document served unchanged) is refused too until a
publisher re-signs it (``sealstore store refresh``).

Concurrent writers never lose each other's changes: the serial-numbered
document is created with the storage's create-if-absent (``put_new``), so of
two writers of serial N one wins and the other re-reads N, re-applies its
change and takes N+1. ``sequence.json`` is then replaced; a writer that finds
a higher serial than the one it wrote puts the newest back, so the last
write of it is always the highest serial. A reader that finds the current
document behind (a lagging replacement, or a rollback) looks for the
numbered ones above it.

Stores made before the sequence keep working: with no document (and none
seen here) reads use the tag files as before, and the first write builds the
document from what the storage holds (every manifest and tag that verifies).

Hand-written rather than python-tuf: TUF's roles, delegations and target
files do not map onto a store whose signers and roles are its signed config
(``sealstore.vault.access``); what is kept from TUF is the snapshot's
version, the timestamp's expiry, and the client's highest-version-seen rule.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sealstore.errors import AuthenticationError, FormatError, NotFound, SealstoreError
from sealstore.signing import sign_document, verify_document
from sealstore.vault.manifest import check_name, dumps, loads, verify_tag

__all__ = [
    "DEFAULT_LIFETIME",
    "Sequence",
    "bootstrap",
    "commit",
    "current",
    "document",
    "fresher",
    "refresh",
]

FORMAT = "sealstore-sequence-v1"
DEFAULT_LIFETIME = 7 * 24 * 3600  # seconds: a week
MAX_LIFETIME = 366 * 24 * 3600
KEEP = 32  # numbered documents kept behind the newest (a lagging writer's window)
_TRIES = 64
_TIME = "%Y-%m-%dT%H:%M:%SZ"
_SHA256 = re.compile(r"[0-9a-f]{64}")

# Changes a writer applies: (name, version) -> manifest sha256, (name, tag) -> entry or None.
TagEntry = tuple[str, str]  # (version, manifest sha256)


def head_path(tenant: str) -> str:
    """Where readers find the tenant's current document."""
    return f"tenants/{tenant}/sequence.json"


def numbered_path(tenant: str, serial: int) -> str:
    """Where the document of *serial* is committed (zero-padded: names sort by serial)."""
    return f"tenants/{tenant}/sequence/{serial:012d}.json"


def _counter(tenant: str) -> str:
    return f"sequence/{tenant}"


def _time(text: Any, where: str) -> datetime:
    try:
        return datetime.strptime(str(text), _TIME).replace(tzinfo=UTC)
    except ValueError:
        raise FormatError(f"{where} has a bad time {str(text)[:40]!r}") from None


@dataclass
class Sequence:
    """A verified sequence document of one tenant."""

    tenant: str
    serial: int
    expires: str
    lifetime: int = DEFAULT_LIFETIME
    artifacts: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    signer: str | None = None

    def tag(self, name: str, tag: str) -> TagEntry | None:
        """(version, manifest sha256) the tag names, or None if the tenant has no such tag."""
        entry = self.artifacts.get(name, {}).get("tags", {}).get(tag)
        return (entry[0], entry[1]) if entry is not None else None

    def tags(self, name: str) -> dict[str, TagEntry]:
        return {t: (e[0], e[1]) for t, e in self.artifacts.get(name, {}).get("tags", {}).items()}

    def manifest(self, name: str, version: str) -> str | None:
        """The SHA-256 of the version's current manifest, or None if it is not listed."""
        found = self.artifacts.get(name, {}).get("versions", {}).get(version)
        return str(found) if found is not None else None

    def versions(self, name: str) -> dict[str, str]:
        return dict(self.artifacts.get(name, {}).get("versions", {}))

    @property
    def expired(self) -> bool:
        return datetime.now(UTC) >= _time(self.expires, "sequence")


def _parse(store: Any, tenant: str, data: bytes, where: str) -> Sequence:
    body = verify_document(
        "sequence", loads(data, where), store.signers_for(tenant, "publisher"), what=where
    )
    serial, lifetime = body.get("serial"), body.get("lifetime")
    if (
        body.get("format") != FORMAT
        or body.get("store") != store.id
        or body.get("tenant") != tenant
        or not isinstance(serial, int)
        or isinstance(serial, bool)
        or serial < 1
        or not isinstance(lifetime, int)
        or isinstance(lifetime, bool)
    ):
        raise AuthenticationError(f"{where} is malformed or belongs to another tenant or store")
    _time(body.get("expires"), where)
    arts = body.get("artifacts")
    if not isinstance(arts, dict):
        raise FormatError(f"{where} is malformed")
    try:
        for name, art in arts.items():
            check_name(name, "artifact name")
            for v, sha in art["versions"].items():
                check_name(v, "version")
                if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                    raise ValueError(sha)
            for t, entry in art["tags"].items():
                check_name(t, "tag")
                check_name(entry[0], "version")
                if len(entry) != 2 or not _SHA256.fullmatch(str(entry[1])):
                    raise ValueError(entry)
    except (KeyError, TypeError, ValueError, IndexError):
        raise FormatError(f"{where} is malformed") from None
    return Sequence(tenant, serial, body["expires"], lifetime, arts, body.get("signer"))


_NUMBERED = re.compile(r"/sequence/(\d+)\.json")


def _read(store: Any, tenant: str, path: str) -> Sequence:
    where = f"sequence of tenant {tenant} in {store.url}"
    seq = _parse(store, tenant, store.storage.read(path), where)
    slot = _NUMBERED.search(path)
    # An old, validly signed document copied into a higher slot would pass
    # for a newer one (and a writer would build on it): the slot is the serial.
    if slot is not None and int(slot.group(1)) != seq.serial:
        raise AuthenticationError(
            f"{where}: document {path} holds serial {seq.serial}, not its slot's "
            f"{int(slot.group(1))} (an older document copied forward?)"
        )
    return seq


def _newer(store: Any, tenant: str, start: int) -> Sequence | None:
    """The newest numbered document with a serial of *start* or more, if any verifies."""
    found = None
    serial = start
    while True:
        try:
            found = _read(store, tenant, numbered_path(tenant, serial))
        except NotFound:
            return found
        serial += 1


def current(store: Any, tenant: str, *, allow_expired: bool = False) -> Sequence | None:
    """The tenant's verified sequence; None for a tenant that never had one (old stores).

    Args:
        allow_expired: writers re-sign an expired document; readers refuse it.

    Raises:
        AuthenticationError: unsigned, edited, signed by a key that is not a
            publisher of the tenant, older than one this machine has seen (a
            rollback), gone after this machine saw one, or expired (a freeze).
    """
    from sealstore.vault.store import pin_counter, pinned_counter

    seen = pinned_counter(store.id, _counter(tenant))
    try:
        seq: Sequence | None = _read(store, tenant, head_path(tenant))
    except NotFound:
        seq = None
    if seq is None and not seen:
        # Never had one, or sequence.json alone was deleted: the numbered ones tell
        # (a listing, not a probe: the oldest may have been pruned).
        names = store.storage.list(f"tenants/{tenant}/sequence")
        if names:
            seq = _read(store, tenant, f"tenants/{tenant}/sequence/{max(names)}")
    elif seq is None or seq.serial < seen:
        # Behind: a writer's replacement still landing, or a rollback. The
        # numbered documents tell which.
        newer = _newer(store, tenant, max(seen, seq.serial + 1 if seq else 1))
        seq = newer or seq
    if seq is None:
        if seen:
            raise AuthenticationError(
                f"the sequence of tenant {tenant} in store {store.url} is gone, but this machine "
                f"has seen serial {seen}: refusing a rollback (restore it from a backup: "
                "sealstore backup restore, or an admin rebuilds it: sealstore store refresh "
                "--rebuild)"
            )
        return None
    if seq.serial < seen:
        raise AuthenticationError(
            f"the sequence of tenant {tenant} in store {store.url} has serial {seq.serial}, "
            f"older than {seen} seen here: refusing a rollback (restore it from a backup: "
            "sealstore backup restore, or an admin rebuilds it: sealstore store refresh --rebuild)"
        )
    if seq.expired and not allow_expired:
        raise AuthenticationError(
            f"the sequence of tenant {tenant} in store {store.url} expired at {seq.expires} "
            "(a frozen store, or none of its publishers wrote since): a publisher re-signs it "
            f"with: sealstore store refresh --tenant {tenant}"
        )
    if seq.serial > seen:  # the trust file is written only when the floor rises
        pin_counter(store.id, _counter(tenant), seq.serial)
    return seq


def fresher(store: Any, tenant: str, seq: Sequence) -> Sequence:
    """*seq*, or a newer numbered document a writer committed since (one probe when none)."""
    from sealstore.vault.store import pin_counter

    newer = _newer(store, tenant, seq.serial + 1)
    if newer is None or newer.expired or newer.serial <= seq.serial:
        return seq
    pin_counter(store.id, _counter(tenant), newer.serial)
    return newer


def document(store: Any, tenant: str, seq: Sequence) -> bytes:
    """The signed bytes of *seq* (for a backup to keep)."""
    try:
        return bytes(store.storage.read(numbered_path(tenant, seq.serial)))
    except NotFound:
        return bytes(store.storage.read(head_path(tenant)))


def bootstrap(store: Any, tenant: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The artifacts map of what the storage holds now: every manifest and tag that verifies.

    For the first write of a tenant made before the sequence, and for an
    admin's ``--rebuild``: what it lists is what the storage holds, so it is
    only as fresh as the storage (it cannot tell a rolled-back tag file).
    """
    arts: dict[str, dict[str, dict[str, Any]]] = {}
    base = f"tenants/{tenant}"
    for name in store.storage.list(f"{base}/artifacts"):
        versions = {}
        for v in store.versions(name, tenant=tenant):
            try:
                data = store.manifest_bytes(name, v, tenant=tenant)
                store.check_manifest(data, tenant, name, v)
            except SealstoreError:
                continue  # damage stays unlisted: readers refuse it, verify reports it
            versions[v] = hashlib.sha256(data).hexdigest()
        arts[name] = {"versions": versions, "tags": {}}
    for name in store.storage.list(f"{base}/refs"):
        for tag in store.storage.list(f"{base}/refs/{name}"):
            try:
                version, digest = verify_tag(
                    store.storage.read(f"{base}/refs/{name}/{tag}"),
                    store.signers_for(tenant, "publisher"),
                    store=store.id,
                    tenant=tenant,
                    name=name,
                    tag=tag,
                )
            except (SealstoreError, ValueError):
                continue
            if arts.get(name, {}).get("versions", {}).get(version) == digest:
                arts[name]["tags"][tag] = [version, digest]
    return {n: a for n, a in arts.items() if a["versions"] or a["tags"]}


def _best_effort(store: Any, tenant: str) -> Sequence | None:
    """The newest document that verifies, whatever this machine has seen (a rebase)."""
    found = []
    for path in [head_path(tenant)] + [
        f"tenants/{tenant}/sequence/{n}" for n in store.storage.list(f"tenants/{tenant}/sequence")
    ]:
        try:
            found.append(_read(store, tenant, path))
        except SealstoreError:
            continue
    return max(found, key=lambda s: s.serial, default=None)


def commit(
    store: Any,
    tenant: str,
    *,
    versions: Mapping[tuple[str, str], str] | None = None,
    tags: Mapping[tuple[str, str], TagEntry | None] | None = None,
    lifetime: int | None = None,
    rebase: bool = False,
    rebuild: bool = False,
    forward: frozenset[tuple[str, str]] = frozenset(),
) -> Sequence:
    """Write the tenant's next sequence document with these changes; returns it.

    Args:
        versions: (name, version) -> the SHA-256 of the manifest now stored.
        tags: (name, tag) -> (version, manifest SHA-256), or None for a removed tag.
        lifetime: seconds until it expires (default: the current document's).
        rebase: build on the newest document that verifies even if this machine
            has seen a newer one (a restore, which moves tags back on purpose),
            with a serial above everything seen.
        rebuild: list what the storage holds now instead of the current document.
        forward: (name, tag)s of *tags* that only move to a newer version: a
            racing writer's newer one, already in the document this builds
            on, is kept (two pushes at once must leave ``latest`` on the newer).

    Raises:
        Refused: this machine's key is not a publisher of the tenant.
        AuthenticationError: the current document is rolled back, damaged or
            gone (not with *rebase*).
    """
    from sealstore.vault.manifest import now
    from sealstore.vault.store import _version_key, pin_counter, pinned_counter

    signer = store.require("publisher", tenant)
    base: Sequence | None
    if rebase or rebuild:
        base = _best_effort(store, tenant)
    else:
        base = current(store, tenant, allow_expired=True)
    if base is None or rebuild:
        arts = bootstrap(store, tenant)
        serial = base.serial if base else 0
        life = base.lifetime if base else DEFAULT_LIFETIME
        base = Sequence(tenant, serial, "", life, arts)
    if lifetime is not None and not 1 <= lifetime <= MAX_LIFETIME:
        raise ValueError("a sequence's lifetime is between a second and a year")
    for _ in range(_TRIES):
        seen = pinned_counter(store.id, _counter(tenant))
        if base.serial < seen:
            # Another writer here committed past our base: build on its document,
            # never step over it (its change would be lost).
            newer = _newer(store, tenant, base.serial + 1)
            if newer is None and not (rebase or rebuild):
                newer = current(store, tenant, allow_expired=True)  # or raises the rollback
            if newer is not None and newer.serial > base.serial:
                base = newer
                continue
        arts = copy.deepcopy(base.artifacts)
        for (name, version), sha in (versions or {}).items():
            art = arts.setdefault(name, {"versions": {}, "tags": {}})
            art["versions"][version] = sha
        for (name, tag), entry in (tags or {}).items():
            art = arts.setdefault(name, {"versions": {}, "tags": {}})
            if entry is None:
                art["tags"].pop(tag, None)
                continue
            held = art["tags"].get(tag)
            if (name, tag) in forward and held and _version_key(held[0]) > _version_key(entry[0]):
                continue
            art["tags"][tag] = [entry[0], entry[1]]
        arts = {n: a for n, a in sorted(arts.items()) if a["versions"] or a["tags"]}
        serial = max(base.serial, seen) + 1  # above seen only for a rebase
        life = lifetime or base.lifetime
        issued = datetime.now(UTC)
        body = {
            "format": FORMAT,
            "store": store.id,
            "tenant": tenant,
            "serial": serial,
            "issued": now(),
            "lifetime": life,
            "expires": (issued + timedelta(seconds=life)).strftime(_TIME),
            "artifacts": arts,
        }
        data = dumps(sign_document("sequence", body, signer))
        try:
            store.storage.put_new(numbered_path(tenant, serial), data)  # the commit point
        except FileExistsError:
            # Another writer took this serial: build on its document instead.
            try:
                base = _newer(store, tenant, serial) or base
            except SealstoreError:
                if not (rebase or rebuild):
                    raise
                # A damaged document holds the serial: a restore steps over it.
            if base.serial < serial:  # it vanished again (pruned): step over it
                base = Sequence(tenant, serial, base.expires, base.lifetime, base.artifacts)
            continue
        pin_counter(store.id, _counter(tenant), serial)
        _publish(store, tenant, serial, data)
        with contextlib.suppress(Exception):  # housekeeping never fails the write
            store.storage.delete(numbered_path(tenant, serial - KEEP))
        return _parse(store, tenant, data, "sequence written")
    raise AuthenticationError(
        f"could not write the sequence of tenant {tenant} (too many concurrent writers); retry"
    )


def _publish(store: Any, tenant: str, serial: int, data: bytes) -> None:
    """Replace ``sequence.json``; if a higher serial landed meanwhile, put the newest back.

    Whoever replaces it last has then checked that nothing higher exists, so
    it ends as the highest serial even when writers finish out of order.
    """
    for _ in range(_TRIES):
        store.storage.put(head_path(tenant), data)
        if not store.storage.exists(numbered_path(tenant, serial + 1)):
            return
        newest = _newer(store, tenant, serial + 1)
        if newest is None:
            return
        serial = newest.serial
        data = store.storage.read(numbered_path(tenant, serial))


def refresh(
    store: Any, tenant: str, *, lifetime: int | None = None, rebuild: bool = False
) -> Sequence:
    """Re-sign the tenant's sequence with a new expiry (and serial); nothing else changes.

    Args:
        rebuild: an admin lists what the storage holds now instead (after a
            rollback with no backup to restore): whatever a tag file or
            manifest says there becomes current again.
    """
    if rebuild:
        store.require("admin", tenant)
    return commit(store, tenant, lifetime=lifetime, rebuild=rebuild)
