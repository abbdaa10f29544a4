"""Re-keying a store version (``sealstore store rekey``) on file:// and on SeaweedFS S3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sealstore.errors import AuthenticationError, BackendError, KeyUnavailable, Refused
from sealstore.format import open_payload_key, read_preamble
from sealstore.kms.local import LocalKeyring
from sealstore.vault.bom import validate_bom
from sealstore.vault.pull import unwrap_version_key
from sealstore.vault.rekey import rekey_version
from sealstore.vault.store import Store
from tests.conftest import make_keyring
from tests.s3util import incomplete_uploads, new_bucket, s3_options
from tests.test_cli import fails, ok, run
from tests.test_store import model_dir, same_tree

SIZES = {"config.json": 300, "model.safetensors": 3 * (1 << 20) + 17, "t/vocab.txt": 5000}


@pytest.fixture
def ring(keyring_path: Path) -> LocalKeyring:
    return make_keyring(keyring_path)


@pytest.fixture(params=["file", "seaweedfs"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path, ring: LocalKeyring) -> Store:
    if request.param == "file":
        return Store.init(f"file://{tmp_path}/store")
    services = request.getfixturevalue("services")
    opts = s3_options(services["s3_url"], services["s3_key"], services["s3_secret"])
    store = Store.init(f"s3://{new_bucket(opts)}/models", **opts)
    store.test_options = opts  # type: ignore[attr-defined]
    return store


def _header(store: Store, m: Any, path: str) -> Any:
    entry = next(e for e in m.files if e.path == path)
    with store.storage.open_read(store.object_path(m.tenant, entry.object)) as fp:
        return read_preamble(fp)


def _objects(store: Store) -> set[str]:
    return set(store.storage.walk("objects"))


def test_rekey_writes_a_new_version_under_a_fresh_key(any_store: Store, tmp_path: Path) -> None:
    store = any_store
    src = model_dir(tmp_path, SIZES)
    old = store.push(src, "m", keys=["local:"])
    store.tag("m:1", "known-good")
    done = rekey_version(store, "m@known-good")
    new = done.new
    assert (new.version, new.parent, sorted(done.tags)) == ("2", "m:1", ["known-good", "latest"])
    assert store.tags("m") == {"latest": "2", "known-good": "2"}
    # Same files, same plaintext digests, new objects.
    assert [(f.path, f.size, f.sha256) for f in new.files] == [
        (f.path, f.size, f.sha256) for f in old.files
    ]
    assert not {f.object for f in new.files} & {f.object for f in old.files}
    # A fresh DEK: the old one fails the new objects' key commitment.
    pre_old = _header(store, old, "model.safetensors")
    pre_new = _header(store, new, "model.safetensors")
    assert pre_new.header.context["version"] == "2"
    with unwrap_version_key(old, pre_old) as old_dek, pytest.raises(AuthenticationError):
        open_payload_key(pre_new.header, old_dek)
    store.pull("m@known-good", tmp_path / "new")
    assert same_tree(src, tmp_path / "new")
    assert all(r.ok for r in store.verify("m:2"))
    # The BoM is the old one, renamed to the new version.
    bom = store.bom("m:2")
    assert validate_bom(bom) is None
    comp = json.loads(bom)["metadata"]["component"]
    props = {p["name"]: p["value"] for p in comp["properties"]}
    assert (comp["version"], props["sealstore:rekeyed-from"]) == ("2", "1")
    assert {c["name"] for c in comp["components"]} == set(SIZES)
    # The old version is still there and readable until it is shredded.
    store.pull("m:1", tmp_path / "old")
    assert same_tree(src, tmp_path / "old")
    records = [r for r in store_audit(store) if r.get("action") == "rekey"]
    assert records and records[-1]["version"] == "2"
    assert records[-1]["detail"]["from"] == "1"


def store_audit(store: Store) -> list[dict[str, Any]]:
    from sealstore.audit import read_records

    return list(read_records(store.storage))


def test_shred_old_makes_the_old_version_unreadable(any_store: Store, tmp_path: Path) -> None:
    store = any_store
    src = model_dir(tmp_path, SIZES)
    old = store.push(src, "m", keys=["local:"])
    done = store.rekey("m:1", shred_old=True)
    assert done.shredded is not None and done.shredded.version == "1"
    tomb = store.manifest("m:1")
    assert tomb.shredded and tomb.slots == ()
    with pytest.raises(KeyUnavailable, match="shredded"):
        store.pull("m:1", tmp_path / "gone")
    for f in old.files:
        assert not store.storage.exists(store.object_path("default", f.object))
    store.pull("m", tmp_path / "new")  # bare name: latest is the new version
    assert same_tree(src, tmp_path / "new")
    with pytest.raises(ValueError, match="crypto-shredded"):
        rekey_version(store, "m:1")


def test_a_failure_half_way_leaves_no_new_version(
    any_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = any_store
    src = model_dir(tmp_path, {"a.bin": 3 << 20, "b.bin": 3 << 20, "c.bin": 100})
    old = store.push(src, "m", keys=["local:"])
    before = _objects(store)
    seen = 0

    def explode(n: int) -> None:
        nonlocal seen
        seen += n
        if seen > 4 << 20:  # the first file re-sealed, the second half-way
            raise BackendError("the network went away")

    with pytest.raises(BackendError, match="went away"):
        rekey_version(store, "m:1", shred_old=True, progress=explode)
    assert store.versions("m") == ["1"] and store.tags("m") == {"latest": "1"}
    assert _objects(store) == before
    assert not store.manifest("m:1").shredded
    if hasattr(store, "test_options"):
        assert incomplete_uploads(store.test_options, store.url[len("s3://") :]) == []
    # A failure at the commit itself: the objects and the BoM are removed.
    real = store.commit_manifest

    def refuse(*args: Any) -> None:
        raise BackendError("the manifest write failed")

    monkeypatch.setattr(store, "commit_manifest", refuse)
    with pytest.raises(BackendError, match="manifest write failed"):
        rekey_version(store, "m:1")
    monkeypatch.setattr(store, "commit_manifest", real)
    assert store.versions("m") == ["1"] and _objects(store) == before
    assert not [p for p in store.storage.walk("tenants/default/artifacts/m") if "/2/" in p]
    # An old object that fails authentication half-way: refused, nothing committed.
    entry = next(e for e in old.files if e.path == "b.bin")
    path = store.object_path("default", entry.object)
    data = bytearray(store.storage.read(path))
    data[len(data) // 2] ^= 1
    store.storage.put(path, bytes(data))
    with pytest.raises(AuthenticationError):
        rekey_version(store, "m:1")
    assert store.versions("m") == ["1"] and _objects(store) == before


def test_rekey_keeps_the_model_signature(store: Any, tmp_path: Path, ring: LocalKeyring) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from sealstore.vault import oms
    from tests.test_oms import ec_pair

    priv, pub = ec_pair(tmp_path, "pub", ec.SECP256R1())
    src = model_dir(tmp_path, SIZES)
    old = store.push(src, "m", keys=["local:"], sign_key=priv)
    new = rekey_version(store, "m", version="r1").new
    assert new.version == "r1" and new.oms == old.oms
    sig = oms.of_version(new, oms.public_key_from(pub))
    sig.check_files({f.path: f.sha256 for f in new.files}, where="m:r1")
    props = {
        p["name"]: p["value"]
        for p in json.loads(store.bom("m:r1"))["metadata"]["component"]["properties"]
    }
    assert "sealstore:oms:bundle-sha256" in props
    with pytest.raises(FileExistsError):
        rekey_version(store, "m:1", version="r1")


def test_cli_rekey_json(tmp_path: Path, ring: LocalKeyring) -> None:
    url = f"file://{tmp_path}/store"
    e = {"SEALSTORE_STORE": url}
    ok(run("store", "init", url))
    src = model_dir(tmp_path, SIZES)
    ok(run("push", src, "m", "-k", "local:", env=e))
    ok(run("tag", "m:1", "known-good", env=e))
    out = ok(run("store", "rekey", "m:1", "--shred-old", "--json", env=e))
    report = json.loads(out.stdout)
    assert report["from"] == "m:1" and report["ref"] == "m:2"
    assert report["files"] == len(SIZES) and report["bytes"] == sum(SIZES.values())
    assert sorted(report["tags_moved"]) == ["known-good", "latest"]
    assert report["old_shredded"] and report["slots"][0]["key_id"].startswith("local:")
    assert "blob" not in out.stdout.decode()
    ok(run("pull", "m@known-good", "-o", tmp_path / "out", env=e))
    assert same_tree(src, tmp_path / "out")
    line = fails(run("pull", "m:1", "-o", tmp_path / "gone", env=e), 4)
    assert "shredded" in line
    err = run("store", "rekey", "m:1", "--json", env=e)
    assert err.returncode == 2 and not err.stdout
    assert "crypto-shredded" in json.loads(err.stderr)["error"]["message"]
    line = fails(run("store", "rekey", "nope", env=e), 5)
    assert "not found" in line


def test_roles_publisher_rekeys_only_an_admin_shreds(
    store: Any, tmp_path: Path, ring: LocalKeyring
) -> None:
    pub = make_keyring(tmp_path / "pub.json")
    store.grant(str(pub.signing_key_id), "publisher", tenant="default")
    store.push(model_dir(tmp_path, SIZES), "m", keys=["local:"])
    as_pub = Store.open(store.url, signer=pub)
    before = _objects(store)
    with pytest.raises(Refused, match="needs the admin role"):
        as_pub.rekey("m:1", shred_old=True)
    assert store.versions("m") == ["1"] and _objects(store) == before
    done = as_pub.rekey("m:1")  # a new version is a publisher's to write
    assert done.new.signer == pub.signing_key_id and done.shredded is None
    assert Store.open(store.url).manifest("m").version == "2"


def test_keep_tags_leaves_every_tag_latest_included(tmp_path: Path, ring: LocalKeyring) -> None:
    store = Store.init(f"file://{tmp_path}/store")
    store.push(model_dir(tmp_path, {"a.bin": 100}), "m", keys=["local:"])
    store.tag("m:1", "known-good")
    done = store.rekey("m:1", move_tags=False)
    assert (done.new.version, done.tags) == ("2", [])
    assert store.tags("m") == {"latest": "1", "known-good": "1"}


def test_a_tag_that_cannot_move_is_audited_and_stops_the_shred(
    tmp_path: Path, ring: LocalKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.init(f"file://{tmp_path}/store")
    src = model_dir(tmp_path, {"a.bin": 100})
    store.push(src, "m", keys=["local:"])
    store.tag("m:1", "known-good")
    real_tag = Store.tag

    def tag(self: Store, ref: str, name: str, **kw: Any) -> Any:
        if name == "known-good":
            raise BackendError("the storage went away")
        return real_tag(self, ref, name, **kw)

    monkeypatch.setattr(Store, "tag", tag)
    with pytest.raises(BackendError, match="known-good still name the old version"):
        store.rekey("m:1", shred_old=True)
    # Committed and audited; the old version is whole, as its tag still names it.
    assert store.versions("m") == ["1", "2"]
    assert store.tags("m") == {"latest": "2", "known-good": "1"}
    assert [r["version"] for r in store_audit(store) if r.get("action") == "rekey"] == ["2"]
    store.pull("m:1", tmp_path / "old")
    assert same_tree(src, tmp_path / "old")
