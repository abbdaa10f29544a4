"""Store roles: reader < publisher < admin per tenant, enforced when documents are read."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from pathlib import Path

import pytest

from sealstore.audit import read_records
from sealstore.errors import AuthenticationError, Refused
from sealstore.kms.local import LocalKeyring
from sealstore.signing import sign_document
from sealstore.vault import backup, safemode
from sealstore.vault.manifest import STORE_FORMAT, dumps, now, sign_tag
from sealstore.vault.storage import open_storage
from sealstore.vault.store import Store
from tests.conftest import make_keyring
from tests.signed_docs import fields

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import fails, ok
from tests.test_cli import in_process as run
from tests.test_store import model_dir


@pytest.fixture
def pub(tmp_path: Path) -> LocalKeyring:
    """A second machine's keyring (same home, so the store is pinned for it too)."""
    return make_keyring(tmp_path / "pub.json")


def kid(ring: LocalKeyring) -> str:
    return str(ring.signing_key_id)


def manifest_path(tenant: str, name: str, version: str) -> str:
    return f"tenants/{tenant}/artifacts/{name}/{version}/manifest.json"


def small(tmp_path: Path, sub: str = "src") -> Path:
    return model_dir(tmp_path / sub, {"w.bin": 1000})


def test_a_new_store_has_roles_on(store: Store, ring: LocalKeyring, pub: LocalKeyring) -> None:
    config = fields(json.loads(store.storage.read("sealstore.json")))
    assert config["access"] == {}
    assert store.roles == {kid(ring): {"*": "admin"}}
    for tenant in ("default", "a", "*"):
        assert store.role(kid(ring), tenant) == "admin"
        assert store.signers_for(tenant, "admin") == [kid(ring)]
    assert store.role(kid(pub), "default") is None
    with pytest.raises(AuthenticationError, match="not a signer"):
        Store.open(store.url, signer=pub).require("reader", "default")


def test_publisher_of_one_tenant(
    store: Store, tmp_path: Path, ring: LocalKeyring, pub: LocalKeyring
) -> None:
    store.grant(kid(pub), "publisher", tenant="a")
    assert store.roles[kid(pub)] == {"a": "publisher"}
    assert store.signers_for("a", "publisher") == [kid(ring), kid(pub)]
    assert store.signers_for("b", "publisher") == [kid(ring)]
    assert store.signers_for("a", "admin") == [kid(ring)]
    as_pub = Store.open(store.url, signer=pub)
    assert as_pub.require("publisher", "a").signing_key_id == kid(pub)
    m = as_pub.push(small(tmp_path), "m", tenant="a", keys=["local:"])
    assert m.signer == kid(pub)
    reader = Store.open(store.url)
    assert reader.manifest("m", tenant="a").signer == kid(pub)  # its latest tag too
    reader.pull("m:1", tmp_path / "out", tenant="a")
    with pytest.raises(Refused, match="needs the publisher role in tenant b"):
        as_pub.require("publisher", "b")
    with pytest.raises(Refused, match="tenant b"):
        as_pub.push(small(tmp_path), "m", tenant="b", keys=["local:"])
    assert store.storage.list("objects/b") == []  # refused before uploading anything
    with pytest.raises(Refused, match="needs the admin role in tenant a"):
        as_pub.require("admin", "a")
    with pytest.raises(Refused, match="admin"):
        as_pub.shred("m:1", tenant="a")
    with pytest.raises(Refused, match="admin"):
        as_pub.rotate("m:1", [f"local:{pub.path}"], tenant="a")
    with pytest.raises(Refused, match="admin role in every tenant"):
        safemode.enter(as_pub, "not mine to call")
    assert not reader.manifest("m:1", tenant="a").shredded
    assert not safemode.status(reader).enabled
    assert as_pub.tag("m:1", "prod", tenant="a") == "1"  # tagging is a publisher's
    with pytest.raises(AuthenticationError, match="only the store's root key"):
        as_pub.grant(kid(pub), "admin", tenant="a")


def test_documents_signed_without_the_role_are_refused(
    store: Store, tmp_path: Path, pub: LocalKeyring
) -> None:
    store.grant(kid(pub), "publisher", tenant="a")
    for tenant in ("a", "b"):
        store.push(small(tmp_path), "w", tenant=tenant, keys=["local:"])
        store.push(small(tmp_path), "x", tenant=tenant, keys=["local:"])
    # A publisher of a re-signs manifests (a well-formed signature each): in a
    # as a store write (listed in a's signed sequence), in b straight into the bucket.
    m = store.manifest("w:1", tenant="a")
    Store.open(store.url, signer=pub).replace_manifest(
        m, store.manifest_bytes("w", "1", tenant="a"), m.sign(pub)
    )
    m = store.manifest("w:1", tenant="b")
    store.storage.put(manifest_path("b", "w", "1"), m.sign(pub))
    reader = Store.open(store.url)
    assert reader.manifest("w:1", tenant="a").signer == kid(pub)
    with pytest.raises(AuthenticationError, match="untrusted key"):
        reader.manifest("w:1", tenant="b")
    with pytest.raises(AuthenticationError, match="untrusted key"):
        reader.pull("w:1", tmp_path / "out", tenant="b")
    assert not (tmp_path / "out").exists()
    # A tag of b signed by it -- and the sequence of b that readers resolve tags with.
    raw = store.manifest_bytes("x", "1", tenant="b")
    digest = hashlib.sha256(raw).hexdigest()
    forged = sign_tag(
        pub, store=store.id, tenant="b", name="x", tag="latest", version="1", digest=digest
    )
    store.storage.put("tenants/b/refs/x/latest", forged)
    seq = json.loads(store.storage.read("tenants/b/sequence.json"))
    body = fields(seq)
    body["serial"] += 1
    store.storage.put("tenants/b/sequence.json", dumps(sign_document("sequence", body, pub)))
    with pytest.raises(AuthenticationError, match="untrusted key"):
        reader.manifest("x@latest", tenant="b")
    store.storage.put("tenants/b/sequence.json", dumps(seq))
    # A crypto-shred tombstone in its own tenant: a publisher cannot destroy a version.
    m = store.manifest("x:1", tenant="a")
    tomb = dataclasses.replace(m, slots=(), shredded=now(), signer=kid(pub))
    store.storage.put(manifest_path("a", "x", "1"), tomb.sign(pub))
    with pytest.raises(AuthenticationError, match="not by an admin"):
        reader.manifest("x:1", tenant="a")
    # As an admin of a it may shred there (and its tombstones are accepted).
    store.grant(kid(pub), "admin", tenant="a")
    as_admin = Store.open(store.url, signer=pub)
    done = as_admin.shred("w:1", tenant="a")
    assert done.shredded and done.signer == kid(pub)
    assert Store.open(store.url).manifest("w:1", tenant="a").shredded == done.shredded
    # The tombstone put into the bucket earlier is a valid signature now, but no
    # store write listed it in a's signed sequence: still refused.
    with pytest.raises(AuthenticationError, match="signed sequence"):
        Store.open(store.url).manifest("x:1", tenant="a")
    with pytest.raises(Refused, match="needs the admin role in tenant b"):
        as_admin.shred("x:1", tenant="b")


def test_a_reader_signs_nothing_anyone_accepts(
    store: Store, tmp_path: Path, pub: LocalKeyring
) -> None:
    store.grant(kid(pub), "reader", tenant="*")
    store.push(small(tmp_path), "w", keys=["local:"])
    as_reader = Store.open(store.url, signer=pub)
    as_reader.pull("w:1", tmp_path / "out")  # reading is no store permission
    with pytest.raises(Refused, match="needs the publisher role"):
        as_reader.push(small(tmp_path), "w", keys=["local:"])
    with pytest.raises(Refused, match="needs the publisher role"):
        as_reader.tag("w:1", "prod")
    m = store.manifest("w:1")
    store.storage.put(manifest_path("default", "w", "1"), m.sign(pub))
    with pytest.raises(AuthenticationError, match="untrusted key"):
        store.manifest("w:1")


def test_revoke(store: Store, tmp_path: Path, pub: LocalKeyring) -> None:
    store.grant(kid(pub), "publisher", tenant="a")
    store.grant(kid(pub), "reader", tenant="b")
    as_pub = Store.open(store.url, signer=pub)
    as_pub.push(small(tmp_path), "m", tenant="a", keys=["local:"])
    store.grant(kid(pub), None, tenant="a")
    assert store.roles[kid(pub)] == {"b": "reader"}
    reader = Store.open(store.url)
    with pytest.raises(AuthenticationError, match="untrusted key"):
        reader.manifest("m:1", tenant="a")  # its old manifests go with its role
    with pytest.raises(Refused, match="tenant a"):
        Store.open(store.url, signer=pub).push(small(tmp_path), "m", tenant="a", keys=["local:"])
    store.grant(kid(pub), None, tenant="b")  # no role left anywhere: no longer a signer
    assert kid(pub) not in store.signers and kid(pub) not in store.roles
    with pytest.raises(AuthenticationError, match="not a signer"):
        Store.open(store.url, signer=pub).push(small(tmp_path), "m", tenant="a", keys=["local:"])
    actions = [
        (r["action"], r["tenant"], r["detail"]["role"])
        for r in read_records(store.storage)
        if r["action"].startswith("policy.")
    ]
    assert actions == [
        ("policy.grant", "a", "publisher"),
        ("policy.grant", "b", "reader"),
        ("policy.revoke", "a", None),
        ("policy.revoke", "b", None),
    ]


def test_bad_grants(store: Store, ring: LocalKeyring, pub: LocalKeyring) -> None:
    with pytest.raises(ValueError, match="root key is admin everywhere"):
        store.grant(kid(ring), "reader", tenant="a")
    with pytest.raises(ValueError, match="role must be one of"):
        store.grant(kid(pub), "owner", tenant="a")
    with pytest.raises(ValueError, match="tenant"):
        store.grant(kid(pub), "reader", tenant="../a")
    assert store.roles == {kid(ring): {"*": "admin"}}


def test_a_bad_key_id_is_a_value_error(store: Store) -> None:
    """Store.grant: "Raises: ValueError: a bad key id, tenant or role" (misuse, exit 2)."""
    with pytest.raises(ValueError):
        store.grant("ed25519:not-a-key", "reader", tenant="a")


# -- the CLI ---------------------------------------------------------------------------


def test_roles_from_the_cli(
    store: Store, tmp_path: Path, ring: LocalKeyring, pub: LocalKeyring
) -> None:
    root = {"SEALSTORE_STORE": store.url}
    as_pub = dict(root, SEALSTORE_KEYRING=str(pub.path))
    ok(run("store", "grant", kid(pub), "publisher", "--tenant", "a", env=root))
    info = json.loads(ok(run("store", "info", "--json", env=root)).stdout)
    assert info["roles"] == {kid(ring): {"*": "admin"}, kid(pub): {"a": "publisher"}}
    assert info["signers"] == [kid(ring), kid(pub)]
    src = small(tmp_path)
    Store.open(store.url, signer=pub).push(src, "m", tenant="a", keys=["local:"])
    line = fails(run("push", src, "m", "--tenant", "b", "-k", "local:", env=as_pub), 8)
    assert "needs the publisher role in tenant b" in line
    line = fails(run("rm", "m:1", "--yes", "--tenant", "a", env=as_pub), 8)
    assert "needs the admin role in tenant a" in line
    line = fails(run("store", "grant", kid(pub), "admin", env=as_pub), 1)
    assert "only the store's root key" in line
    third = make_keyring(tmp_path / "third.json")
    ok(run("store", "add-signer", kid(third), "--role", "reader", "--tenant", "b", env=root))
    text = ok(run("store", "info", env=root)).stdout.decode()
    assert f"signer   {kid(third)}  b=reader" in text
    ok(run("store", "revoke", kid(pub), "--tenant", "a", env=root))
    info = json.loads(ok(run("store", "info", "--json", env=root)).stdout)
    assert kid(pub) not in info["roles"] and kid(pub) not in info["signers"]
    line = fails(run("pull", "m:1", "--tenant", "a", "-o", tmp_path / "out", env=root), 1)
    assert "untrusted key" in line


# -- stores made before roles --------------------------------------------------------------


@pytest.fixture
def legacy(tmp_path: Path, ring: LocalKeyring, pub: LocalKeyring) -> Store:
    """A store config as written before roles: signers, no ``access``."""
    url = f"file://{tmp_path}/old"
    body = {
        "format": STORE_FORMAT,
        "id": str(uuid.uuid4()),
        "created": now(),
        "root": kid(ring),
        "signers": [kid(ring), kid(pub)],
    }
    open_storage(url).put_new("sealstore.json", dumps(sign_document("store", body, ring)))
    return Store.open(url)


def test_legacy_store_every_signer_is_admin(
    legacy: Store, tmp_path: Path, ring: LocalKeyring, pub: LocalKeyring
) -> None:
    assert legacy.roles == {kid(ring): {"*": "admin"}, kid(pub): {"*": "admin"}}
    assert legacy.role(kid(pub), "anything") == "admin"
    as_pub = Store.open(legacy.url, signer=pub)
    as_pub.push(small(tmp_path), "m", tenant="x", keys=["local:"])
    assert as_pub.shred("m:1", tenant="x").signer == kid(pub)
    assert Store.open(legacy.url).manifest("m:1", tenant="x").shredded
    safemode.enter(as_pub)
    safemode.exit_safe_mode(as_pub)


def test_first_grant_keeps_old_signers_as_admins(
    legacy: Store, tmp_path: Path, ring: LocalKeyring, pub: LocalKeyring
) -> None:
    third = make_keyring(tmp_path / "third.json")
    legacy.grant(kid(third), "reader", tenant="t")
    config = fields(json.loads(legacy.storage.read("sealstore.json")))
    assert config["access"] == {"*": {kid(pub): "admin"}, "t": {kid(third): "reader"}}
    assert config["signers"] == [kid(ring), kid(pub), kid(third)]
    again = Store.open(legacy.url)
    assert again.roles == {
        kid(ring): {"*": "admin"},
        kid(pub): {"*": "admin"},
        kid(third): {"t": "reader"},
    }
    assert Store.open(legacy.url, signer=pub).require("admin", "t").signing_key_id == kid(pub)
    with pytest.raises(Refused):
        Store.open(legacy.url, signer=third).require("publisher", "t")
    # Narrowing the old signer now works like on any store.
    again.grant(kid(pub), "publisher", tenant="x")
    again.grant(kid(pub), None, tenant="*")
    assert Store.open(legacy.url).roles[kid(pub)] == {"x": "publisher"}


# -- backups and restores judge documents by the same roles ---------------------------------


def test_restore_repairs_a_tombstone_forged_by_a_publisher(
    store: Store, tmp_path: Path, pub: LocalKeyring
) -> None:
    """Readers refuse a shred a publisher signed; a restore must not take it as a real shred."""
    store.grant(kid(pub), "publisher", tenant="default")
    src = small(tmp_path)
    store.push(src, "m", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    backup.create(store, url)
    m = store.manifest("m:1")
    tomb = dataclasses.replace(m, slots=(), shredded=now(), signer=kid(pub))
    store.storage.put(manifest_path("default", "m", "1"), tomb.sign(pub))
    with pytest.raises(AuthenticationError, match="not by an admin"):
        store.manifest("m:1")
    report = backup.restore(url, store=store)
    assert report.skipped == []
    Store.open(store.url).pull("m:1", tmp_path / "out")


def test_restore_repairs_a_manifest_signed_by_a_reader(
    store: Store, tmp_path: Path, pub: LocalKeyring
) -> None:
    """A manifest re-signed by a key with no publisher role fails for readers: restore it."""
    store.grant(kid(pub), "reader", tenant="default")
    store.push(small(tmp_path), "m", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    backup.create(store, url)
    store.storage.put(manifest_path("default", "m", "1"), store.manifest("m:1").sign(pub))
    with pytest.raises(AuthenticationError, match="untrusted key"):
        store.manifest("m:1")
    backup.restore(url, store=store)
    assert Store.open(store.url).manifest("m:1").signer != kid(pub)


def test_rotate_checks_the_role_before_asking_for_the_key(
    store: Store, tmp_path: Path, pub: LocalKeyring
) -> None:
    """Like push, rotate must refuse a non-admin before it unwraps (asks a KMS for) the DEK."""
    gone = make_keyring(tmp_path / "gone.json")
    store.grant(kid(pub), "publisher", tenant="a")
    store.push(small(tmp_path), "m", tenant="a", keys=[f"local:{gone.path}"])
    Path(gone.path).unlink()  # the key service would be asked first: here, it cannot answer
    with pytest.raises(Refused, match="needs the admin role in tenant a"):
        Store.open(store.url, signer=pub).rotate("m:1", [f"local:{pub.path}"], tenant="a")
