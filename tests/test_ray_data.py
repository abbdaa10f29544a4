"""Ray Data reads a sealed dataset version from a store on S3 (SeaweedFS), on a local
Ray runtime of two worker processes, each opening the data key itself."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import ray
import ray.data

from sealstore.errors import AuthenticationError
from sealstore.vault.store import Store
from tests.conftest import CS, PASSPHRASE, make_keyring
from tests.s3util import new_bucket, s3_options
from tests.test_datasets_io import write_parquet

FILES = 4


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory: pytest.TempPathFactory, services: dict[str, str]) -> Iterator[Path]:
    """One local Ray runtime (2 CPUs) for this file, and the keyring its workers use.

    The workers find the keyring by reference -- ``SEALSTORE_HOME`` and the
    passphrase in their environment -- never by key bytes. The services start
    first: Ray's workers listen on free ports that a service would want later;
    the runtime stops after this file, so no later test finds its ports taken.
    """
    home = tmp_path_factory.mktemp("ray-home")
    make_keyring(home / "keyring.json", passphrase=PASSPHRASE)
    # A short folder of our own: Ray's socket paths must stay under 107 bytes.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # A throwaway local runtime: no token written to ~/.ray.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        _temp_dir=temp,
        log_to_driver=False,
        runtime_env={"env_vars": {"SEALSTORE_HOME": str(home), "SEALSTORE_PASSPHRASE": PASSPHRASE}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield home
    finally:
        ray.shutdown()
        os.environ.pop("RAY_AUTH_MODE", None)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def s3_dataset(
    ray_home: Path,
    services: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Store, str, dict[str, Any], pa.Table]:
    """A 4-file sealed Parquet dataset pushed to a store on SeaweedFS, and its plaintext."""
    monkeypatch.setenv("SEALSTORE_HOME", str(ray_home))  # the keyring the workers use
    plain = tmp_path / "plain" / "train"
    plain.mkdir(parents=True)
    tables = [write_parquet(plain / f"part-{i}.parquet", i) for i in range(FILES)]
    options = s3_options(services["s3_url"], services["s3_key"], services["s3_secret"])
    location = new_bucket(options)
    store = Store.init(f"s3://{location}/store", **options)
    store.push(plain.parent, "data", keys=["local:"], chunk_size=CS)
    return store, f"sealstore+s3://{location}/store#data:1/train", options, pa.concat_tables(tables)


def read_with_ray(url: str, options: dict[str, Any]) -> pa.Table:
    """``ray.data.read_parquet`` over the version's Parquet files, through the store file system."""
    fs, path = fsspec.url_to_fs(url, **options)
    files = fs.glob(path + "/*.parquet")
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    ds = ray.data.read_parquet(files, filesystem=filesystem, override_num_blocks=FILES)
    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def test_ray_data_reads_the_sealed_dataset_on_two_workers(
    s3_dataset: tuple[Store, str, dict[str, Any], pa.Table],
) -> None:
    _store, url, options, want = s3_dataset
    got = read_with_ray(url, options)
    assert got.num_rows == want.num_rows
    assert got.select(want.column_names).sort_by("c0").equals(want.sort_by("c0"))


def test_store_file_system_pickles_without_key_material(
    s3_dataset: tuple[Store, str, dict[str, Any], pa.Table],
) -> None:
    _store, url, options, _want = s3_dataset
    fs, path = fsspec.url_to_fs(url, **options)
    with fs.open(path + "/part-0.parquet") as f:
        assert f.read(4) == b"PAR1"
    deks = [bytes(entry[0]) for entry in fs.keys._entries.values()]
    assert deks and all(len(k) == 32 for k in deks)  # the version's key, unwrapped here
    blob = pickle.dumps(pafs.PyFileSystem(pafs.FSSpecHandler(fs)))
    assert not any(k in blob for k in deks)
    assert b"DekCache" not in blob and b"Keyring" not in blob
    # It travels as its options: the unpickled one (here: the same, fsspec's
    # instance cache) reads too, and a fresh one unwraps for itself.
    again = pickle.loads(blob)  # noqa: S301 -- our own pickle
    assert again.get_file_info(path + "/part-1.parquet").size > 0


def test_tampered_object_fails_inside_ray_naming_the_file(
    s3_dataset: tuple[Store, str, dict[str, Any], pa.Table],
) -> None:
    store, url, options, _want = s3_dataset
    m = store.manifest("data:1")
    entry = next(e for e in m.files if e.path == "train/part-2.parquet")
    where = store.object_path(m.tenant, entry.object)
    data = bytearray(store.storage.read(where))
    data[len(data) // 2] ^= 1  # inside a column chunk's ciphertext
    store.storage.put(where, bytes(data))
    with pytest.raises(AuthenticationError) as info:
        read_with_ray(url, options)
    # Ray 2.60 reads each file's footer in the driver for the schema, so the
    # digest check fails there first (a worker's would come back as a
    # RayTaskError that is also an AuthenticationError): no rows come back.
    assert "part-2.parquet" in str(info.value)
    assert "hash does not match" in str(info.value) or "failed authentication" in str(info.value)
