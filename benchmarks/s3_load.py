"""A ~1 GiB safetensors model from SeaweedFS S3 into CPU tensors: sealstore against its peers.

Compared in one run, on the same server and object size (medians of --repeat,
the cases run round-robin):

* ``runai_streamer``: Run:ai Model Streamer (``SafetensorsStreamer().stream_file``)
  of the plaintext file; its tensors are views of its own buffer, not copied
  (its best case);
* ``sealstore_url``: ``load_file("s3://...")`` of the sealed file: ranged GETs,
  *concurrency* at once, decrypted by 2 lanes straight into the tensors;
* ``sealstore_store``: ``load_file(NAME, store=...)`` of the same model pushed to a
  store on the same server: also every signature and the object's digest;
* ``old_file_object``: what sealstore did before: an s3fs file (readahead cache)
  read by ``SealedFile`` one request at a time, into one buffer;
* ``pull_then_load``: ``store.pull`` to a local folder, then safetensors
  ``load_file`` + ``clone()`` of every tensor;
* a sweep of ``sealstore_url`` over concurrency and range size.

And, for a scaling model: the time to the first byte of a 4 KiB ranged GET,
the GB/s of 8 MiB ranged GETs with N in flight (threads of botocore, the
client the loads use), and AES-256-GCM ``decrypt_into`` GB/s on one core.

The machine is small (2 cores) and shared: client, server and decryption
compete for the same two cores, and other work shows in every figure;
compare ratios within one run.

    .venv/bin/python benchmarks/s3_load.py            # ~1 GiB, 5 samples each
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
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
from benchmarks.format_throughput import bench_keyring, machine_info, write_report

GIB = 1 << 30


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, Any]:
    """Median, min and every sample of *fn*'s wall time (its result is dropped before the next)."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t0)
        del out
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}


def with_gbps(result: dict[str, Any], size: int) -> dict[str, Any]:
    result["gbps"] = size / result["median_s"] / 1e9
    return result


def state_dict(size: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    n = 16
    per = size // n // 4
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n)}


def runai_load(url: str) -> int:
    from runai_model_streamer import SafetensorsStreamer

    got = 0
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(url, device="cpu")
        for _, tensor in streamer.get_tensors():
            got += tensor.numel() * tensor.element_size()
    return got


def old_path_load(url: str) -> Any:
    """Before ranged reads: the s3fs file object, one request at a time through its cache."""
    import fsspec
    import torch

    from sealstore.kms.envelope import open_sealed

    fs, path = fsspec.core.url_to_fs(url)
    fp = fs.open(path, "rb", block_size=16 << 20, cache_type="readahead")
    with fp, open_sealed(fp) as sf:
        out = torch.empty(sf.size, dtype=torch.uint8)
        sf.decrypt_into(out.numpy(), threads=2)
    return out


def pull_then_load(store: Any, name: str, tmp: Path) -> Any:
    import shutil

    from safetensors.torch import load_file

    dest = tmp / f"pulled-{uuid.uuid4().hex[:8]}"
    store.pull(name, dest)
    try:
        return {k: v.clone() for k, v in load_file(dest / "model.safetensors").items()}
    finally:
        shutil.rmtree(dest)


def ttfb(client: Any, bucket: str, key: str, samples: int = 20) -> dict[str, Any]:
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        got = client.get_object(Bucket=bucket, Key=key, Range="bytes=0-4095")
        got["Body"].read()
        times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3}


def ranged_gets(client: Any, bucket: str, key: str, size: int, n: int, repeat: int) -> float:
    spans = [(lo, min(lo + (8 << 20), size)) for lo in range(0, size, 8 << 20)]

    def get(span: tuple[int, int]) -> int:
        got = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={span[0]}-{span[1] - 1}")
        return len(got["Body"].read())

    def run() -> int:
        with cf.ThreadPoolExecutor(n) as pool:
            return sum(pool.map(get, spans))

    return float(size / timed(run, repeat)["median_s"] / 1e9)


def decrypt_rate(total: int = 256 << 20, chunk: int = 1 << 20) -> float:
    """AES-256-GCM ``decrypt_into`` of 1 MiB chunks on one thread, in memory (GB/s)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(AESGCM.generate_key(256))
    nonce = bytes(12)
    ct = aead.encrypt(nonce, os.urandom(chunk), b"")
    out = bytearray(chunk)
    runs = total // chunk

    def run() -> None:
        for _ in range(runs):
            aead.decrypt_into(nonce, ct, b"", out)

    return float(total / timed(run, 5)["median_s"] / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="docs/perf/s3_load.json")
    args = ap.parse_args()

    env, started = services("SEALSTORE_TEST_S3_URL")
    url = env["SEALSTORE_TEST_S3_URL"]
    key, secret = env["SEALSTORE_TEST_S3_KEY"], env["SEALSTORE_TEST_S3_SECRET"]
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ENDPOINT_URL_S3=url,
        AWS_ACCESS_KEY_ID=key,
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0",
    )
    import boto3
    import torch
    from safetensors.torch import save_file

    from sealstore.kms.envelope import seal_file
    from sealstore.loaders.safetensors import load_file
    from sealstore.vault.store import Store

    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    bucket = "s3-load-" + uuid.uuid4().hex[:10]
    client.create_bucket(Bucket=bucket)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "note": (
            "2 vCPUs shared with other work; SeaweedFS, the client and decryption share them. "
            f"Each figure is the median of {args.repeat} runs; compare ratios within this run."
        ),
        "server": "SeaweedFS (weed mini) on loopback",
    }
    try:
        with tempfile.TemporaryDirectory(prefix="s3-load-") as tmp_name:
            tmp = Path(tmp_name)
            bench_keyring(tmp / "home")
            model = tmp / "model"
            model.mkdir()
            plain = model / "model.safetensors"
            save_file(state_dict(int(args.size_gib * GIB)), plain)
            size = plain.stat().st_size
            sealed = tmp / "model.safetensors.sealed"
            seal_file(plain, sealed, ["local:"])
            client.upload_file(str(plain), bucket, "plain/model.safetensors")
            client.upload_file(str(sealed), bucket, "sealed/model.safetensors.sealed")
            store = Store.init(f"s3://{bucket}/store")
            store.push(model, "model", keys=["local:"])
            plain.unlink()
            sealed_url = f"s3://{bucket}/sealed/model.safetensors.sealed"
            report["size_bytes"] = size

            want = load_file(sealed_url)
            assert sum(t.numel() * t.element_size() for t in want.values()) > 0.99 * size
            del want

            r = args.repeat

            def with_env(fn: Callable[[], Any], **env: str) -> Callable[[], Any]:
                def run() -> Any:
                    saved = {k: os.environ.get(k) for k in env}
                    os.environ.update(env)
                    try:
                        return fn()
                    finally:
                        for k, v in saved.items():
                            if v is None:
                                os.environ.pop(k, None)
                            else:
                                os.environ[k] = v

                return run

            plain_url = f"s3://{bucket}/plain/model.safetensors"
            cases = {
                "runai_streamer": lambda: runai_load(plain_url),
                "runai_streamer_n8": with_env(
                    lambda: runai_load(plain_url), RUNAI_STREAMER_CONCURRENCY="8"
                ),
                "sealstore_url": lambda: load_file(sealed_url, threads=2),
                "sealstore_store": lambda: load_file("model", store=store, threads=2),
                "old_file_object": lambda: old_path_load(sealed_url),
                "pull_then_load": lambda: pull_then_load(store, "model", tmp),
            }
            sweep_names = {}
            for n, mib in ((4, 8), (8, 8), (16, 8), (8, 16), (16, 16), (8, 4)):
                name = f"sealstore_url_n{n}_r{mib}mib"
                sweep_names[name] = f"n{n}_r{mib}mib"
                cases[name] = with_env(
                    lambda: load_file(sealed_url, threads=2),
                    SEALSTORE_S3_CONCURRENCY=str(n),
                    SEALSTORE_S3_RANGE_MB=str(mib),
                )
            # Round-robin, not one case after another: the machine's load
            # drifts over minutes, and each case then sees the same drift.
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for k in range(r):
                for name, fn in cases.items():
                    samples[name].append(timed(fn, 1)["samples_s"][0])
                print(f"round {k + 1}/{r} done", flush=True)
            results = {}
            for name, times in samples.items():
                results[name] = with_gbps(
                    {
                        "median_s": statistics.median(times),
                        "min_s": min(times),
                        "samples_s": times,
                    },
                    size,
                )
            base = results["runai_streamer"]["gbps"]
            for name, res in results.items():
                res["vs_runai"] = res["gbps"] / base
                print(
                    f"{name:32s} {res['gbps']:.3f} GB/s  {res['vs_runai']:.2f}x runai", flush=True
                )
            report["sealstore_url_sweep"] = {
                label: results.pop(name) for name, label in sweep_names.items()
            }
            report["loads"] = results
            report["defaults"] = {
                "sealstore": "SEALSTORE_S3_CONCURRENCY=8, SEALSTORE_S3_RANGE_MB=8, 2 lanes",
                "runai_streamer": "its defaults (runai_streamer_n8: RUNAI_STREAMER_CONCURRENCY=8)",
            }

            sealed_key = "sealed/model.safetensors.sealed"
            report["get_first_byte_4kib"] = ttfb(client, bucket, sealed_key)
            report["ranged_get_gbps_8mib"] = {
                f"n{n}": ranged_gets(client, bucket, sealed_key, size, n, r)
                for n in (1, 2, 4, 8, 16)
            }
            report["aes256gcm_decrypt_into_gbps_one_core"] = decrypt_rate()
            report["torch"] = torch.__version__
            print(report["get_first_byte_4kib"], report["ranged_get_gbps_8mib"])
            print("decrypt GB/s a core", report["aes256gcm_decrypt_into_gbps_one_core"])
    finally:
        # Leave nothing behind on the server.
        s3 = boto3.resource("s3", endpoint_url=url, region_name="us-east-1")
        b = s3.Bucket(bucket)
        b.objects.all().delete()
        b.delete()
        if started:
            stop()
    write_report(args.out, report)


if __name__ == "__main__":
    main()
