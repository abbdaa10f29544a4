#!/usr/bin/env python3
"""Ray Data ``read_parquet`` of a sealed dataset version on S3 vs the same files in plaintext.

One table (8 numeric columns, ``--size`` bytes in memory, snappy) written as
``--files`` Parquet shards, then put twice on the test SeaweedFS S3 server:

* ``plain``  -- the Parquet files as they are, read through s3fs;
* ``sealed`` -- pushed as one version of a store (1 MiB chunks, ``local:`` key),
  read through the store file system (``sealstore+s3://...#data:1/train``): each
  Ray worker unpickles the file system (its options, no key), unwraps the
  version's key once through the keyring named by ``SEALSTORE_HOME`` in its
  environment, checks each object's digest against the signed manifest and
  decrypts.

Both are handed to ``ray.data.read_parquet`` as
``pyarrow.fs.PyFileSystem(FSSpecHandler(fs))`` on one local Ray runtime
(``--cpus`` worker CPUs) and materialised (``to_arrow_refs`` + ``ray.get``).
A warm-up read of each first (workers started, modules imported), then
``--repeat`` rounds alternating the order, medians reported. Starts the test
services unless ``SEALSTORE_TEST_S3_URL`` is set. Writes a table and ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _services
from benchmarks.dataset_read import make_table
from benchmarks.format_throughput import parse_size, write_report

MIB = 1 << 20


def build(root: Path, size: int, files: int) -> Path:
    """``--files`` plaintext Parquet shards under ``root/data/train``."""
    import pyarrow.parquet as pq

    train = root / "data" / "train"
    train.mkdir(parents=True)
    for k in range(files):
        t = make_table(size // files, k)
        pq.write_table(t, train / f"part-{k}.parquet", row_group_size=1 << 20)
        del t
    return train


def ray_read(fs: Any, files: list[str]) -> tuple[float, int]:
    """Seconds to read *files* whole through Ray Data, and the rows read."""
    import pyarrow.fs as pafs
    import ray
    import ray.data

    t = time.perf_counter()
    ds = ray.data.read_parquet(
        files,
        filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
        override_num_blocks=len(files),
    )
    tables = ray.get(ds.to_arrow_refs())
    elapsed = time.perf_counter() - t
    rows = sum(tb.num_rows for tb in tables)
    del tables
    return elapsed, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("256MiB"))
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cpus", type=int, default=2, help="Ray worker CPUs (processes)")
    ap.add_argument("--out", default="docs/perf/ray_read.json")
    args = ap.parse_args()

    env, started = _services.services("SEALSTORE_TEST_S3_URL")
    tmp = Path(tempfile.mkdtemp(prefix="ray-read-"))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
    try:
        import fsspec
        import ray
        import ray.data

        import sealstore
        from sealstore.vault.store import Store
        from tests.conftest import PASSPHRASE, make_keyring
        from tests.s3util import new_bucket, s3_options

        home = tmp / "home"
        home.mkdir()
        os.environ["SEALSTORE_HOME"] = str(home)
        os.environ["SEALSTORE_PASSPHRASE"] = PASSPHRASE
        make_keyring(home / "keyring.json")
        t0 = time.perf_counter()
        train = build(tmp, args.size, args.files)
        options = s3_options(
            env["SEALSTORE_TEST_S3_URL"],
            env["SEALSTORE_TEST_S3_KEY"],
            env["SEALSTORE_TEST_S3_SECRET"],
        )
        location = new_bucket(options)
        s3 = fsspec.filesystem(
            "s3",
            key=options["key"],
            secret=options["secret"],
            client_kwargs={"endpoint_url": options["endpoint_url"]},
            skip_instance_cache=True,
        )
        s3.put(str(train), f"{location}/plain/train", recursive=True)
        plain_files = sorted(s3.glob(f"{location}/plain/train/*.parquet"))
        store = Store.init(f"s3://{location}/store", **options)
        store.push(train.parent, "data", keys=["local:"], chunk_size=MIB)
        sealed_fs, path = fsspec.url_to_fs(
            f"sealstore+s3://{location}/store#data:1/train", **options
        )
        sealed_files = sealed_fs.glob(path + "/*.parquet")
        print(
            f"built and uploaded {args.size / MIB:.0f} MiB x2 in {time.perf_counter() - t0:.1f} s"
        )

        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(
            num_cpus=args.cpus,
            include_dashboard=False,
            object_store_memory=max(4 * args.size, 256 * MIB),
            _temp_dir=ray_tmp,
            log_to_driver=False,
            runtime_env={
                "env_vars": {"SEALSTORE_HOME": str(home), "SEALSTORE_PASSPHRASE": PASSPHRASE}
            },
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        cases = {"plain": (s3, plain_files), "sealed": (sealed_fs, sealed_files)}
        warm = {name: ray_read(fs, files) for name, (fs, files) in cases.items()}
        rows = {name: r for name, (_s, r) in warm.items()}
        if rows["plain"] != rows["sealed"]:
            raise SystemExit(f"row counts differ: {rows}")
        samples: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for r in range(args.repeat):
            for name in names if r % 2 == 0 else names[::-1]:
                fs, files = cases[name]
                samples[name].append(ray_read(fs, files)[0])
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if started:
            _services.stop()

    med = {name: statistics.median(s) for name, s in samples.items()}
    mb_s = {name: args.size / med[name] / 1e6 for name in med}
    ratio = med["plain"] / med["sealed"]
    for name in med:
        print(f"{name:<8} median {med[name]:.3f} s  {mb_s[name]:.0f} MB/s")
    print(f"sealed_vs_plain {ratio:.2f}x")
    write_report(
        args.out,
        {
            "benchmark": "ray_read",
            "python": platform.python_version(),
            "ray": ray.__version__,
            "sealstore": sealstore.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "note": "small on purpose (finishes in a few minutes on a shared, loaded 2-core "
            "machine, others working): medians of --repeat rounds, order alternating; "
            "one local Ray runtime, both cases read from the same SeaweedFS S3 server "
            "through fsspec (s3fs / the sealstore store file system); sealed reads "
            "include the per-object digest check against the signed manifest",
            "size_bytes": args.size,
            "files": args.files,
            "ray_cpus": args.cpus,
            "repeat": args.repeat,
            "rows": rows["plain"],
            "warmup_seconds": {name: s for name, (s, _r) in warm.items()},
            "median_seconds": med,
            "mb_per_s": mb_s,
            "ratios": {"sealed_vs_plain": ratio},
            "samples": samples,
        },
    )


if __name__ == "__main__":
    main()
