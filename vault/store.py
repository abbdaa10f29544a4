"""The store: tenants, artifacts, versions and tags on an fsspec backend.

Layout (docs/STORE.md)::

    ROOT/sealstore.json                                   store id, root key, signers (signed)
    ROOT/tenants/T/artifacts/NAME/VERSION/manifest.json   signed: files, key slots, context, parent
    ROOT/tenants/T/artifacts/NAME/VERSION/bom.SHA256.cdx.json   CycloneDX ML-BOM
    ROOT/tenants/T/refs/NAME/TAG                          signed tags
    ROOT/objects/T/OBJECT                                 sealed objects (slots detached)

A version exists when its manifest does; the manifest is written last and
only if absent, so an interrupted push leaves nothing visible and two racing
pushes of one version cannot both win. Every read verifies signatures first:
the store config against the root key pinned on this machine, manifests and
tags against the store's signers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sealstore.errors import AuthenticationError, FormatError, NotFound, Refused, SealstoreError
from sealstore.format import DEFAULT_CHUNK_SIZE, DEFAULT_SUITE
from sealstore.kms.registry import default_keyring_path, sealstore_home
from sealstore.signing import (
    Signer,
    claimed_body,
    is_envelope,
    public_key_bytes,
    sign_document,
    verify_document,
)
from sealstore.vault import access
from sealstore.vault.manifest import (
    STORE_FORMAT,
    Manifest,
    Ref,
    check_name,
    dumps,
    loads,
    now,
    parse_ref,
    sign_tag,
    verify_tag,
)
from sealstore.vault.storage import Storage, open_storage

if TYPE_CHECKING:
    # Push, pull, verify, shred and rotate live in their own modules, imported on use.
    from sealstore.chunks import Progress
    from sealstore.kms.envelope import IdentitySpec, KeySpec
    from sealstore.vault.bom import BomSpec
    from sealstore.vault.pull import VerifyResult
    from sealstore.vault.rekey import RekeyResult

__all__ = ["Store", "default_store_url", "default_tenant", "pinned_root", "trust_store"]

CONFIG = "sealstore.json"
TENANT_ENV = "SEALSTORE_TENANT"
STORE_ENV = "SEALSTORE_STORE"


def default_store_url() -> str:
    """``$SEALSTORE_STORE``, else ``file://$SEALSTORE_HOME/store`` (the embedded default)."""
    return os.environ.get(STORE_ENV) or "file://" + str(sealstore_home() / "store")


def default_tenant() -> str:
    """``$SEALSTORE_TENANT``, else ``default``."""
    return check_name(os.environ.get(TENANT_ENV) or "default", "tenant")


def default_signer() -> Signer:
    """The local keyring's signing key (``$SEALSTORE_KEYRING`` or the default keyring)."""
    from sealstore.kms.local import LocalKeyring

    ring = LocalKeyring.open(default_keyring_path())
    if ring.signing_key_id is None:
        ring.sign(b"")  # raises KeyUnavailable with the remedy
    return ring  # type: ignore[return-value]


# -- trust pins: which root key this machine accepts for which store ------------------

_pins_lock = threading.Lock()


def _pins_path() -> Path:
    return sealstore_home() / "trust.json"


@contextmanager
def _pins_locked() -> Iterator[None]:
    """Hold the trust file for a read-modify-write, across threads and processes.

    Two commands on one machine each reading the file and writing it back
    would lose one's update: a rollback floor could go down, a pin vanish.
    """
    import fcntl

    path = _pins_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _pins_lock:
        fd = os.open(
            path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _load_pins() -> dict[str, Any]:
    try:
        doc = json.loads(_pins_path().read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"stores": {}, "urls": {}}
    except (OSError, ValueError):
        raise FormatError(f"trust file {_pins_path()} is unreadable") from None
    if not isinstance(doc, dict):
        raise FormatError(f"trust file {_pins_path()} is damaged")
    doc.setdefault("stores", {})
    doc.setdefault("urls", {})
    return doc


def _write_pins(pins: dict[str, Any]) -> None:
    from sealstore.fsutil import atomic_file

    path = _pins_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as fp:
        fp.write(json.dumps(pins, indent=1, sort_keys=True).encode() + b"\n")


def _save_pin(store_id: str, root: str, url: str) -> None:
    with _pins_locked():
        pins = _load_pins()
        pins["stores"][store_id] = root
        pins["urls"][url] = store_id
        _write_pins(pins)


def pinned_root(store_id: str) -> str | None:
    """The root key pinned on this machine for the store *store_id*, if any."""
    root = _load_pins()["stores"].get(store_id)
    return root if isinstance(root, str) else None


def pinned_counter(store_id: str, name: str) -> int:
    """The highest value of the store's monotonic counter *name* seen on this machine."""
    value = _load_pins().get("counters", {}).get(store_id, {}).get(name, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def pin_counter(store_id: str, name: str, value: int) -> None:
    """Remember *value* for the counter (never lowers it): a later lower value is a rollback."""
    with _pins_locked():
        pins = _load_pins()
        counters = pins.setdefault("counters", {}).setdefault(store_id, {})
        if value <= counters.get(name, 0):
            return
        counters[name] = value
        _write_pins(pins)


def trust_store(url: str | os.PathLike[str], root: str, **storage_options: Any) -> Store:
    """Pin *root* (an ``ed25519:`` key id) as the root key of the store at *url*.

    The store's config must verify under it. Afterwards the store opens here.

    Raises:
        AuthenticationError: the store's config is not signed by *root*.
    """
    public_key_bytes(root)
    storage = open_storage(url, **storage_options)
    raw = _read_config(storage)
    doc = claimed_body("store", raw, what=f"store config of {storage.url}")
    pinned = _load_pins()["stores"].get(doc.get("id"))
    if pinned is not None and pinned != root:
        # Another store's id with a different root: trusting it would re-root
        # the store already pinned under that id.
        raise AuthenticationError(
            f"store id {doc.get('id')} is already pinned here to root key {pinned}; "
            "refusing to re-root it"
        )
    if doc.get("root") != root:
        raise AuthenticationError(f"store {storage.url} has root key {doc.get('root')}, not {root}")
    _verify_config(raw, root, storage.url)
    _save_pin(str(doc["id"]), root, storage.url)
    return Store.open(url, **storage_options)


def _read_config(storage: Storage) -> dict[str, Any]:
    try:
        data = storage.read(CONFIG)
    except NotFound:
        raise NotFound(
            f"no sealstore store at {storage.url} (create one with: sealstore store init URL)"
        ) from None
    doc = loads(data, f"{storage.url}/{CONFIG}")
    # An envelope's format is checked once it is verified (_verify_config).
    if not is_envelope(doc) and doc.get("format") != STORE_FORMAT:
        raise FormatError(f"{storage.url} is not a sealstore store (format {doc.get('format')!r})")
    return doc


def _verify_config(doc: dict[str, Any], root: str, url: str) -> dict[str, Any]:
    body = verify_document("store", doc, [root], what=f"store config of {url}")
    if body.get("format") != STORE_FORMAT:
        raise FormatError(f"{url} is not a sealstore store (format {body.get('format')!r})")
    signers = body.get("signers")
    if not isinstance(signers, list) or not all(isinstance(s, str) for s in signers):
        raise FormatError(f"store config of {url} is malformed")
    if not isinstance(body.get("id"), str):
        raise FormatError(f"store config of {url} is malformed")
    access.check_access(body, f"store config of {url}")
    return body


class Store:
    """A sealstore model store.

    Open one with :meth:`Store.open` (or create it with :meth:`Store.init`);
    operations take a ``tenant`` (default ``$SEALSTORE_TENANT`` or
    ``default``) and see only that tenant's artifacts.
    """

    def __init__(self, storage: Storage, config: dict[str, Any], signer: Signer | None) -> None:
        self.storage = storage
        self._config = config
        self._signer = signer

    # -- opening ------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        url: str | os.PathLike[str] | None = None,
        *,
        signer: Signer | None = None,
        **storage_options: Any,
    ) -> Store:
        """Create a store at *url*; *signer* (default: the local keyring) becomes its root key.

        Raises:
            FileExistsError: a store already exists there.
        """
        signer = signer or default_signer()
        storage = open_storage(url or default_store_url(), **storage_options)
        if isinstance(storage.url, str) and storage.url.startswith("file://"):
            Path(storage.url[len("file://") :]).mkdir(parents=True, exist_ok=True)
        body: dict[str, Any] = {
            "format": STORE_FORMAT,
            "id": str(uuid.uuid4()),
            "created": now(),
            "root": signer.signing_key_id,
            "signers": [signer.signing_key_id],
            "access": {},  # roles on from the start: the root is admin, nobody else anything
        }
        doc = sign_document("store", body, signer)
        try:
            storage.put_new(CONFIG, dumps(doc))
        except FileExistsError:
            raise FileExistsError(f"a store already exists at {storage.url}") from None
        _save_pin(body["id"], signer.signing_key_id, storage.url)
        return cls(storage, body, signer)

    @classmethod
    def open(
        cls,
        url: str | os.PathLike[str] | None = None,
        *,
        signer: Signer | None = None,
        **storage_options: Any,
    ) -> Store:
        """Open the store at *url* (default: :func:`default_store_url`).

        The store's config must be signed by the root key pinned for it on
        this machine (``sealstore store trust``), or by this machine's own
        signing key (then it is pinned on first use).

        Raises:
            NotFound: no store there.
            AuthenticationError: the store is not trusted here, or its config
                was edited or swapped.
        """
        storage = open_storage(url or default_store_url(), **storage_options)
        raw = _read_config(storage)
        doc = claimed_body("store", raw, what=f"store config of {storage.url}")
        store_id, root = doc.get("id"), doc.get("root")
        pins = _load_pins()
        known_id = pins["urls"].get(storage.url)
        if known_id is not None and known_id != store_id:
            raise AuthenticationError(
                f"the store at {storage.url} was {known_id} and is now {store_id}: "
                "refusing a swapped store"
            )
        pinned = pins["stores"].get(store_id)
        mine = _own_signing_key(signer)
        if pinned is None:
            if root is None or root != mine:
                raise AuthenticationError(
                    f"store {storage.url} is not trusted on this machine (its config names root "
                    f"key {root}: confirm that with the store's owner, then run: sealstore store "
                    f"trust {storage.url} --root KEY)"
                )
            pinned = root
        if root != pinned:
            raise AuthenticationError(
                f"store {storage.url} now claims root key {root}, but {pinned} is pinned"
            )
        body = _verify_config(raw, pinned, storage.url)
        if pins["stores"].get(store_id) is None or known_id is None:
            _save_pin(str(store_id), pinned, storage.url)
        return cls(storage, body, signer)

    # -- facts ------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return str(self._config["id"])

    @property
    def url(self) -> str:
        return self.storage.url

    @property
    def root_key(self) -> str:
        return str(self._config["root"])

    @property
    def signers(self) -> list[str]:
        """The key ids whose manifests and tags this store accepts."""
        return list(self._config["signers"])

    def __repr__(self) -> str:
        return f"Store({self.url!r}, id={self.id!r})"

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            self._signer = default_signer()
        if self._signer.signing_key_id not in self.signers:
            raise AuthenticationError(
                f"signing key {self._signer.signing_key_id} is not a signer of store {self.url} "
                f"(its root can add it: sealstore store add-signer KEY)"
            )
        return self._signer

    @property
    def roles(self) -> dict[str, dict[str, str]]:
        """Signing key -> {tenant or ``"*"`` -> role}."""
        return access.roles_by_key(self._config)

    def role(self, key_id: str, tenant: str) -> str | None:
        """The role (reader, publisher, admin) of the signing key *key_id* in *tenant*."""
        return access.role_of(self._config, key_id, tenant)

    def signers_for(self, tenant: str, role: str) -> list[str]:
        """The signing keys whose documents of *tenant* need *role* (``"*"``: every tenant)."""
        return access.keys_with(self._config, tenant, role)

    def require(self, role: str, tenant: str) -> Signer:
        """This machine's signer, if it has *role* in *tenant*.

        Raises:
            Refused: it has not (readers of every other role's documents would
                refuse what it signed).
        """
        signer = self.signer
        if not access.covers(self.role(signer.signing_key_id, tenant), role):
            where = "every tenant" if tenant == access.WILDCARD else f"tenant {tenant}"
            raise Refused(
                f"signing key {signer.signing_key_id} needs the {role} role in {where} "
                f"of store {self.url} (an admin can grant it: sealstore store grant)"
            )
        return signer

    def grant(self, key_id: str, role: str | None, *, tenant: str = access.WILDCARD) -> None:
        """Give *key_id* *role* in *tenant* (None revokes it); the root key signs the change.

        Raises:
            AuthenticationError: this machine's signing key is not the store's root.
            ValueError: a bad key id, tenant or role, or the root's own role.
        """
        signer = self._signer or default_signer()
        if signer.signing_key_id != self.root_key:
            raise AuthenticationError("only the store's root key can change roles")
        body = access.with_grant(self._config, key_id, tenant, role)
        self.storage.put(CONFIG, dumps(sign_document("store", body, signer)))
        self._config = dict(body, signer=signer.signing_key_id)
        from sealstore.vault.auditing import record

        record(
            self,
            "policy.grant" if role else "policy.revoke",
            tenant=tenant,
            detail={"key": key_id, "role": role},
        )

    def add_signer(
        self, key_id: str, *, tenant: str = access.WILDCARD, role: str = "publisher"
    ) -> None:
        """Trust documents signed by *key_id*, as *role* in *tenant* (see :meth:`grant`)."""
        if self.role(key_id, tenant) == role:
            return
        self.grant(key_id, role, tenant=tenant)

    # -- paths ----------------------------------------------------------------------

    @staticmethod
    def version_dir(tenant: str, name: str, version: str) -> str:
        return f"tenants/{tenant}/artifacts/{name}/{version}"

    @staticmethod
    def object_path(tenant: str, obj: str) -> str:
        return f"objects/{tenant}/{obj}"

    # -- reading ------------------------------------------------------------------

    def artifacts(self, *, tenant: str | None = None) -> list[str]:
        """Names of the tenant's artifacts that have at least one version."""
        tenant = check_name(tenant or default_tenant(), "tenant")
        names = self.storage.list(f"tenants/{tenant}/artifacts")
        return [n for n in names if self.versions(n, tenant=tenant)]

    def versions(self, name: str, *, tenant: str | None = None) -> list[str]:
        """The artifact's versions (those with a manifest), oldest first."""
        tenant = check_name(tenant or default_tenant(), "tenant")
        check_name(name, "artifact name")
        base = f"tenants/{tenant}/artifacts/{name}"
        found = [
            rel.split("/")[-2]
            for rel in self.storage.walk(base)
            if rel.endswith("/manifest.json") and rel.count("/") == base.count("/") + 2
        ]
        return sorted(set(found), key=_version_key)

    def tags(
        self, name: str, *, tenant: str | None = None, skip_damaged: bool = False
    ) -> dict[str, str]:
        """Tag -> version for an artifact (every tag's signature verified).

        Args:
            skip_damaged: leave out tags that fail to verify instead of raising
                (listings; :meth:`check_tags` says what is wrong with them).

        Raises:
            AuthenticationError, FormatError: a tag fails (unless *skip_damaged*).
        """
        tenant = check_name(tenant or default_tenant(), "tenant")
        seq = self.sequence(tenant)
        if seq is not None:
            return {t: v for t, (v, _) in sorted(seq.tags(name).items())}
        out = {}
        for tag in self.tag_names(name, tenant=tenant):
            try:
                out[tag] = self._read_tag(tenant, name, tag)[0]
            except SealstoreError:
                if not skip_damaged:
                    raise
        return out

    def tag_names(self, name: str, *, tenant: str | None = None) -> list[str]:
        """The names of the artifact's tag files (none read or verified)."""
        tenant = check_name(tenant or default_tenant(), "tenant")
        return self.storage.list(f"tenants/{tenant}/refs/{check_name(name, 'artifact name')}")

    def sequence(self, tenant: str) -> Any:
        """The tenant's verified sequence (:mod:`sealstore.vault.freshness`); None before one.

        Raises:
            AuthenticationError: rolled back, expired, damaged or gone.
        """
        from sealstore.vault import freshness

        return freshness.current(self, tenant)

    def renew(self, tenant: str) -> None:
        """Before a write: re-sign the tenant's sequence if it has expired.

        A writer is a publisher about to sign a new sequence anyway; an expired
        one must not stop it from reading what it is about to tag or rotate.

        Raises:
            AuthenticationError: the sequence is rolled back or damaged.
        """
        from sealstore.vault import freshness

        seq = freshness.current(self, tenant, allow_expired=True)
        if seq is not None and seq.expired:
            freshness.commit(self, tenant)

    def check_sequence(self, tenant: str) -> str | None:
        """What is wrong with the tenant's sequence document, or None."""
        try:
            self.sequence(tenant)
        except SealstoreError as exc:
            return str(exc)
        return None

    def tagged_names(self, *, tenant: str | None = None) -> list[str]:
        """Names of the tenant's artifacts that have a version or a tag file.

        A superset of :meth:`artifacts`: an artifact whose every manifest was
        deleted still has its tags, and those are damage to report.
        """
        tenant = check_name(tenant or default_tenant(), "tenant")
        names = set(self.artifacts(tenant=tenant))
        names |= set(self.storage.list(f"tenants/{tenant}/refs"))
        return sorted(names)

    def check_tags(self, name: str, *, tenant: str | None = None) -> dict[str, str | None]:
        """Tag -> problem (None: sound) for every tag of an artifact.

        A tag is sound when its signature verifies and the version it names
        exists with the very manifest it signs. A tag naming a missing or
        unreadable version is damage: readers of that tag get nothing.
        """
        tenant = check_name(tenant or default_tenant(), "tenant")
        out: dict[str, str | None] = {}
        try:
            seq = self.sequence(tenant)
        except SealstoreError:
            seq = None  # reported once by check_sequence; the files are still checked
        listed = seq.tags(name) if seq is not None else {}
        for tag in sorted(set(self.tag_names(name, tenant=tenant)) | set(listed)):
            try:
                version, digest = self._read_tag_file(tenant, name, tag)
            except SealstoreError as exc:
                out[tag] = str(exc)
                continue
            if seq is not None and listed.get(tag) != (version, digest):
                said = listed.get(tag)
                out[tag] = (
                    f"{name}@{tag} names {name}:{version}, but the tenant's signed sequence "
                    + (f"says {name}:{said[0]}" if said else "does not list it")
                    + " (a tag file rolled back or left by an interrupted write; readers follow "
                    "the sequence)"
                )
                continue
            try:
                data = self.manifest_bytes(name, version, tenant=tenant)
            except NotFound:
                out[tag] = f"{name}@{tag} names {name}:{version}, whose manifest is missing"
                continue
            except SealstoreError as exc:
                out[tag] = f"{name}@{tag} names {name}:{version}, which is unreadable: {exc}"
                continue
            if hashlib.sha256(data).hexdigest() != digest:
                out[tag] = f"{name}@{tag}: the manifest of {name}:{version} is not the one tagged"
                continue
            try:
                self.check_manifest(data, tenant, name, version)
            except SealstoreError as exc:
                out[tag] = f"{name}@{tag} names {name}:{version}, which fails: {exc}"
                continue
            out[tag] = None
        return out

    def _read_tag(self, tenant: str, name: str, tag: str, seq: Any = False) -> tuple[str, str]:
        """(version, manifest sha256) of a tag as readers see it: from the tenant's
        signed sequence when it has one (*seq*: one already read), else its tag file."""
        if seq is False:
            seq = self.sequence(tenant)
        if seq is None:
            return self._read_tag_file(tenant, name, tag)
        from sealstore.vault.freshness import fresher

        entry = seq.tag(name, tag) or fresher(self, tenant, seq).tag(name, tag)
        if entry is None:
            raise NotFound(f"{name}@{tag} not found in tenant {tenant}")
        return entry

    def _read_tag_file(self, tenant: str, name: str, tag: str) -> tuple[str, str]:
        try:
            data = self.storage.read(f"tenants/{tenant}/refs/{name}/{tag}")
        except NotFound:
            raise NotFound(f"{name}@{tag} not found in tenant {tenant}") from None
        trusted = self.signers_for(tenant, "publisher")
        return verify_tag(data, trusted, store=self.id, tenant=tenant, name=name, tag=tag)

    def resolve(self, ref: str | Ref, *, tenant: str | None = None) -> tuple[str, str]:
        """(name, version) a reference names: a version, a tag, or the newest version."""
        tenant = check_name(tenant or default_tenant(), "tenant")
        r = parse_ref(ref) if isinstance(ref, str) else ref
        if r.version:
            return r.name, r.version
        seq = self.sequence(tenant)
        if r.tag:
            return r.name, self._read_tag(tenant, r.name, r.tag, seq)[0]
        return r.name, self._bare(tenant, r.name, seq)[0]

    def _bare(self, tenant: str, name: str, seq: Any) -> tuple[str, str | None]:
        """(version, tagged manifest sha256 or None) a bare NAME means: NAME@latest if
        that tag exists, else the newest version."""
        if seq is not None:
            entry = seq.tag(name, "latest")
            if entry is not None:
                return entry
            listed = sorted(seq.versions(name), key=_version_key)
            if listed:
                return listed[-1], None
        elif self.storage.exists(f"tenants/{tenant}/refs/{name}/latest"):
            return self._read_tag_file(tenant, name, "latest")
        versions = self.versions(name, tenant=tenant)
        if not versions:
            raise NotFound(f"artifact {name} not found in tenant {tenant}")
        return versions[-1], None

    def manifest_bytes(self, name: str, version: str, *, tenant: str) -> bytes:
        try:
            return self.storage.read(f"{self.version_dir(tenant, name, version)}/manifest.json")
        except NotFound:
            raise NotFound(f"{name}:{version} not found in tenant {tenant}") from None

    def manifest(self, ref: str | Ref, *, tenant: str | None = None) -> Manifest:
        return self.manifest_with_bytes(ref, tenant=tenant)[0]

    def manifest_with_bytes(
        self, ref: str | Ref, *, tenant: str | None = None
    ) -> tuple[Manifest, bytes]:
        """The verified manifest of a version.

        Raises:
            NotFound: no such artifact, version or tag.
            AuthenticationError: a bad signature, an untrusted signer, a manifest
                moved from elsewhere, or a tag pointing at a replaced manifest.
        """
        tenant = check_name(tenant or default_tenant(), "tenant")
        r = parse_ref(ref) if isinstance(ref, str) else ref
        seq = self.sequence(tenant)  # one small read: the tag and the manifest's hash
        name, tag, digest = r.name, r.tag, None
        if r.version is not None:
            version = r.version
        elif tag is not None:
            version, digest = self._read_tag(tenant, name, tag, seq)
        else:
            version, digest = self._bare(tenant, name, seq)
            tag = "latest" if digest is not None else None
        data = self.manifest_bytes(name, version, tenant=tenant)
        sha = hashlib.sha256(data).hexdigest()
        if tag is not None and sha != digest:
            raise AuthenticationError(
                f"{name}@{tag}: the manifest of {name}:{version} is not the one tagged"
            )
        m = self.check_manifest(data, tenant, name, version)
        if seq is not None and seq.manifest(name, version) != sha:
            self._check_listed(tenant, name, version, sha, seq)
        return m, data

    def _check_listed(self, tenant: str, name: str, version: str, sha: str, seq: Any) -> None:
        """Refuse a manifest the tenant's sequence does not list (after one look for a
        newer sequence: a writer may have committed between the two reads)."""
        from sealstore.vault.freshness import fresher

        listed = fresher(self, tenant, seq).manifest(name, version)
        if listed == sha:
            return
        if listed is None:
            raise AuthenticationError(
                f"{name}:{version} is not in the signed sequence of tenant {tenant} (a push "
                "still committing, or one interrupted: an admin lists it with sealstore "
                f"store refresh --tenant {tenant} --rebuild)"
            )
        raise AuthenticationError(
            f"the manifest of {name}:{version} is not the one the signed sequence of tenant "
            f"{tenant} lists (an older manifest put back?)"
        )

    def check_manifest(self, data: bytes, tenant: str, name: str, version: str) -> Manifest:
        """Verify manifest bytes of *tenant*/*name*:*version* with the roles: a publisher
        of the tenant signed it, and an admin if it is a crypto-shred tombstone.

        Raises:
            AuthenticationError: any signature or role check fails.
        """
        manifest = Manifest.verify(
            data,
            self.signers_for(tenant, "publisher"),
            store=self.id,
            tenant=tenant,
            name=name,
            version=version,
        )
        if manifest.shredded and manifest.signer not in self.signers_for(tenant, "admin"):
            raise AuthenticationError(
                f"{name}:{version}: a crypto-shred signed by {manifest.signer}, not by an admin"
            )
        return manifest

    def serving_manifest(self, ref: str | Ref, *, tenant: str | None = None) -> Manifest:
        """The verified manifest of a version that may be served (decrypted) now.

        Outside safe mode, :meth:`manifest`. In safe mode only the version the
        artifact's signed ``known-good`` tag names is served, and a bare NAME
        means that version (see ``sealstore.vault.safemode``).

        Raises:
            Refused: safe mode, and *ref* is not the known-good version.
        """
        from sealstore.vault.safemode import serving_manifest

        return serving_manifest(self, ref, tenant=tenant)

    def bom(self, ref: str | Ref, *, tenant: str | None = None) -> bytes:
        """The version's CycloneDX BoM, checked against the hash in its signed manifest."""
        tenant = check_name(tenant or default_tenant(), "tenant")
        m = self.manifest(ref, tenant=tenant)
        if not m.bom_sha256:
            raise NotFound(f"{m.name}:{m.version} has no BoM")
        data = self.storage.read(self.bom_path(tenant, m.name, m.version, m.bom_sha256))
        if hashlib.sha256(data).hexdigest() != m.bom_sha256:
            raise AuthenticationError(
                f"the BoM of {m.name}:{m.version} does not match its manifest"
            )
        return data

    def bom_path(self, tenant: str, name: str, version: str, digest: str) -> str:
        return f"{self.version_dir(tenant, name, version)}/bom.{digest}.cdx.json"

    # -- writing ------------------------------------------------------------------

    def tag(
        self,
        ref: str | Ref,
        tag: str,
        *,
        tenant: str | None = None,
        audit: bool = True,
        forward_only: bool = False,
    ) -> str:
        """Point *tag* at a version (replacing where it pointed). Returns the version.

        *audit* False: part of an operation with its own record (push, rotate, restore).
        *forward_only*: leave the tag where it is if it names a newer version
        (decided inside the sequence's commit, so racing writers cannot undo it).
        """
        from sealstore.vault.auditing import record

        tenant = check_name(tenant or default_tenant(), "tenant")
        check_name(tag, "tag")
        self.renew(tenant)
        m, raw = self.manifest_with_bytes(ref, tenant=tenant)
        if m.shredded:
            raise ValueError(f"{m.name}:{m.version} was crypto-shredded; it cannot be tagged")
        digest = hashlib.sha256(raw).hexdigest()  # the bytes verified, not a second read
        data = sign_tag(
            self.require("publisher", tenant),
            store=self.id,
            tenant=tenant,
            name=m.name,
            tag=tag,
            version=m.version,
            digest=digest,
        )
        self.storage.put(f"tenants/{tenant}/refs/{m.name}/{tag}", data)
        # Only the tag: the version is listed already (manifest_with_bytes checked),
        # and re-listing the digest read here could undo a rotation committed since.
        self._commit(
            tenant,
            tags={(m.name, tag): (m.version, digest)},
            forward=frozenset({(m.name, tag)}) if forward_only else frozenset(),
        )
        if audit:
            record(
                self, "tag", tenant=tenant, artifact=m.name, version=m.version, detail={"tag": tag}
            )
        return m.version

    def untag(self, name: str, tag: str, *, tenant: str | None = None) -> None:
        tenant = check_name(tenant or default_tenant(), "tenant")
        check_name(name, "artifact name")
        self.require("publisher", tenant)
        self.storage.delete(f"tenants/{tenant}/refs/{name}/{check_name(tag, 'tag')}")
        self._commit(tenant, tags={(name, tag): None})
        from sealstore.vault.auditing import record

        record(self, "untag", tenant=tenant, artifact=name, detail={"tag": tag})

    def replace_manifest(self, m: Manifest, expected: bytes, new: bytes) -> None:
        """Replace a version's manifest, if it is still *expected* (rotate, shred).

        The storage has no compare-and-swap on every backend, so this re-reads
        just before the write: a concurrent change in between is refused
        instead of overwritten (a rotation must never resurrect the slots a
        shred destroyed). The window left is the time of one write.

        Raises:
            FileExistsError: the manifest changed since it was read; retry.
        """
        path = f"{self.version_dir(m.tenant, m.name, m.version)}/manifest.json"
        if self.storage.read(path) != expected:
            raise FileExistsError(
                f"{m.name}:{m.version} changed while this operation ran (a concurrent rotate "
                "or rm); nothing was written, run it again"
            )
        self.storage.put(path, new)
        self._commit(m.tenant, versions={(m.name, m.version): hashlib.sha256(new).hexdigest()})

    def commit_manifest(self, tenant: str, name: str, version: str, data: bytes) -> None:
        """Create a version's manifest if absent (a push's commit point) and list it.

        Raises:
            FileExistsError: the version exists (another push won).
        """
        self.storage.put_new(f"{self.version_dir(tenant, name, version)}/manifest.json", data)
        self._commit(tenant, versions={(name, version): hashlib.sha256(data).hexdigest()})

    def _commit(
        self,
        tenant: str,
        *,
        versions: Mapping[tuple[str, str], str] | None = None,
        tags: Mapping[tuple[str, str], tuple[str, str] | None] | None = None,
        forward: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        """Record written tags and manifests in the tenant's signed sequence.

        Then the tag files are made to agree with it: of two writers moving one
        tag at once, the one whose file landed last may not be the one the
        sequence kept; the sequence wins and the file is re-signed to match.
        """
        from sealstore.vault import freshness

        seq = freshness.commit(self, tenant, versions=versions, tags=tags, forward=forward)
        if tags:
            seq = freshness.fresher(self, tenant, seq)  # the newest, whoever wrote it
        for name, tag in tags or {}:
            entry = seq.tag(name, tag)
            path = f"tenants/{tenant}/refs/{name}/{tag}"
            try:
                now_file = self._read_tag_file(tenant, name, tag)
            except SealstoreError:
                now_file = None
            if entry == now_file:
                continue
            if entry is None:
                self.storage.delete(path)
            else:
                signer = self.require("publisher", tenant)
                data = sign_tag(
                    signer,
                    store=self.id,
                    tenant=tenant,
                    name=name,
                    tag=tag,
                    version=entry[0],
                    digest=entry[1],
                )
                self.storage.put(path, data)

    # Push, pull, verify, shred and rotate live in their own modules.

    def push(
        self,
        src: str | os.PathLike[str] | Mapping[str, Any],
        ref: str,
        *,
        tenant: str | None = None,
        keys: Sequence[KeySpec] = (),
        dek_from: KeySpec | None = None,
        parent: str | None = "auto",
        bom: BomSpec | str | os.PathLike[str] | None = None,
        suite: str = DEFAULT_SUITE,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        threads: int = 2,
        progress: Progress | None = None,
        tag_latest: bool = True,
        follow_outside_links: bool = False,
        sign_key: str | os.PathLike[str] | bytes | None = None,
        sign_cert: str | os.PathLike[str] | bytes | None = None,
        require_signature: bool = False,
        public_key: str | os.PathLike[str] | bytes | None = None,
        signature: str | os.PathLike[str] | None = None,
    ) -> Manifest:
        """Push a file or a directory as a new version of an artifact.

        Args:
            src: a file, a directory, or ``{artifact path: bytes}`` sealed from memory.
            ref: ``NAME`` (the next numeric version) or ``NAME:VERSION``.
            tenant, keys, dek_from, parent, bom: as :func:`sealstore.vault.push.push`.
            suite, chunk_size, threads, progress, tag_latest: as there.
            follow_outside_links, sign_key, sign_cert: as there.
            require_signature, public_key, signature: as there.

        Returns:
            The committed manifest.

        Raises:
            FileExistsError: the version exists (or another push of it won a race).
            ValueError: no keys, a bad name, a BoM spec problem, a bad signing key...
            AuthenticationError: a required model signature does not verify.
            FormatError, KeyUnavailable, BackendError: as :func:`sealstore.vault.push.push`.
        """
        from sealstore.vault.push import push

        return push(
            self,
            src,
            ref,
            tenant=tenant,
            keys=keys,
            dek_from=dek_from,
            parent=parent,
            bom=bom,
            suite=suite,
            chunk_size=chunk_size,
            threads=threads,
            progress=progress,
            tag_latest=tag_latest,
            follow_outside_links=follow_outside_links,
            sign_key=sign_key,
            sign_cert=sign_cert,
            require_signature=require_signature,
            public_key=public_key,
            signature=signature,
        )

    def pull(
        self,
        ref: str,
        dest: str | os.PathLike[str],
        *,
        tenant: str | None = None,
        identities: Sequence[IdentitySpec] = (),
        threads: int = 2,
        progress: Progress | None = None,
        files: Sequence[str] | None = None,
        force: bool = False,
        signature: str | os.PathLike[str] | None = None,
    ) -> Manifest:
        """Pull a version into *dest*, every file authenticated before it appears.

        Args:
            ref, dest, tenant, identities, threads, progress, files, force, signature: as
                :func:`sealstore.vault.pull.pull`.

        Returns:
            The version's manifest.

        Raises:
            As :func:`sealstore.vault.pull.pull`.
        """
        from sealstore.vault.pull import pull

        return pull(
            self,
            ref,
            dest,
            tenant=tenant,
            identities=identities,
            threads=threads,
            progress=progress,
            files=files,
            force=force,
            signature=signature,
        )

    def verify(
        self,
        ref: str | None = None,
        *,
        tenant: str | None = None,
        identities: Sequence[IdentitySpec] = (),
        threads: int = 2,
        decrypt: bool = True,
        progress: Progress | None = None,
    ) -> list[VerifyResult]:
        """Verify a version (or, without *ref*, every version of the tenant).

        Args:
            ref, tenant, identities, threads, decrypt, progress: as
                :func:`sealstore.vault.pull.verify`.

        Returns:
            One result per version checked.

        Raises:
            As :func:`sealstore.vault.pull.verify`.
        """
        from sealstore.vault.pull import verify

        return verify(
            self,
            ref,
            tenant=tenant,
            identities=identities,
            threads=threads,
            decrypt=decrypt,
            progress=progress,
        )

    def shred(self, ref: str, *, tenant: str | None = None) -> Manifest:
        """Crypto-shred a version, as :func:`sealstore.vault.lifecycle.shred`.

        Args:
            ref: the version (``NAME:VERSION`` or ``NAME@TAG``).
            tenant: the tenant (default ``$SEALSTORE_TENANT`` or ``default``).

        Returns:
            The signed tombstone manifest now stored for the version.
        """
        from sealstore.vault.lifecycle import shred

        return shred(self, ref, tenant=tenant)

    def rotate(
        self,
        ref: str,
        to: Sequence[str],
        *,
        remove: Sequence[str] = (),
        identities: Sequence[IdentitySpec] = (),
        tenant: str | None = None,
    ) -> Manifest:
        """Re-wrap a version's DEK: add a slot per *to* key, drop the *remove* keys' slots.

        Args:
            ref, to, remove, identities, tenant: as :func:`sealstore.vault.lifecycle.rotate`.

        Returns:
            The new signed manifest.

        Raises:
            ValueError: nothing to do, or no slot would remain.
            KeyUnavailable: the current slots do not open here.
        """
        from sealstore.vault.lifecycle import rotate

        return rotate(self, ref, to, remove=remove, identities=identities, tenant=tenant)

    def rekey(
        self,
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
        """Re-encrypt a version's files under a fresh DEK, as a new version.

        Args:
            ref, tenant, version, to, identities, move_tags, shred_old, threads, progress:
                as :func:`sealstore.vault.rekey.rekey_version`.

        Returns:
            A :class:`~sealstore.vault.rekey.RekeyResult`.
        """
        from sealstore.vault.rekey import rekey_version

        return rekey_version(
            self,
            ref,
            tenant=tenant,
            version=version,
            to=to,
            identities=identities,
            move_tags=move_tags,
            shred_old=shred_old,
            threads=threads,
            progress=progress,
        )


def _own_signing_key(signer: Signer | None) -> str | None:
    if signer is not None:
        return signer.signing_key_id
    try:
        from sealstore.kms.local import LocalKeyring

        return LocalKeyring.open(default_keyring_path()).signing_key_id
    except Exception:
        return None


def _version_key(v: str) -> tuple[int, int, str]:
    return (0, int(v), "") if re.fullmatch(r"[0-9]{1,18}", v) else (1, 0, v)
