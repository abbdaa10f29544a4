"""Sealed datasets read in place: ``sealstore.open`` and the fsspec file systems,
against the real pyarrow, pandas, Hugging Face ``datasets`` and tarfile."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import sealstore
from sealstore.errors import AuthenticationError, KeyUnavailable
from sealstore.fileobj import SealedIO
from sealstore.kms.envelope import open_sealed, seal_file
from sealstore.kms.x25519 import generate_identity
from sealstore.stream import SealedFile
from sealstore.vault.store import Store
from tests.conftest import CS, make_keyring
from tests.s3util import new_bucket, s3_options

ROWS, COLS = 40_000, 8


def table(seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols = {f"c{i}": rng.integers(0, 1 << 40, ROWS, dtype=np.int64) for i in range(COLS - 1)}
    cols["text"] = [f"row {i} of shard {seed}" for i in range(ROWS)]
    return pa.table(cols)


def write_parquet(path: Path, seed: int = 0) -> pa.Table:
    t = table(seed)
    pq.write_table(t, path, row_group_size=10_000, compression=None)
    return t


def seal(src: Path, dst: Path | None = None, keys: tuple[str, ...] = ("local:",)) -> Path:
    dst = dst or src.with_name(src.name + ".seal")
    seal_file(src, dst, list(keys), chunk_size=CS)
    return dst


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    """A folder of plaintext shards: two Parquet files, JSON lines, CSV, a tar."""
    d = tmp_path / "plain" / "train"
    d.mkdir(parents=True)
    write_parquet(d / "part-0.parquet", 0)
    write_parquet(d / "part-1.parquet", 1)
    records = [{"id": i, "text": f"line {i}"} for i in range(2_000)]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pd.DataFrame(records).to_csv(d / "rows.csv", index=False)
    with tarfile.open(d / "shard-0.tar", "w") as tar:
        for i in range(50):
            for ext, data in (("txt", f"sample {i}".encode()), ("bin", bytes([i]) * 3000)):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return d


@pytest.fixture
def sealed_dir(plain: Path, tmp_path: Path, keyring: Any) -> Path:
    """Every plaintext shard sealed beside the others (``NAME.seal``), in its own folder."""
    out = tmp_path / "sealed"
    out.mkdir()
    for p in sorted(plain.iterdir()):
        seal(p, out / (p.name + ".seal"))
    return out


@pytest.fixture
def data_store(plain: Path, tmp_path: Path, keyring: Any) -> Store:
    store = Store.init(f"file://{tmp_path}/store")
    store.push(plain.parent, "data", keys=["local:"], chunk_size=CS)
    return store


def store_url(store: Store, rest: str) -> str:
    return f"sealstore+{store.url}#{rest}"


# -- the file object -----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 2 * CS + 500])
def test_file_object_reads_and_seeks_like_the_plaintext(
    tmp_path: Path, keyring: Any, size: int
) -> None:
    data = np.random.default_rng(size).bytes(size)
    (tmp_path / "f").write_bytes(data)
    path = seal(tmp_path / "f")
    plain = io.BytesIO(data)
    with sealstore.open(path, cache_chunks=2) as f:
        assert f.readable() and f.seekable() and not f.writable()
        assert f.read() == data and f.read() == b"" and plain.read() == data
        rng = np.random.default_rng(1)
        for _ in range(60):
            whence = int(rng.integers(0, 3))
            offset = int(rng.integers(0, size + 10)) - (size if whence == 2 else 0)
            if whence == 1:
                offset = int(rng.integers(-f.tell(), size - f.tell() + 10))
            assert f.seek(offset, whence) == plain.seek(offset, whence)
            n = int(rng.integers(0, 3 * CS))
            read = f.read_buffer if n % 2 else f.read  # read_buffer: what pyarrow calls
            assert read(n) == plain.read(n)
            assert f.tell() == plain.tell()
        f.seek(0)
        buf = bytearray(size + 7)
        assert f.readinto(buf) == size and bytes(buf[:size]) == data
    with pytest.raises(ValueError, match="closed"):
        f.read(1)


def test_raw_file_object_caches_chunks_and_wipes_them_on_close(
    tmp_path: Path, keyring: Any
) -> None:
    data = np.random.default_rng(0).bytes(5 * CS)
    (tmp_path / "f").write_bytes(data)
    f = sealstore.open(seal(tmp_path / "f"), buffering=0, cache_chunks=2)
    assert isinstance(f, SealedIO)
    assert f.read(10) == data[:10] and f.read(10) == data[10:20]
    assert f.chunks_decrypted == 1  # the second small read came from the cache
    f.seek(3 * CS)
    f.read(100)
    f.seek(4 * CS)
    f.read(100)
    assert f.chunks_decrypted == 3 and len(f._cache) == 2  # bounded: chunk 0 evicted
    f.seek(CS)
    assert f.read(2 * CS) == data[CS : 3 * CS]  # large: straight into the caller's buffer
    views = list(f._cache.values())
    assert any(any(v) for v in views)
    f.close()
    assert all(not any(v) for v in views)


def test_mode_other_than_rb_is_refused(tmp_path: Path, keyring: Any) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match="'rb'"):
        sealstore.open(seal(tmp_path / "f"), "wb")


def test_the_file_object_sits_on_the_ground_floor() -> None:
    """sealstore/fileobj.py imports nothing above the ground; sealstore.open loads lazily."""
    code = (
        "import sys, sealstore, sealstore.fileobj\n"
        "up = ('sealstore.kms', 'sealstore.vault', 'sealstore.loaders', 'fsspec', 'pyarrow')\n"
        "assert not [m for m in sys.modules if m.startswith(up)], sorted(sys.modules)\n"
        "assert sealstore.open.__module__ == 'sealstore.loaders.fileio'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- pickling as a reference ---------------------------------------------------------


def _child_digest(fp: Any) -> tuple[int, str]:
    pos = fp.tell()
    return pos, hashlib.sha256(fp.read()).hexdigest()


def test_file_object_pickles_as_a_reference_and_reopens_in_a_spawn_child(
    data_store: Store, plain: Path
) -> None:
    want = (plain / "part-1.parquet").read_bytes()
    with sealstore.open(store_url(data_store, "data@latest/train/part-1.parquet")) as f:
        f.seek(1000)
        blob = pickle.dumps(f)
        # The reference names the version opened, not the tag.
        assert f.raw._reopener.src.endswith("#data:1/train/part-1.parquet")
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            pos, digest = pool.apply(_child_digest, (f,))
    assert pos == 1000 and digest == hashlib.sha256(want[1000:]).hexdigest()
    # What travels is the source and options: no key, not even a wrapped one's plaintext.
    assert b"data:1/train/part-1.parquet" in blob and b"Keyring" not in blob
    with pickle.loads(blob) as again:  # noqa: S301 -- our own pickle
        assert again.tell() == 1000 and again.read() == want[1000:]


def test_fsspec_file_pickles_and_reopens_in_a_spawn_child(sealed_dir: Path, plain: Path) -> None:
    with fsspec.open(f"sealstore::file://{sealed_dir}/part-0.parquet.seal", "rb") as f:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            pos, digest = pool.apply(_child_digest, (f,))
    assert (pos, digest) == (0, hashlib.sha256((plain / "part-0.parquet").read_bytes()).hexdigest())


def test_file_opened_from_a_key_object_refuses_to_pickle(
    tmp_path: Path, keyring: Any, identity_path: Path
) -> None:
    (tmp_path / "f").write_bytes(b"secret rows")
    path = seal(tmp_path / "f", keys=("local:",))
    with open_sealed(path) as sealed, sealstore.open(sealed) as f:
        assert f.read() == b"secret rows"
        with pytest.raises(TypeError, match="not a reference"):
            pickle.dumps(f)
    with sealstore.open(path, identities=[keyring]) as f, pytest.raises(TypeError):
        pickle.dumps(f)


# -- pyarrow -------------------------------------------------------------------------


def test_column_projection_decrypts_only_the_chunks_of_those_columns(
    sealed_dir: Path, plain: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decrypted: list[int] = []
    real = SealedFile._decrypt_chunk

    def counting(self: SealedFile, i: int, buf: Any) -> int:
        decrypted.append(i)
        return real(self, i, buf)

    monkeypatch.setattr(SealedFile, "_decrypt_chunk", counting)
    # Unbuffered: a buffered reader reads ahead up to its buffer's size.
    with sealstore.open(sealed_dir / "part-0.parquet.seal", buffering=0) as f:
        got = pq.read_table(f, columns=["c3"])
        chunks = f.sealed.chunk_count
        size = f.size
    assert got.column("c3").equals(pq.read_table(plain / "part-0.parquet").column("c3"))
    # The chunks the c3 column chunks lie in, and the footer's (pyarrow reads
    # the last 64 KiB at once).
    meta = pq.ParquetFile(plain / "part-0.parquet").metadata
    allowed = set(range((size - max(65536, meta.serialized_size + 8)) // CS, chunks))
    for g in range(meta.num_row_groups):
        col = meta.row_group(g).column(3)
        start = col.dictionary_page_offset or col.data_page_offset
        allowed |= set(range(start // CS, (start + col.total_compressed_size - 1) // CS + 1))
    assert decrypted and set(decrypted) <= allowed
    assert len(set(decrypted)) < chunks / 4


def test_pyarrow_reads_a_store_folder_as_a_dataset(data_store: Store, plain: Path) -> None:
    fs, path = fsspec.url_to_fs(store_url(data_store, "data@latest/train"))
    dataset = pads.dataset(
        path,
        filesystem=fs,
        format="parquet",
        exclude_invalid_files=False,
        partitioning=None,
    )
    parquet = [p for p in dataset.files if p.endswith(".parquet")]
    assert len(parquet) == 2
    got = pads.dataset(parquet, filesystem=fs, format="parquet").to_table()
    want = pa.concat_tables([pq.read_table(plain / f"part-{i}.parquet") for i in (0, 1)])
    assert got.sort_by("c0").equals(want.sort_by("c0"))
    with sealstore.open(store_url(data_store, "data:1/train/part-0.parquet")) as f:
        pf = pq.ParquetFile(f)  # what used to fail on a SealedFile
        assert pf.metadata.num_rows == ROWS and pf.metadata.num_row_groups == 4
        assert pf.read_row_group(3, columns=["c0"]).num_rows == 10_000
    one = pq.read_table(path + "/part-1.parquet", filesystem=fs, columns=["text"])
    assert one.column("text").to_pylist()[:2] == ["row 0 of shard 1", "row 1 of shard 1"]


def test_store_listing_has_plaintext_sizes_and_pins_the_version(
    data_store: Store, plain: Path
) -> None:
    url = store_url(data_store, "data@latest/train")
    fs, path = fsspec.url_to_fs(url)
    listed = {e["name"].rsplit("/", 1)[1]: e for e in fs.ls(path)}
    assert sorted(listed) == sorted(p.name for p in plain.iterdir())
    for name, e in listed.items():
        assert e["type"] == "file" and e["size"] == (plain / name).stat().st_size
    assert fs.info(path)["type"] == "directory"
    found = fs.glob(url + "/*.parquet")
    assert [p.rsplit("/", 1)[1] for p in found] == ["part-0.parquet", "part-1.parquet"]
    assert fs.canonical(path).endswith("#data:1/train")
    # The shards share the version's key: unwrapped once for both (fsspec
    # shares the file system between tests: count from here).
    before = (fs.keys.misses, fs.keys.hits)
    for name in ("part-0.parquet", "part-1.parquet"):
        with fs.open(f"{path}/{name}") as f:
            assert f.read(4) == b"PAR1"
    assert (fs.keys.misses - before[0], fs.keys.hits - before[1]) == (1, 1)
    with pytest.raises(FileNotFoundError):
        fs.info(path + "/nothing.parquet")
    with pytest.raises(ValueError, match="'wb' through a sealstore:: URL"):
        fs.open(path + "/new.parquet", "wb")


def test_chained_listing_shows_plaintext_sizes(sealed_dir: Path, plain: Path) -> None:
    fs, path = fsspec.url_to_fs(f"sealstore::file://{sealed_dir}")
    sizes = {e["name"].rsplit("/", 1)[1]: e["size"] for e in fs.ls(path)}
    assert sizes == {p.name + ".seal": p.stat().st_size for p in plain.iterdir()}


def test_writing_through_the_chained_url_seals_and_appears_on_close(
    tmp_path: Path, keyring: Any, plain: Path
) -> None:
    out = tmp_path / "out"
    url = f"sealstore::file://{out}/sub/part-0.parquet.seal"
    df = pd.read_parquet(plain / "part-0.parquet")
    options = {"keys": ["local:"], "context": {"dataset": "corpus"}, "chunk_size": CS}
    df.to_parquet(url, storage_options=options)
    sealed = out / "sub" / "part-0.parquet.seal"
    assert sealed.read_bytes()[:8] == b"\x89SEAL\r\n\x1a" and b"PAR1" not in sealed.read_bytes()
    with open_sealed(sealed) as f:
        assert f.header.context == {"dataset": "corpus"}
    pd.testing.assert_frame_equal(pd.read_parquet(url), df)
    # A failed producer leaves nothing behind: no file, no temporary.
    failed = f"sealstore::file://{out}/failed.seal"
    with (
        pytest.raises(RuntimeError, match="producer died"),
        fsspec.open(failed, "wb", keys=["local:"]) as fp,
    ):
        fp.write(b"half a shard" * 10_000)
        raise RuntimeError("producer died")
    assert sorted(p.name for p in out.iterdir()) == ["sub"]
    with pytest.raises(ValueError, match="keys="):
        fsspec.open(failed, "wb").open()
    # A fallback write made while handling another exception is published:
    # only an exception raised inside the write's own block discards it.
    fallback = f"sealstore::file://{out}/fallback.seal"
    try:
        raise KeyError("primary source gone")
    except KeyError:
        with fsspec.open(fallback, "wb", keys=["local:"]) as fp:
            fp.write(b"fallback rows")
        with (
            pytest.raises(RuntimeError, match="fallback died"),
            fsspec.open(failed, "wb", keys=["local:"]) as fp,
        ):
            fp.write(b"half")
            raise RuntimeError("fallback died") from None
    with fsspec.open(fallback, "rb") as fp:
        assert fp.read() == b"fallback rows"
    assert sorted(p.name for p in out.iterdir()) == ["fallback.seal", "sub"]


# -- pandas --------------------------------------------------------------------------


def test_pandas_reads_parquet_json_and_csv(
    sealed_dir: Path, data_store: Store, plain: Path
) -> None:
    want = pd.read_parquet(plain / "part-0.parquet")
    chained = f"sealstore::file://{sealed_dir}"
    pd.testing.assert_frame_equal(pd.read_parquet(f"{chained}/part-0.parquet.seal"), want)
    pd.testing.assert_frame_equal(
        pd.read_parquet(store_url(data_store, "data:1/train/part-0.parquet"), columns=["c1"]),
        want[["c1"]],
    )
    rows = pd.read_json(plain / "rows.jsonl", lines=True)
    pd.testing.assert_frame_equal(pd.read_json(f"{chained}/rows.jsonl.seal", lines=True), rows)
    got = pd.read_json(store_url(data_store, "data:1/train/rows.jsonl"), lines=True)
    pd.testing.assert_frame_equal(got, rows)
    csv = pd.read_csv(plain / "rows.csv")
    pd.testing.assert_frame_equal(pd.read_csv(f"{chained}/rows.csv.seal"), csv)
    with sealstore.open(store_url(data_store, "data:1/train/rows.csv")) as f:
        pd.testing.assert_frame_equal(pd.read_csv(f), csv)


# -- Hugging Face datasets -----------------------------------------------------------


def test_hf_datasets_loads_parquet_and_json_from_a_store(
    data_store: Store, plain: Path, tmp_path: Path
) -> None:
    import datasets

    options = {"tenant": "default"}
    train = datasets.load_dataset(
        "parquet",
        data_files=store_url(data_store, "data@latest/train/part-*.parquet"),
        storage_options=options,
        cache_dir=str(tmp_path / "hf"),
        split="train",
    )
    assert train.num_rows == 2 * ROWS
    assert [train[0]["text"], train[-1]["text"]] == [
        "row 0 of shard 0",
        f"row {ROWS - 1} of shard 1",
    ]
    # Streaming reads through the file object and keeps no copy on disk.
    streamed = datasets.load_dataset(
        "json",
        data_files=store_url(data_store, "data:1/train/rows.jsonl"),
        storage_options=options,
        cache_dir=str(tmp_path / "hf-stream"),
        split="train",
        streaming=True,
    )
    assert [r["text"] for r in streamed.take(3)] == ["line 0", "line 1", "line 2"]
    written = [p for p in (tmp_path / "hf-stream").rglob("*") if p.is_file()]
    assert not any(b"line 1" in p.read_bytes() for p in written)


# -- webdataset-style tar shards -----------------------------------------------------


def test_tar_shard_reads_through_tarfile(sealed_dir: Path, plain: Path) -> None:
    with sealstore.open(sealed_dir / "shard-0.tar.seal") as f, tarfile.open(fileobj=f) as tar:
        names = tar.getnames()
        assert names[:2] == ["000000.txt", "000000.bin"] and len(names) == 100
        member = tar.extractfile("000042.bin")
        assert member is not None and member.read() == bytes([42]) * 3000
    with (
        fsspec.open(f"sealstore::file://{sealed_dir}/shard-0.tar.seal") as f,
        tarfile.open(fileobj=f, mode="r|") as stream,  # streamed, as webdataset reads
    ):
        texts = [stream.extractfile(m).read() for m in stream if m.name.endswith(".txt")]  # type: ignore[union-attr]
    assert texts[7] == b"sample 7" and len(texts) == 50


# -- bad input -----------------------------------------------------------------------


def test_tampered_shard_fails_inside_pyarrow_pandas_and_datasets_naming_the_file(
    sealed_dir: Path, tmp_path: Path
) -> None:
    import datasets

    bad = sealed_dir / "part-1.parquet.seal"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 1  # inside a column chunk's ciphertext
    bad.write_bytes(bytes(data))
    named = r"part-1\.parquet\.seal"
    with sealstore.open(bad) as f, pytest.raises(AuthenticationError, match=named):
        pq.read_table(f)
    url = f"sealstore::file://{bad}"
    with pytest.raises(AuthenticationError, match=r"part-1\.parquet\.seal: chunk \d+ failed"):
        pd.read_parquet(url)
    with pytest.raises(AuthenticationError, match=r"part-1\.parquet\.seal"):
        datasets.load_dataset(
            "parquet", data_files=url, cache_dir=str(tmp_path / "hf"), split="train"
        )
    # The untouched shard beside it still reads.
    assert pd.read_parquet(f"sealstore::file://{sealed_dir}/part-0.parquet.seal").shape[0] == ROWS


def test_truncated_object_and_wrong_key_fail_naming_the_file(
    sealed_dir: Path, tmp_path: Path, data_store: Store
) -> None:
    cut = sealed_dir / "part-0.parquet.seal"
    cut.write_bytes(cut.read_bytes()[: -CS // 2])
    with pytest.raises(AuthenticationError, match=r"part-0\.parquet\.seal"):
        pd.read_parquet(f"sealstore::file://{cut}")
    # Sealed to someone else's X25519 recipient: our identity has no slot to open.
    other = generate_identity(tmp_path / "other.key")
    mine = tmp_path / "mine.key"
    generate_identity(mine)
    (tmp_path / "x").write_bytes(b"a,b\n1,2\n")
    foreign = seal(tmp_path / "x", keys=(other.recipient,))
    with pytest.raises(KeyUnavailable, match=r"x\.seal"):
        pd.read_csv(f"sealstore::file://{foreign}", storage_options={"identities": [str(mine)]})
    # A store object under another tenant's name is not served.
    with pytest.raises((FileNotFoundError, sealstore.NotFound)):
        pd.read_parquet(
            store_url(data_store, "data:1/train/part-0.parquet"),
            storage_options={"tenant": "other"},
        )


def test_tampered_store_object_fails_before_any_row(data_store: Store) -> None:
    m = data_store.manifest("data:1")
    entry = next(e for e in m.files if e.path == "train/part-0.parquet")
    obj = Path(data_store.storage.root) / data_store.object_path(m.tenant, entry.object)
    data = bytearray(obj.read_bytes())
    data[-100] ^= 1
    obj.write_bytes(bytes(data))
    url = store_url(data_store, "data:1/train/part-0.parquet")
    # The object's hash runs beside the first read: whichever check fails
    # first -- the object digest or the tail chunk's tag -- refuses the read.
    with pytest.raises(
        AuthenticationError, match=r"part-0\.parquet: .*(hash does not match|chunk \d+ failed)"
    ):
        pd.read_parquet(url)
    with pytest.raises(AuthenticationError, match=r"part-0\.parquet: chunk \d+ failed"):
        pd.read_parquet(url, storage_options={"check_digest": False})


# -- S3 (SeaweedFS) ------------------------------------------------------------------


def test_store_on_s3_reads_through_the_fsspec_urls(
    services: dict[str, str], tmp_path: Path, keyring_path: Path, plain: Path
) -> None:
    make_keyring(keyring_path) if not keyring_path.exists() else None
    options = s3_options(services["s3_url"], services["s3_key"], services["s3_secret"])
    location = new_bucket(options)
    store = Store.init(f"s3://{location}/store", **options)
    store.push(plain.parent, "data", keys=["local:"], chunk_size=CS)
    want = pd.read_parquet(plain / "part-1.parquet", columns=["c2", "text"])
    url = f"sealstore+s3://{location}/store#data@latest/train/part-1.parquet"
    got = pd.read_parquet(url, columns=["c2", "text"], storage_options=options)
    pd.testing.assert_frame_equal(got, want)
    fs, path = fsspec.url_to_fs(f"sealstore+s3://{location}/store#data:1/train", **options)
    assert fs.glob(path + "/*.jsonl") == [f"{location}/store#data:1/train/rows.jsonl"]
    # A plain sealed file on S3 through the chained URL: sealed as pandas writes
    # it (the upload completes on close), then read back.
    s3 = {
        "key": options["key"],
        "secret": options["secret"],
        "client_kwargs": {"endpoint_url": options["endpoint_url"]},
    }
    csv = pd.read_csv(plain / "rows.csv")
    url = f"sealstore::s3://{location}/files/rows.csv.seal"
    csv.to_csv(url, index=False, storage_options={"s3": s3, "keys": ["local:"]})
    raw = fsspec.filesystem("s3", **s3).cat_file(f"{location}/files/rows.csv.seal")
    assert raw[:5] == b"\x89SEAL" and b"line 1" not in raw
    pd.testing.assert_frame_equal(pd.read_csv(url, storage_options={"s3": s3}), csv)
