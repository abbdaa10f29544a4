"""Re-keying a store version: the same files as a new version under a fresh data key.

Rotation (:func:`sealstore.vault.lifecycle.rotate`) re-wraps the DEK a
version already has; that does nothing if the DEK itself leaked. Re-keying
draws a new DEK and streams every file through a reader under the old key
into a writer under the new one -- every chunk authenticated, the old
object's signed digest and the plaintext SHA-256 checked on the way -- into
new objects of a **new version**: a version's encryption context (and so
every object header) names its version, and a version's manifest, once
committed, is never swapped for one naming other objects.

What the new version carries over: every file's path, size, plaintext
SHA-256 and mode; the object format (suite, chunk size); the OMS model
signature, verbatim (it signs plaintext digests, which do not change); the
CycloneDX BoM, with its model component renamed to the new version and a
``sealstore:rekeyed-from`` property; the tags that named the old version,
moved to the new one. Its parent is the old version. The commit is the same
as a push's: objects first, then the BoM, then the signed manifest, written
only if absent; a failure before that write deletes what was uploaded and
leaves no visible version (``store gc`` removes what a killed process
leaves).

``shred_old`` then crypto-shreds the old version (:func:`lifecycle.shred`):
its slots are destroyed in the store and its objects deleted. What that does
not reach -- backups taken before, DEK caches of running processes, the KEKs
themselves -- is listed in docs/KEYS.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sealstore.errors import BackendError, FormatError, NotFound, SealstoreError
from sealstore.format import read_preamble
from sealstore.keys import DataKey
from sealstore.kms.envelope import IdentitySpec, make_slots
from sealstore.kms.rekey import target_wrappers
from sealstore.stream import SealWriter
from sealstore.vault.manifest import FileEntry, Manifest, check_name, now, version_context
from sealstore.vault.storage import new_object_name

__all__ = ["RekeyResult", "rekey_version"]

Progress = Callable[[int], None]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RekeyResult:
    """What :func:`rekey_version` did.

    Attributes:
        old: the version re-keyed (its manifest as it was read).
        new: the committed manifest of the new version.
        tags: the tags moved from the old version to the new one.
        shredded: the old version's tombstone, if it was shredded.
    """

    old: Manifest
    new: Manifest
    tags: list[str] = field(default_factory=list)
    shredded: Manifest | None = None


def _carried_bom(store: Any, old: Manifest, version: str) -> bytes | None:
    """The old version's BoM (checked against its manifest), renamed to *version*."""
    if not old.bom_sha256:
        return None
    doc = json.loads(store.bom(f"{old.name}:{old.version}", tenant=old.tenant))
    try:
        return _renamed_bom(doc, old, version)
    except (AttributeError, KeyError, TypeError):
        raise FormatError(
            f"the BoM of {old.name}:{old.version} is not a CycloneDX document with a model "
            "component"
        ) from None


def _renamed_bom(doc: Any, old: Manifest, version: str) -> bytes:
    comp = doc["metadata"]["component"]
    old_ref = comp["bom-ref"]
    kind = str(old_ref).rsplit(":", 2)[0]
    new_ref = f"{kind}:{old.name}:{version}"
    comp["version"] = version
    comp["bom-ref"] = new_ref
    comp["pedigree"] = {
        "ancestors": [
            {
                "bom-ref": f"parent:{old.name}:{old.version}",
                "name": old.name,
                "type": comp.get("type", "machine-learning-model"),
                "version": old.version,
            }
        ]
    }
    props = [p for p in comp.get("properties", []) if p.get("name") != "sealstore:rekeyed-from"]
    props.append({"name": "sealstore:rekeyed-from", "value": old.version})
    comp["properties"] = sorted(
        props, key=lambda p: (str(p.get("name", "")), str(p.get("value", "")))
    )
    for dep in doc.get("dependencies", []):
        if dep.get("ref") == old_ref:
            dep["ref"] = new_ref
        dep["dependsOn"] = [new_ref if d == old_ref else d for d in dep.get("dependsOn", [])]
    doc["serialNumber"] = f"urn:uuid:{uuid.uuid4()}"
    doc.setdefault("metadata", {})["timestamp"] = now()
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


class _HashingSink:
    """Passes the sealed bytes to the object and hashes them (the object digest)."""

    def __init__(self, fp: Any) -> None:
        from sealstore.vault.digest import ObjectHasher

        self._fp = fp
        self.digest = ObjectHasher()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self._fp.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._fp.flush()


def _reseal(
    store: Any,
    old: Manifest,
    entry: FileEntry,
    old_dek: DataKey,
    dek: DataKey,
    context: dict[str, str],
    *,
    threads: int,
    progress: Progress | None,
    made: list[str],
) -> FileEntry:
    """One file: decrypted under the old key (everything checked) into a new object."""
    from sealstore.vault.pull import _decrypt_entry

    with store.storage.open_read(store.object_path(old.tenant, entry.object)) as fp:
        header = read_preamble(fp).header  # the old object's suite and chunk size
    obj = new_object_name()
    made.append(obj)
    with store.storage.open_write(store.object_path(old.tenant, obj)) as out:
        sink = _HashingSink(out)
        with SealWriter(
            sink,  # type: ignore[arg-type]
            dek,
            suite=header.suite,
            chunk_size=header.chunk_size,
            context=dict(context, path=entry.path),
            plaintext_size=entry.size,
            threads=threads,
        ) as writer:
            # Raises before the writer closes on any failed check (a chunk tag, the
            # old object's digest, the plaintext SHA-256): the new object is then
            # unfinished and never made visible.
            _decrypt_entry(
                store,
                old,
                entry,
                old_dek,
                writer,
                identities=(),
                threads=threads,
                progress=progress,
                check_plaintext=True,
            )
    header_sha = hashlib.sha256(writer.header.encode()).hexdigest()
    return FileEntry(
        entry.path,
        entry.size,
        entry.sha256,  # checked against the plaintext just re-sealed
        obj,
        sink.size,
        sink.digest.text(),
        header_sha,
        entry.mode,
    )


def rekey_version(
    store: Any,
    ref: str,
    *,
    tenant: str | None = None,
    version: str | None = None,
    to: Sequence[str] = (),
    identities: Sequence[IdentitySpec] = (),
    move_tags: bool = True,
    shred_old: bool = False,
    threads: int = 2,
    progress: Progress | None = None,
) -> RekeyResult:
    """Write a new version with the files of *ref*, each re-encrypted under a fresh DEK.

    Args:
        store: the :class:`~sealstore.vault.store.Store`.
        ref: the version to re-key: ``NAME``, ``NAME:VERSION`` or ``NAME@TAG``.
        tenant: the tenant (default ``$SEALSTORE_TENANT`` or ``default``).
        version: the new version's name (default: the artifact's next number).
        to: key URIs to wrap the new DEK to; default: the keys the old
            version's slots name, each once.
        identities: identity files or unwrappers that open the old slots.
        move_tags: move every tag naming the old version to the new one.
        shred_old: then crypto-shred the old version (needs the admin role).
        threads: AEAD threads per file, for the reader and the writer.
        progress: called with each plaintext byte count re-sealed.

    Returns:
        A :class:`RekeyResult`.

    Raises:
        ValueError: the old version was crypto-shredded, a bad version name,
            or a key the new DEK cannot be wrapped to.
        FileExistsError: *version* exists (or a concurrent push took it).
        Refused: this machine's signer may not publish (or, with
            *shred_old*, is not an admin).
        KeyUnavailable: the old slots do not open here.
        AuthenticationError: an old object fails a check (nothing is committed).
        BackendError, NotFound: from the storage.
    """
    from sealstore.vault import lifecycle
    from sealstore.vault.auditing import record
    from sealstore.vault.pull import unwrap_version_key
    from sealstore.vault.push import _discard_after, _next_version, _tag_latest
    from sealstore.vault.store import default_tenant

    tenant = check_name(tenant or default_tenant(), "tenant")
    signer = store.require("admin" if shred_old else "publisher", tenant)
    store.renew(tenant)
    old, raw = store.manifest_with_bytes(ref, tenant=tenant)
    if old.shredded:
        raise ValueError(f"{old.name}:{old.version} was crypto-shredded; nothing to re-key")
    name = old.name
    existing = store.versions(name, tenant=tenant)
    new_version = check_name(version, "version") if version else _next_version(existing)
    if new_version in existing:
        raise FileExistsError(f"{name}:{new_version} already exists in tenant {tenant}")
    old_digest = hashlib.sha256(raw).hexdigest()
    tags = lifecycle._retag(store, old, old_digest, tenant) if move_tags else []
    context = version_context(tenant, name, new_version)
    wrappers = target_wrappers(list(to) or [slot.key_id for slot in old.slots])
    first = old.files[0]
    try:
        with store.storage.open_read(store.object_path(tenant, first.object)) as fp:
            first_pre = read_preamble(fp)
    except NotFound:
        raise NotFound(f"{name}:{old.version}/{first.path}: its object is missing") from None
    made: list[str] = []
    with unwrap_version_key(old, first_pre, identities) as old_dek, DataKey.generate() as dek:
        # Slots first: a key that cannot wrap fails before any upload.
        slots = make_slots(dek, wrappers, context)
        try:
            entries = [
                _reseal(
                    store,
                    old,
                    e,
                    old_dek,
                    dek,
                    context,
                    threads=threads,
                    progress=progress,
                    made=made,
                )
                for e in old.files
            ]
            bom = _carried_bom(store, old, new_version)
            bom_sha = None
            if bom is not None:
                bom_sha = hashlib.sha256(bom).hexdigest()
                bom_path = store.bom_path(tenant, name, new_version, bom_sha)
                store.storage.put_new(bom_path, bom)
                made.append("bom:" + bom_path)
            new = Manifest(
                store=store.id,
                tenant=tenant,
                name=name,
                version=new_version,
                created=now(),
                files=tuple(entries),
                slots=tuple(slots),
                parent=f"{name}:{old.version}",
                bom_sha256=bom_sha,
                signer=signer.signing_key_id,
                oms=old.oms,
            )
            store.storage.sync([store.object_path(tenant, e.object) for e in entries])
            # The commit point, as for a push: visible from here on, or not at all.
            store.commit_manifest(tenant, name, new_version, new.sign(signer))
        except BaseException as exc:
            _discard_after(exc, store, tenant, made)
            raise
    # Committed: the audit record first, so that nothing below can leave a key change
    # unrecorded; then the tags, each on its own (a retry would re-key once more).
    record(
        store,
        "rekey",
        tenant=tenant,
        artifact=name,
        version=new_version,
        detail={
            "signer": signer.signing_key_id,
            "from": old.version,
            "files": len(new.files),
            "bytes": new.size,
            "keys": [s.key_id for s in slots],
            "tags": tags,
        },
    )
    ref_new = f"{name}:{new_version}"
    moved: list[str] = []
    stuck: list[str] = []
    for tag in tags:
        try:
            store.tag(ref_new, tag, tenant=tenant, audit=False)
            moved.append(tag)
        except SealstoreError as exc:
            log.warning("re-keyed %s but could not move tag %s: %s", ref_new, tag, exc)
            stuck.append(tag)
    if move_tags and "latest" not in tags:
        try:
            _tag_latest(store, name, new_version, tenant)
        except SealstoreError as exc:
            log.warning("re-keyed %s but could not move its latest tag: %s", ref_new, exc)
    if stuck and shred_old:
        raise BackendError(
            f"re-keyed {name}:{old.version} to {ref_new}, but tag(s) {', '.join(stuck)} still "
            f"name the old version, so it was not shredded: move them with "
            f"'sealstore store tag' and shred {name}:{old.version}"
        )
    tags = moved
    tomb = lifecycle.shred(store, f"{name}:{old.version}", tenant=tenant) if shred_old else None
    return RekeyResult(old=old, new=new, tags=tags, shredded=tomb)
