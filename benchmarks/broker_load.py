"""Key release under load: two broker replicas on Redis against one on in-process state.

One run, on the test services (swtpm for the evidence, Redis for the shared
state; scripts/services.sh, started here if SEALSTORE_TEST_REDIS_URL is not
set), real `sealstore broker serve` processes over TLS on 127.0.0.1, each
writing its audit log (a local folder) before it hands out a key:

* ``1 replica, in-process``: the baseline -- one broker, state in its memory;
* ``2 replicas, redis``: two brokers sharing challenges, lockout and rate
  windows in Redis, the load split across them.

Each round issues N challenges and quotes for them (not timed), then sends
the N releases at once from 64 threads and times each request. Rounds
(default 3) give medians of p50 / p95 and of the throughput; the ratios are
to the baseline. Every round checks that each granted release is one record
in the audit log, and that the log verifies. Writes JSON (docs/perf).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _services import services, stop  # noqa: E402 -- benchmarks/, the script's folder
from release_latency import PASSPHRASE, _self_signed  # noqa: E402

CONTEXT = {"tenant": "bench", "artifact": "model", "version": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(config: Path, port: int, ctx: ssl.SSLContext, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("sealstore")
    proc = subprocess.Popen(
        [str(exe), "broker", "serve", "--config", str(config), "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    for _ in range(150):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                ctx.wrap_socket(raw, server_hostname="127.0.0.1").close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"a broker did not start: {log.read_text()}")


def _round(
    ports: list[int], ctx: ssl.SSLContext, token: str, slot: dict, n: int, tcti: str
) -> dict[str, Any]:
    import nacl.public

    from sealstore.enclave.broker import release
    from sealstore.enclave.broker.client import BrokerKey, https_json

    client = BrokerKey("broker+https://127.0.0.1:1/bench/model", tcti=tcti)
    bodies = []
    for i in range(n):
        port = ports[i % len(ports)]
        status, ch = https_json(
            "127.0.0.1",
            port,
            ctx,
            "POST",
            "/v1/challenge",
            {"tenant": "bench", "artifact": "model"},
            token,
        )
        assert status == 200, ch
        public = bytes(nacl.public.PrivateKey.generate().public_key)
        bound = release.binding(base64.b64decode(ch["nonce"]), public, "tpm")
        bodies.append(
            (
                ports[(i + 1) % len(ports)],
                {
                    "tenant": "bench",
                    "artifact": "model",
                    "nonce": ch["nonce"],
                    "public_key": release.b64e(public),
                    "evidence": client._collect("tpm", bound, ch),
                    "slot": slot,
                    "context": CONTEXT,
                },
            )
        )
    gate = threading.Barrier(64)

    def one(item: tuple[int, dict]) -> tuple[int, float]:
        with contextlib.suppress(threading.BrokenBarrierError):
            gate.wait(10)
        t0 = time.perf_counter()
        status, _ = https_json("127.0.0.1", item[0], ctx, "POST", "/v1/release", item[1], token)
        return status, (time.perf_counter() - t0) * 1000

    t0 = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, bodies))
    wall = time.perf_counter() - t0
    if any(s != 200 for s, _ in results):
        raise SystemExit(f"refused releases: {[s for s, _ in results if s != 200][:5]}")
    lat = sorted(t for _, t in results)
    return {"p50_ms": statistics.median(lat), "p95_ms": lat[int(0.95 * n) - 1], "per_s": n / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="concurrent releases per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="JSON file (default docs/perf/...)")
    args = parser.parse_args()

    from sealstore.audit import read_records, verify_log
    from sealstore.enclave.attestation import tpm, tpm_quote
    from sealstore.enclave.broker.client import BrokerKey
    from sealstore.keys import DataKey
    from sealstore.kms.local import create_keyring
    from sealstore.vault.storage import open_storage

    env, started = services("SEALSTORE_TEST_REDIS_URL")
    tcti, redis_url = env["SEALSTORE_TEST_TPM"], env["SEALSTORE_TEST_REDIS_URL"]
    os.environ["SEALSTORE_PASSPHRASE"] = PASSPHRASE
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ring = create_keyring(tmp / "ring.json", passphrase=PASSPHRASE)
        cert, key = _self_signed(tmp)
        ctx = ssl.create_default_context(cafile=str(cert))
        (tmp / "ak.pem").write_bytes(tpm_quote.ak_public(tcti))
        with tpm.connect(tcti) as ectx:
            pcrs = tpm.read_pcrs(ectx, tpm.PcrPolicy.parse("7,16"))
        token = os.urandom(16).hex()
        uri = f"broker+https://127.0.0.1:1/bench/model?key=local:{ring.path}"
        slot = json.loads(BrokerKey(uri).wrap(DataKey.generate(), CONTEXT).blob)
        setups = {"1 replica, in-process": (1, None), "2 replicas, redis": (2, redis_url)}
        for name, (replicas, state) in setups.items():
            folder = tmp / name.replace(" ", "_").replace(",", "")
            folder.mkdir()
            config = {
                "server": {"host": "127.0.0.1", "tls_cert": str(cert), "tls_key": str(key)},
                "max_challenges_per_identity": 10 * args.n,
                "identities": {
                    "bench": {
                        "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                        "tpm_ak": str(tmp / "ak.pem"),
                    }
                },
                "tenants": {
                    "bench": {
                        "keys": [f"local:{ring.path}"],
                        "artifacts": {
                            "model": {
                                "identities": ["bench"],
                                "evidence": ["tpm"],
                                "tpm": {
                                    "pcrs": "7,16",
                                    "reference": {k: v.hex() for k, v in pcrs.items()},
                                },
                            }
                        },
                    }
                },
                "audit": {"log": str(folder / "audit")},
                "detectors": {"release_rate": {"floor": 10**9}},
            }
            if state:
                config["state"] = {"url": state, "prefix": f"bench-{uuid.uuid4().hex}:"}
            (folder / "broker.yaml").write_text(json.dumps(config))
            ports = [_port() for _ in range(replicas)]
            procs = [
                _start(folder / "broker.yaml", p, ctx, folder / f"{i}.log")
                for i, p in enumerate(ports)
            ]
            try:
                _round(ports, ctx, token, slot, 16, tcti)  # warm-up
                rounds = [_round(ports, ctx, token, slot, args.n, tcti) for _ in range(args.rounds)]
            finally:
                for p in procs:
                    p.terminate()
                    p.wait(10)
            log = open_storage(folder / "audit")
            granted = sum(
                1
                for r in read_records(log)
                if r["action"] == "release" and r["decision"] == "granted"
            )
            problems = [str(p) for r in verify_log(log) for p in r.problems]
            want = 16 + args.n * args.rounds
            if granted != want or problems:
                raise SystemExit(f"{name}: {granted} of {want} releases audited; {problems[:3]}")
            results[name] = {
                k: round(statistics.median(r[k] for r in rounds), 1)
                for k in ("p50_ms", "p95_ms", "per_s")
            }
            results[name]["audited"] = f"{granted}/{want}"
    if started:
        stop()
    base = results["1 replica, in-process"]
    for r in results.values():
        r["x_p95"] = round(r["p95_ms"] / base["p95_ms"], 2)
        r["x_per_s"] = round(r["per_s"] / base["per_s"], 2)
    print(f"{args.n} concurrent releases x {args.rounds} rounds (medians)")
    print(
        f"{'setup':<24} {'p50 ms':>8} {'p95 ms':>8} {'rel/s':>7} {'x p95':>6} {'x rel/s':>8} "
        f"{'audited':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:<24} {r['p50_ms']:>8} {r['p95_ms']:>8} {r['per_s']:>7} {r['x_p95']:>6} "
            f"{r['x_per_s']:>8} {r['audited']:>10}"
        )
    out = args.out or ROOT / "docs" / "perf" / f"broker_load-{dt.date.today()}.json"
    doc = {
        "benchmark": "broker_load",
        "when": dt.datetime.now(dt.UTC).isoformat(),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "n": args.n,
        "rounds": args.rounds,
        "client_threads": 64,
        "tpm": "swtpm over TCP (quotes made before the timed releases)",
        "results": results,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
