#!/usr/bin/env python3
"""Push and pull of a model directory against a plain fsspec copy of the same files.

One run, per backend (``file://`` and, when an S3 endpoint is given, SeaweedFS S3):

* ``plain_put``  -- ``fs.put(model_dir, remote, recursive=True)``: fsspec's own upload.
* ``push``       -- ``Store.push(model_dir, ...)``: read, hash (plaintext SHA-256 for the
  BoM), seal (AES-256-GCM, 1 MiB chunks, 2 threads), hash the ciphertext, upload, sign.
* ``plain_get``  -- ``fs.get(remote, out_dir, recursive=True)``.
* ``pull``       -- ``Store.pull(ref, out_dir)``: download, check the object hash and every
  chunk tag, decrypt, write.

The model directory is ``--size`` bytes of random data in safetensors-sized shards plus
small JSON files (a Hugging Face layout). The source's page cache is warm for every
measurement; each is repeated ``--repeat`` times and the median is reported, with the
ratio sealstore/plain as throughput (>= 1 means sealstore is as fast as the plain copy).
"""

from __future__ import annotations

import argparse
import json
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

from benchmarks.format_throughput import parse_size, write_report


def make_model(root: Path, size: int, shard: int) -> int:
    """A Hugging Face-like directory of *size* bytes; returns the byte count."""
    import numpy as np

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    total, i = 0, 0
    while total < size:
        n = min(shard, size - total)
        with open(root / f"model-{i + 1:05d}.safetensors", "wb") as fp:
            left = n
            while left:
                block = min(left, 64 << 20)
                fp.write(rng.integers(0, 256, block, dtype=np.uint8).tobytes())
                left -= block
        total += n
        i += 1
    for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
        (root / name).write_text(json.dumps({"name": name, "pad": "x" * 500}))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(fn: Callable[[], Any], repeat: int, reset: Callable[[], None]) -> list[float]:
    out = []
    for _ in range(repeat):
        reset()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    reset()
    return out


def bench_backend(
    label: str,
    store_url: str,
    plain_url: str,
    options: dict[str, Any],
    model: Path,
    nbytes: int,
    tmp: Path,
    repeat: int,
    threads: int,
) -> dict[str, Any]:
    import fsspec

    from sealstore.vault.lifecycle import gc
    from sealstore.vault.store import Store

    fs_options = dict(options)
    if "endpoint_url" in fs_options:
        fs_options["client_kwargs"] = {"endpoint_url": fs_options.pop("endpoint_url")}
    fs, root = fsspec.core.url_to_fs(plain_url, **fs_options)
    store = Store.init(store_url, **options)
    out = tmp / "out"

    def clear_out() -> None:
        shutil.rmtree(out, ignore_errors=True)

    def clear_plain() -> None:
        if fs.exists(root):
            fs.rm(root, recursive=True)
        clear_out()

    def clear_store() -> None:
        for name in store.artifacts():
            for v in store.versions(name):
                store.shred(f"{name}:{v}")
        gc(store, grace=-1)
        clear_out()

    names = iter(f"model-{i}" for i in range(1000))

    res: dict[str, Any] = {"backend": label, "store": store_url}
    res["plain_put_s"] = timed(
        lambda: fs.put(str(model) + "/", root, recursive=True), repeat, clear_out
    )
    fs.put(str(model) + "/", root, recursive=True)
    res["plain_get_s"] = timed(
        lambda: fs.get(root + "/", str(out), recursive=True), repeat, clear_out
    )
    clear_plain()
    # Each push makes a new version; the previous ones are shredded between samples.
    res["push_s"] = timed(
        lambda: store.push(model, next(names), keys=["local:"], threads=threads),
        repeat,
        clear_store,
    )
    store.push(model, "pulled:1", keys=["local:"], threads=threads)
    res["pull_s"] = timed(lambda: store.pull("pulled:1", out, threads=threads), repeat, clear_out)
    clear_store()
    for k in ("plain_put", "plain_get", "push", "pull"):
        med = statistics.median(res[f"{k}_s"])
        res[f"{k}_median_s"] = med
        res[f"{k}_GBps"] = nbytes / med / 1e9
    res["push_vs_plain_put"] = res["plain_put_median_s"] / res["push_median_s"]
    res["pull_vs_plain_get"] = res["plain_get_median_s"] / res["pull_median_s"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB", help="model bytes (default 1GiB)")
    ap.add_argument("--shard", default="256MiB", help="shard file size (default 256MiB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="sealing/decryption threads")
    ap.add_argument(
        "--s3-url",
        default=os.environ.get("SEALSTORE_TEST_S3_URL"),
        help="S3 endpoint (default $SEALSTORE_TEST_S3_URL; `make services-up` starts SeaweedFS)",
    )
    ap.add_argument("--s3-key", default=os.environ.get("SEALSTORE_TEST_S3_KEY"))
    ap.add_argument("--s3-secret", default=os.environ.get("SEALSTORE_TEST_S3_SECRET"))
    ap.add_argument("--backends", default="file,s3")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--out", default="benchmarks/results/store_throughput.json")
    args = ap.parse_args()

    size = parse_size(args.size)
    shard = parse_size(args.shard)
    tmp = Path(tempfile.mkdtemp(prefix="sealstore-bench-", dir=args.tmpdir))
    home = tmp / "home"
    home.mkdir()
    os.environ["SEALSTORE_HOME"] = str(home)
    os.environ.setdefault("SEALSTORE_PASSPHRASE", "benchmark")
    from nacl import pwhash

    from sealstore.kms.local import create_keyring

    create_keyring(
        home / "keyring.json",
        opslimit=pwhash.argon2id.OPSLIMIT_MIN,
        memlimit=pwhash.argon2id.MEMLIMIT_MIN,
    )
    results = []
    try:
        model = tmp / "model"
        nbytes = make_model(model, size, shard)
        backends = args.backends.split(",")
        if "file" in backends:
            results.append(
                bench_backend(
                    "file",
                    f"file://{tmp}/store",
                    f"file://{tmp}/plain",
                    {},
                    model,
                    nbytes,
                    tmp,
                    args.repeat,
                    args.threads,
                )
            )
        if "s3" in backends:
            if not (args.s3_url and args.s3_key and args.s3_secret):
                print(
                    "no S3 endpoint given (--s3-url/--s3-key/--s3-secret): skipping s3",
                    file=sys.stderr,
                )
            else:
                import boto3

                bucket = "bench-" + uuid.uuid4().hex[:12]
                boto3.client(
                    "s3",
                    endpoint_url=args.s3_url,
                    aws_access_key_id=args.s3_key,
                    aws_secret_access_key=args.s3_secret,
                    region_name="us-east-1",
                ).create_bucket(Bucket=bucket)
                opts = {"endpoint_url": args.s3_url, "key": args.s3_key, "secret": args.s3_secret}
                results.append(
                    bench_backend(
                        "seaweedfs-s3",
                        f"s3://{bucket}/store",
                        f"s3://{bucket}/plain",
                        opts,
                        model,
                        nbytes,
                        tmp,
                        args.repeat,
                        args.threads,
                    )
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nmodel: {nbytes / 2**30:.2f} GiB, median of {args.repeat}, {args.threads} threads")
    print(
        f"{'backend':14} {'plain put':>10} {'push':>8} {'ratio':>6}   "
        f"{'plain get':>10} {'pull':>8} {'ratio':>6}   (GB/s)"
    )
    for r in results:
        print(
            f"{r['backend']:14} {r['plain_put_GBps']:10.2f} {r['push_GBps']:8.2f} "
            f"{r['push_vs_plain_put']:6.2f}   {r['plain_get_GBps']:10.2f} {r['pull_GBps']:8.2f} "
            f"{r['pull_vs_plain_get']:6.2f}"
        )
    report = {
        "benchmark": "store_throughput",
        "bytes": nbytes,
        "repeat": args.repeat,
        "threads": args.threads,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "target": "push and pull >= 0.8x the plain fsspec copy, both ways",
        "results": results,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
