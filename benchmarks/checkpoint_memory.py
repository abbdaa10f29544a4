"""Checkpoint save: time and peak memory, plaintext ``torch.save`` vs sealed.

Saves one state dict (float32 tensors, ``--size`` in all) four ways, each in
a fresh process, ``--repeat`` times, and reports medians:

* ``plain``: ``torch.save(state, path)`` -- the baseline;
* ``sealed-file``: ``torch_save(state, path, keys=["local:"])``;
* ``sealed-store``: ``save_checkpoint(state, store, ...)`` into a ``file://`` store;
* ``sealed-buffered``: what both did before they streamed -- ``torch.save``
  into a ``BytesIO``, then sealed from it (for comparison only).

Each child builds the state, does a small warm-up save the same way
(imports, keyring unlock, thread pools), then times the real one. Peak RSS is
the process high-water mark (``ru_maxrss``); *extra* is how much the save
raised it above the mark before the save (the state itself is already
there). The sealed saves are atomic (fsync before rename, and the store syncs
its objects before the commit); the plaintext one is a bare ``torch.save``.
Ratios are sealed / plain. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("plain", "sealed-file", "sealed-store", "sealed-buffered")
PASSPHRASE = "bench"  # noqa: S105 -- a throwaway keyring in a temporary folder


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(mode: str, where: Path, size: int) -> dict[str, float]:
    """One measurement in this (fresh) process."""
    import torch

    from sealstore.kms.envelope import atomic_output, seal_stream
    from sealstore.loaders import save_checkpoint, torch_save
    from sealstore.vault.store import Store

    store = Store.open(f"file://{where}/store") if mode == "sealed-store" else None

    def save(obj: Any, step: int) -> None:
        path = where / f"{mode}-{os.getpid()}-{step}.pt"
        if mode == "plain":
            torch.save(obj, path)
        elif mode == "sealed-file":
            torch_save(obj, path, keys=["local:"])
        elif mode == "sealed-store":
            save_checkpoint(obj, store, f"run{os.getpid()}", step, keys=["local:"])
        else:
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = buf.getbuffer()
            with atomic_output(path) as out:
                seal_stream(io.BytesIO(data), out, ["local:"], plaintext_size=len(data), threads=2)

    # A state dict of 16 MiB-ish layers, as a model's would be.
    per = 4 << 20  # floats per layer
    n = max(1, size // (4 * per))
    state = {f"layer{i}.weight": torch.rand(per) for i in range(n)}
    save({"w": torch.rand(1 << 16)}, 0)
    before = _peak()
    t0 = time.perf_counter()
    save(state, 1)
    seconds = time.perf_counter() - t0
    after = _peak()
    return {
        "seconds": seconds,
        "peak_rss": after,
        "extra_rss": after - before,
        "payload": n * per * 4,
    }


def _run(mode: str, where: Path, size: int, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--where", str(where), "--size", str(size)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=400 << 20, help="payload bytes (default 400 MiB)")
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per mode (median)")
    ap.add_argument("--out", default=str(ROOT / "docs/perf/checkpoint_memory-2026-12-02.json"))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--where", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, Path(args.where), args.size)))
        return

    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        home = Path(tmp)
        env = dict(
            os.environ,
            SEALSTORE_HOME=str(home),
            SEALSTORE_PASSPHRASE=PASSPHRASE,
            PYTHONPATH=str(ROOT),
        )
        env.pop("SEALSTORE_KEYRING", None)
        setup = (
            "import sys\n"
            "from sealstore.kms.local import create_keyring\n"
            "from sealstore.vault.store import Store\n"
            "create_keyring(sys.argv[1] + '/keyring.json')\n"
            "Store.init('file://' + sys.argv[1] + '/store')\n"
        )
        subprocess.run([sys.executable, "-c", setup, str(home)], env=env, check=True)
        samples: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for _ in range(args.repeat):
            for mode in MODES:  # interleaved: a slow spell of the machine hits every mode
                samples[mode].append(_run(mode, home, args.size, env))
                for f in home.glob("*.pt"):
                    f.unlink()
    results = {}
    for mode, runs in samples.items():
        results[mode] = {
            k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_rss", "extra_rss")
        }
        results[mode]["samples"] = runs
    plain = results["plain"]
    for mode in MODES[1:]:
        r = results[mode]
        r["time_ratio"] = r["seconds"] / plain["seconds"]
        r["peak_rss_ratio"] = r["peak_rss"] / plain["peak_rss"]
    payload = samples["plain"][0]["payload"]
    report = {
        "benchmark": "checkpoint_memory",
        "payload_bytes": payload,
        "repeat": args.repeat,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "results": results,
    }
    mib = 1 << 20
    print(f"payload {payload / mib:.0f} MiB, median of {args.repeat} fresh processes")
    print(
        f"{'mode':16} {'time s':>7} {'peak MiB':>9} {'extra MiB':>10} {'time x':>7} {'peak x':>7}"
    )
    for mode in MODES:
        r = results[mode]
        tx = f"{r['time_ratio']:.2f}" if "time_ratio" in r else "1.00"
        px = f"{r['peak_rss_ratio']:.2f}" if "peak_rss_ratio" in r else "1.00"
        print(
            f"{mode:16} {r['seconds']:7.2f} {r['peak_rss'] / mib:9.0f} "
            f"{r['extra_rss'] / mib:10.0f} {tx:>7} {px:>7}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
