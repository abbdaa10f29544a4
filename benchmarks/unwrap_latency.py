"""Unwrap latency and throughput per key provider, with and without the DEK cache.

One run measures every provider against the real servers of the test
services (scripts/services.sh; started here if SEALSTORE_TEST_* are not set):

* ``local``: a keyring file (the Argon2id unlock is paid once, before timing);
* ``x25519``: an identity file (sealed box);
* ``vault-transit`` over HTTP and over TLS (OpenBao dev servers);
* ``aws-kms`` (moto server).

For each: the latency of single unwraps (p50, p95, in ms) and the throughput
of 16 threads unwrapping, without a cache; then the same lookups through a
``DekCache`` (every call after the first is a hit). Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _services import services, stop  # noqa: E402 -- benchmarks/, the script's folder

from sealstore.dekcache import DekCache  # noqa: E402
from sealstore.keys import DataKey, KeySlot, Unwrapper, Wrapper  # noqa: E402

CONTEXT = {"tenant": "bench", "artifact": "model", "version": "1"}


def _providers(env: dict[str, str], tmp: Path) -> dict[str, tuple[Wrapper, Unwrapper]]:
    import boto3
    import hvac

    from sealstore.kms.aws_kms import AwsKmsKey
    from sealstore.kms.local import create_keyring
    from sealstore.kms.vault_transit import VaultTransitKey
    from sealstore.kms.x25519 import X25519Recipient, generate_identity

    out: dict[str, tuple[Wrapper, Unwrapper]] = {}
    ring = create_keyring(tmp / "ring.json", passphrase="bench")  # noqa: S106 -- throwaway
    out["local"] = (ring, ring)
    ident = generate_identity(tmp / "id.key")
    out["x25519"] = (X25519Recipient.from_uri(ident.recipient), ident)
    token = env["SEALSTORE_TEST_VAULT_TOKEN"]
    for name, addr, cacert in (
        ("vault-transit http", env["SEALSTORE_TEST_VAULT_ADDR"], None),
        (
            "vault-transit tls",
            env["SEALSTORE_TEST_VAULT_TLS_ADDR"],
            env["SEALSTORE_TEST_VAULT_CACERT"],
        ),
    ):
        client = hvac.Client(url=addr, token=token, verify=cacert or False)
        mount = f"bench-{uuid.uuid4().hex[:8]}"
        client.sys.enable_secrets_engine("transit", path=mount)
        client.secrets.transit.create_key("k", mount_point=mount, derived=True)
        host = addr.split("://", 1)[1]
        uri = f"vault-transit://{host}/{mount}/k" + ("" if cacert else "?tls=false")
        key = VaultTransitKey(uri, token=token, cacert=cacert)
        out[name] = (key, key)
    kms = boto3.client(
        "kms",
        endpoint_url=env["SEALSTORE_TEST_MOTO_URL"],
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",  # noqa: S106 -- moto accepts any
    )
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    aws = AwsKmsKey.from_uri(
        f"aws-kms://{key_id}", endpoint_url=env["SEALSTORE_TEST_MOTO_URL"], region="us-east-1"
    )
    out["aws-kms (moto)"] = (aws, aws)
    return out


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return p50 * 1e3, p95 * 1e3


def _measure(
    unwrapper: Unwrapper, slot: KeySlot, calls: int, threads: int, cache: DekCache | None
) -> dict[str, float]:
    def once() -> float:
        start = time.perf_counter()
        dek = cache.get(slot, CONTEXT) if cache is not None else None
        if dek is None:
            dek = unwrapper.unwrap(slot, CONTEXT)
            if cache is not None:
                cache.put(slot, CONTEXT, dek)
        dek.close()
        return time.perf_counter() - start

    once()  # warm: connections, TLS sessions, the keyring unlock
    p50, p95 = _percentiles([once() for _ in range(calls)])
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: once(), range(calls)))
    rate = calls / (time.perf_counter() - start)
    return {"p50_ms": p50, "p95_ms": p95, "per_s_threads": rate}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300, help="unwraps per measurement")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "unwrap_latency.json"
    )
    args = ap.parse_args()
    env, started = services("SEALSTORE_TEST_VAULT_ADDR")
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, (wrapper, unwrapper) in _providers(env, Path(tmp)).items():
                slot = wrapper.wrap(DataKey.generate(), CONTEXT)
                results[name] = {
                    "no_cache": _measure(unwrapper, slot, args.calls, args.threads, None),
                    "cache": _measure(
                        unwrapper, slot, args.calls, args.threads, DekCache(max_uses=10**9)
                    ),
                }
    finally:
        if started:
            stop()
    print(f"unwrap latency: {args.calls} calls per cell, throughput with {args.threads} threads")
    print(
        f"{'provider':<22}{'p50 ms':>9}{'p95 ms':>9}{'unwraps/s':>12}"
        f"{'cached p50':>12}{'cached p95':>12}{'cached/s':>12}"
    )
    for name, row in results.items():
        a, b = row["no_cache"], row["cache"]
        print(
            f"{name:<22}{a['p50_ms']:9.3f}{a['p95_ms']:9.3f}{a['per_s_threads']:12.0f}"
            f"{b['p50_ms'] * 1e3:10.1f}us{b['p95_ms'] * 1e3:10.1f}us{b['per_s_threads']:12.0f}"
        )
    report = {
        "benchmark": "unwrap_latency",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "parameters": {"calls": args.calls, "threads": args.threads},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
