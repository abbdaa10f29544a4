#!/usr/bin/env python3
"""Backup and restore of a store against a plain fsspec copy of the same objects.

One run: a ``file://`` store holding ``--size`` bytes (one version of a
model directory in ``--shard``-sized files), backed up to SeaweedFS S3 and
restored from it. Each measurement is repeated ``--repeat`` times, the median
reported; the plain copy and the sealstore operation alternate, each into a
fresh S3 prefix or local directory:

* ``plain_put``   -- ``fs.put([store objects], [s3 paths])``: s3fs uploading the very
  object files the store holds (the same bytes a backup must move).
* ``backup``      -- ``sealstore.vault.backup.create`` into an empty location: list and
  verify the manifests, copy every object while hashing it (BLAKE3) against its
  signed manifest, write the documents and the signed snapshot.
* ``incremental`` -- ``create`` again into the same location: nothing changed, so no
  object byte may be read (``read_bytes`` is counted by the copy loop) -- a target.
* ``plain_get``   -- ``fs.get([s3 paths], [local paths])``.
* ``restore``     -- ``restore`` into an empty ``file://`` location: verify the snapshot,
  copy every object while hashing it, then the manifests and tags.

Targets (issue 8): backup and restore >= 0.8x the plain copy; an incremental backup of
an unchanged store reads 0 object bytes.
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
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._services import services, stop
from benchmarks.format_throughput import parse_size, write_report
from benchmarks.store_throughput import make_model


def _median_pair(
    plain: Callable[[int], Any], ours: Callable[[int], Any], repeat: int
) -> tuple[list[float], list[float], list[Any]]:
    """Alternate plain and sealstore runs (noise hits both alike); their times and results."""
    t_plain, t_ours, results = [], [], []
    for i in range(repeat):
        t = time.perf_counter()
        plain(i)
        t_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        results.append(ours(i))
        t_ours.append(time.perf_counter() - t)
    return t_plain, t_ours, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--shard", default="128MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4, help="objects copied at once")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    env, started = services("SEALSTORE_TEST_S3_URL")
    s3 = {
        "endpoint_url": env["SEALSTORE_TEST_S3_URL"],
        "key": env["SEALSTORE_TEST_S3_KEY"],
        "secret": env["SEALSTORE_TEST_S3_SECRET"],
    }
    tmp = Path(tempfile.mkdtemp(prefix="sealstore-backup-bench-", dir=args.tmpdir))
    home = tmp / "home"
    home.mkdir()
    os.environ["SEALSTORE_HOME"] = str(home)
    os.environ.setdefault("SEALSTORE_PASSPHRASE", "benchmark")
    try:
        import boto3
        import s3fs
        from nacl import pwhash

        from sealstore.kms.local import create_keyring
        from sealstore.vault import backup
        from sealstore.vault.store import Store

        create_keyring(
            home / "keyring.json",
            opslimit=pwhash.argon2id.OPSLIMIT_MIN,
            memlimit=pwhash.argon2id.MEMLIMIT_MIN,
        )
        bucket = "bench-" + uuid.uuid4().hex[:12]
        boto3.client(
            "s3",
            endpoint_url=s3["endpoint_url"],
            aws_access_key_id=s3["key"],
            aws_secret_access_key=s3["secret"],
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        fs = s3fs.S3FileSystem(
            key=s3["key"], secret=s3["secret"], client_kwargs={"endpoint_url": s3["endpoint_url"]}
        )
        model = tmp / "model"
        make_model(model, parse_size(args.size), parse_size(args.shard))
        store = Store.init(f"file://{tmp}/store")
        m = store.push(model, "model", keys=["local:"])
        store.tag("model:1", "known-good")
        objects = [tmp / "store" / "objects" / "default" / e.object for e in m.files]
        nbytes = sum(p.stat().st_size for p in objects)

        def remote(prefix: str) -> list[str]:
            return [f"{bucket}/{prefix}/{p.name}" for p in objects]

        def clear(prefix: str) -> None:
            if fs.exists(f"{bucket}/{prefix}"):
                fs.rm(f"{bucket}/{prefix}", recursive=True)

        # -- backup vs plain put --------------------------------------------------------------
        def plain_put(i: int) -> None:
            fs.put([str(p) for p in objects], remote(f"plain-{i}"))

        def do_backup(i: int) -> Any:
            return backup.create(store, f"s3://{bucket}/bk-{i}", threads=args.threads, **s3)[1]

        t_put, t_backup, stats = _median_pair(plain_put, do_backup, args.repeat)
        for i in range(args.repeat):
            clear(f"plain-{i}")

        # -- incremental: the same location again -----------------------------------------------
        t_incr, incr_read = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            st = backup.create(store, f"s3://{bucket}/bk-0", threads=args.threads, **s3)[1]
            t_incr.append(time.perf_counter() - t)
            incr_read.append(st.read_bytes)

        # -- restore vs plain get ------------------------------------------------------------------
        plain_put(0)

        def plain_get(i: int) -> None:
            out = tmp / f"get-{i}"
            out.mkdir()
            fs.get(remote("plain-0"), [str(out / p.name) for p in objects])
            shutil.rmtree(out)

        def do_restore(i: int) -> Any:
            target = tmp / f"restored-{i}"
            report = backup.restore(
                f"s3://{bucket}/bk-0", to=f"file://{target}", threads=args.threads, **s3
            )
            shutil.rmtree(target)
            return report.stats

        t_get, t_restore, rstats = _median_pair(plain_get, do_restore, args.repeat)
        for i in range(args.repeat):
            clear(f"bk-{i}")
        clear("plain-0")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if started:
            stop()

    def gbps(ts: list[float]) -> float:
        return nbytes / statistics.median(ts) / 1e9

    rows = {
        "plain_put": t_put,
        "backup": t_backup,
        "incremental_backup": t_incr,
        "plain_get": t_get,
        "restore": t_restore,
    }
    result: dict[str, Any] = {
        name: {"seconds": ts, "median_s": statistics.median(ts), "GBps": gbps(ts)}
        for name, ts in rows.items()
    }
    result["backup_vs_plain_put"] = statistics.median(t_put) / statistics.median(t_backup)
    result["restore_vs_plain_get"] = statistics.median(t_get) / statistics.median(t_restore)
    result["backup_copied_bytes"] = [s.copied_bytes for s in stats]
    result["backup_read_bytes"] = [s.read_bytes for s in stats]
    result["incremental_read_bytes"] = incr_read
    result["restore_copied_bytes"] = [s.copied_bytes for s in rstats]

    print(
        f"\nstore: {nbytes / 2**30:.2f} GiB in {len(objects)} objects, file:// <-> SeaweedFS S3, "
        f"median of {args.repeat}, {args.threads} copy threads"
    )
    print(f"{'':22} {'median s':>9} {'GB/s':>6}")
    for name in rows:
        print(f"{name:22} {result[name]['median_s']:9.2f} {result[name]['GBps']:6.2f}")
    print(f"backup / plain put   {result['backup_vs_plain_put']:.2f}x  (target >= 0.8)")
    print(f"restore / plain get  {result['restore_vs_plain_get']:.2f}x  (target >= 0.8)")
    print(f"incremental backup read {max(incr_read)} object bytes (target 0)")
    report = {
        "benchmark": "backup_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "bytes": nbytes,
        "objects": len(objects),
        "repeat": args.repeat,
        "threads": args.threads,
        "backend": "file:// store, SeaweedFS S3 backup (weed mini on 127.0.0.1)",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "targets": "backup and restore >= 0.8x the plain fsspec copy; incremental reads 0 bytes",
        "results": result,
    }
    write_report(args.out or f"docs/perf/backup_throughput-{report['date']}.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
