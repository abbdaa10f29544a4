"""Attested key release: what a load pays for the broker, against unwrapping locally.

One run, on the test services' swtpm (scripts/services.sh; started here if
SEALSTORE_TEST_TPM is not set), with a real `sealstore broker serve` over TLS
on 127.0.0.1 (a throwaway self-signed certificate, a bearer token):

* ``local unwrap``: the tenant key (a local keyring) opening the inner slot
  directly -- what the broker itself does after verifying;
* ``tpm quote``: one quote over PCRs 7,16 with the AK (the evidence's cost);
* ``tpm: unwrap``: a KEK sealed to the TPM (local attestation, no broker);
* ``broker release``: ``BrokerKey.unwrap`` end to end -- two HTTPS requests,
  a quote, the verification, the unwrap and the sealed box.

Each is timed N times (default 25) after a warm-up; prints p50 / p95 in ms
and the ratios to the local unwrap, and writes JSON (docs/perf by default).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _services import services, stop  # noqa: E402 -- benchmarks/, the script's folder

CONTEXT = {"tenant": "bench", "artifact": "model", "version": "1"}
PASSPHRASE = "bench passphrase"  # noqa: S105 -- a throwaway keyring


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(san, critical=False)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return folder / "cert.pem", folder / "key.pem"


def _time(fn: Callable[[], Any], n: int) -> dict[str, float]:
    fn()  # warm-up: imports, first TLS handshake, keyring unlock
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p95_ms": round(samples[min(len(samples) - 1, int(0.95 * len(samples)))], 2),
        "n": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=25, help="timed runs per case")
    parser.add_argument("--out", type=Path, help="JSON file (default docs/perf/...)")
    args = parser.parse_args()

    from sealstore.enclave.attestation import tpm, tpm_quote
    from sealstore.enclave.attestation.tpm_kek import seal_kek
    from sealstore.enclave.broker.client import BrokerKey
    from sealstore.keys import DataKey, KeySlot
    from sealstore.kms.local import create_keyring

    env, started = services("SEALSTORE_TEST_TPM")
    tcti = env["SEALSTORE_TEST_TPM"]
    os.environ["SEALSTORE_TPM_TCTI"] = tcti
    os.environ["SEALSTORE_PASSPHRASE"] = PASSPHRASE
    policy = tpm.PcrPolicy.parse("7,16")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ring = create_keyring(tmp / "ring.json", passphrase=PASSPHRASE)
        cert, key = _self_signed(tmp)
        (tmp / "ak.pem").write_bytes(tpm_quote.ak_public(tcti))
        with tpm.connect(tcti) as ectx:
            pcrs = tpm.read_pcrs(ectx, policy)
        token = os.urandom(16).hex()
        config = {
            "server": {"host": "127.0.0.1", "port": 0, "tls_cert": str(cert), "tls_key": str(key)},
            # The release-rate detector throttles past 30 a minute: a timed loop is not an incident.
            "detectors": {"release_rate": {"floor": 100_000}},
            "identities": {
                "bench": {
                    "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                    "tpm_ak": "ak.pem",
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
        }
        (tmp / "broker.yaml").write_text(json.dumps(config))  # JSON is YAML
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        exe = Path(sys.executable).with_name("sealstore")
        log = (tmp / "broker.log").open("wb")
        proc = subprocess.Popen(
            [
                str(exe),
                "broker",
                "serve",
                "--config",
                str(tmp / "broker.yaml"),
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            ctx = ssl.create_default_context(cafile=str(cert))
            for _ in range(150):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                        ctx.wrap_socket(raw, server_hostname="127.0.0.1").close()
                    break
                except OSError:
                    time.sleep(0.2)
            else:
                raise SystemExit(f"the broker did not start: {(tmp / 'broker.log').read_text()}")
            os.environ.update(
                SEALSTORE_BROKERS=f"https://127.0.0.1:{port}",
                SEALSTORE_BROKER_CACERT=str(cert),
                SEALSTORE_BROKER_TOKEN=token,
            )
            bkey = BrokerKey(f"broker+https://127.0.0.1:{port}/bench/model?key=local:{ring.path}")
            dek = DataKey.generate()
            slot = bkey.wrap(dek, CONTEXT)
            inner = KeySlot.from_json(json.loads(slot.blob))
            scoped = dict(CONTEXT, **{"sealstore.release": "bench/model"})
            kek = seal_kek(tmp / "kek.json", policy)
            tslot = kek.wrap(dek, CONTEXT)
            assert bkey.unwrap(slot, CONTEXT).material() == dek.material()
            cases = {
                "local unwrap": lambda: ring.unwrap(inner, scoped),
                "tpm quote": lambda: tpm_quote.quote(os.urandom(32), policy, tcti),
                "tpm: unwrap": lambda: kek.unwrap(tslot, CONTEXT),
                "broker release": lambda: bkey.unwrap(slot, CONTEXT),
            }
            results = {name: _time(fn, args.n) for name, fn in cases.items()}
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
            if started:
                stop()

    base = results["local unwrap"]["p50_ms"]
    local_tpm = results["tpm: unwrap"]["p50_ms"]
    for r in results.values():
        r["x_local_unwrap"] = round(r["p50_ms"] / base, 1)
        r["x_tpm_unwrap"] = round(r["p50_ms"] / local_tpm, 2)
    overhead = results["broker release"]["p50_ms"] - results["tpm quote"]["p50_ms"]
    print(f"{'case':<16} {'p50 ms':>8} {'p95 ms':>8} {'x local':>8} {'x tpm:':>7}")
    for name, r in results.items():
        print(
            f"{name:<16} {r['p50_ms']:>8} {r['p95_ms']:>8} {r['x_local_unwrap']:>8} "
            f"{r['x_tpm_unwrap']:>7}"
        )
    print(f"broker release minus the quote: {overhead:.1f} ms (TLS, verify, unwrap, box)")
    out = args.out or ROOT / "docs" / "perf" / f"release_latency-{dt.date.today()}.json"
    doc = {
        "benchmark": "release_latency",
        "when": dt.datetime.now(dt.UTC).isoformat(),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "tpm": "swtpm over TCP (the test services)",
        "results": results,
        "broker_minus_quote_ms": round(overhead, 1),
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
