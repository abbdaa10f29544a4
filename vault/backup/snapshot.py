"""The snapshot format: the signed records a backup writes, and how they are read back.

A snapshot (``snapshots/ID.json``) is a document signed by a store signer
naming what the store held: each version's manifest and BoM (by SHA-256),
its escrow slots, the tags, the tenants' sequence documents and every
object's digest and size. Documents sit in the location by content
(``docs/sha256-HEX``, ``objects/blake3-HEX``); a snapshot is read back only
through :func:`load_snapshot`, which verifies it against the store's root key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sealstore.errors import (
    AuthenticationError,
    FormatError,
    NotFound,
    SealstoreError,
)
from sealstore.keys import KeySlot
from sealstore.signing import claimed_body, verify_document
from sealstore.vault.backup.locks import _check_repo
from sealstore.vault.manifest import (
    Manifest,
    check_name,
    loads,
)
from sealstore.vault.storage import Storage, open_storage

SNAPSHOT_FORMAT = "sealstore-snapshot-v1"
CONFIG = "sealstore.json"
_SNAPSHOT_ID = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9a-f]{8}(\.[0-9a-f]{4})*")


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
        signers,
        store=store_id,
        tenant=rec.tenant,
        name=rec.name,
        version=rec.version,
    )


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
        raw = loads(dest.read(f"snapshots/{snapshot_id}.json"), where)
    except NotFound:
        raise NotFound(f"no snapshot {snapshot_id} in {dest.url}") from None
    doc = claimed_body("snapshot", raw, what=where)
    if doc.get("store") != store_id or doc.get("id") != snapshot_id:
        raise AuthenticationError(f"{where} belongs to another store or name")
    from sealstore.vault.store import _verify_config

    config_sha = _hex(doc.get("config"))
    config_doc = loads(_read_doc(dest, config_sha, "the store config"), "store config")
    if claimed_body("store", config_doc, what=f"{where}: its store config").get("id") != store_id:
        raise AuthenticationError(f"{where}: its store config is another store's")
    config = _verify_config(config_doc, _trusted_root(store_id, root), dest.url)
    body = verify_document("snapshot", raw, config["signers"], what=where)
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
            doc = claimed_body("snapshot", loads(dest.read(f"snapshots/{sid}.json"), sid), what=sid)
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


def _verified_snapshots(dest: Storage, root: str) -> Iterator[Snapshot]:
    """The snapshots at *dest* that verify under *root*, newest first (the others skipped)."""
    for sid in reversed(snapshot_ids(dest)):
        try:
            yield load_snapshot(dest, sid, root=root)[0]
        except (SealstoreError, ValueError):
            continue
