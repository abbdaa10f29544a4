#!/usr/bin/env python3
"""Rank-partitioned loads (``load_file(plan=...)``) at world size 1, 2 and 4: bytes and time.

A transformer-shaped model (benchmarks/_tp_model.py: ``--layers`` layers,
hidden ``--hidden``, fp16, ~320 MiB by default) is sealed with 1 MiB chunks
to a local file. Two plans per rank:

* ``megatron`` -- column-parallel qkv/up (dim 0), row-parallel proj/down
  (dim 1: every chunk of those tensors is decrypted), vocab-split
  embedding, replicated norms and row-parallel biases;
* ``dim0`` -- every tensor split along dim 0 (the bound's best case).

Two timings:

* ``alone`` -- each rank's load by itself in this process, the others idle:
  what a rank sees with its own CPU (a GPU host per rank). Per round, every
  world size and rank in turn; the world size's figure is its slowest rank.
* ``together`` -- the *world* ranks as torch.distributed (gloo) processes on
  this machine at once, barrier to barrier (``megatron`` only): on 2 cores
  the ranks share the CPUs, so this shows contention, not scaling.

Bytes decrypted are counted per chunk (``SealedFile._decrypt_chunk``: the
header's reads and the final chunk included). Medians of ``--repeat``
rounds; the page cache is warm for every case. Writes a table and ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._tp_model import RULES, decrypted, synthetic
from benchmarks.format_throughput import bench_keyring, write_report

MIB = 1 << 20
WORLDS = (1, 2, 4)


def plan_for(kind: str, rank: int, world: int) -> Any:
    from sealstore.loaders import tensor_parallel

    if kind == "dim0":
        return tensor_parallel(rank, world, column=("*",))
    return tensor_parallel(rank, world, **RULES)


def _together(rank: int, world: int, sealed: str, out: str) -> None:
    """One gloo rank: barrier, load its megatron part, barrier; rank 0 writes the span."""
    import torch.distributed as dist

    from sealstore.loaders import load_file

    dist.init_process_group(
        "gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world
    )
    try:
        dist.barrier()
        t0 = time.perf_counter()
        load_file(sealed, plan=plan_for("megatron", rank, world))
        dist.barrier()
        if rank == 0:
            Path(out).write_text(str(time.perf_counter() - t0))
    finally:
        dist.destroy_process_group()


def together(sealed: Path, world: int, tmp: Path, k: int) -> float:
    import torch.multiprocessing as mp

    out = tmp / f"together-{world}-{k}"
    mp.spawn(_together, args=(world, str(sealed), str(out)), nprocs=world, join=True)
    return float(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ff", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="docs/perf/rank_load.json")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file as st_save_file

    from sealstore.kms.envelope import seal_file
    from sealstore.loaders import load_file

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="rank-load-") as tmpdir:
        tmp = Path(tmpdir)
        bench_keyring(tmp / "home")
        plain, sealed = tmp / "model.safetensors", tmp / "model.seal"
        st_save_file(synthetic(args.hidden, args.ff, args.vocab, args.layers, torch.float16), plain)
        seal_file(plain, sealed, keys=["local:"])
        plain.unlink()
        with decrypted() as n:
            load_file(sealed)  # warm-up: page cache, imports
        data = n[0]

        seconds: dict[str, dict[int, list[float]]] = {}
        cpu: dict[str, dict[int, list[float]]] = {}
        nbytes: dict[str, dict[int, list[int]]] = {}
        cases = [("full", 1)] + [(k, w) for k in ("megatron", "dim0") for w in WORLDS]
        for r in range(args.repeat):
            # Rotate the order so no case always runs first (or last) in a round.
            for kind, world in cases[r % len(cases) :] + cases[: r % len(cases)]:
                times, cpus, counts = [], [], []
                for rank in range(world):
                    plan = None if kind == "full" else plan_for(kind, rank, world)
                    with decrypted() as n:
                        t0, c0 = time.perf_counter(), time.process_time()
                        load_file(sealed, plan=plan)
                        times.append(time.perf_counter() - t0)
                        cpus.append(time.process_time() - c0)
                    counts.append(n[0])
                seconds.setdefault(kind, {}).setdefault(world, []).append(max(times))
                cpu.setdefault(kind, {}).setdefault(world, []).append(max(cpus))
                nbytes.setdefault(kind, {})[world] = counts
        spans: dict[int, list[float]] = {w: [] for w in WORLDS}
        for r in range(args.repeat):
            for world in WORLDS[r % 3 :] + WORLDS[: r % 3]:
                spans[world].append(together(sealed, world, tmp, r))

    full_s = statistics.median(seconds["full"][1])
    full_cpu = statistics.median(cpu["full"][1])
    results: dict[str, Any] = {
        "full": {
            "seconds": full_s,
            "cpu_seconds": full_cpu,
            "decrypted_bytes": nbytes["full"][1][0],
            "samples": seconds["full"][1],
        }
    }
    table = [("plan", "world", "alone s", "vs full", "cpu vs full", "max MiB/rank", "of data")]
    table[0] += ("together s",)
    table.append(("full", "1", f"{full_s:.3f}", "1.00", "1.00", f"{data / MIB:.1f}", "1.00", ""))
    for kind in ("megatron", "dim0"):
        results[kind] = {}
        for world in WORLDS:
            med = statistics.median(seconds[kind][world])
            med_cpu = statistics.median(cpu[kind][world])
            most = max(nbytes[kind][world])
            row = {
                "alone_seconds_slowest_rank": med,
                "alone_vs_full": med / full_s,
                "alone_cpu_seconds_busiest_rank": med_cpu,
                "alone_cpu_vs_full": med_cpu / full_cpu,
                "decrypted_bytes_per_rank": nbytes[kind][world],
                "max_decrypted_fraction_of_data": most / data,
                "alone_samples": seconds[kind][world],
            }
            tog = ""
            if kind == "megatron":
                row["together_seconds"] = statistics.median(spans[world])
                row["together_samples"] = spans[world]
                tog = f"{row['together_seconds']:.3f}"
            results[kind][str(world)] = row
            cells = [kind, str(world), f"{med:.3f}", f"{med / full_s:.2f}"]
            cells += [f"{med_cpu / full_cpu:.2f}", f"{most / MIB:.1f}", f"{most / data:.2f}", tog]
            table.append(tuple(cells))
    for cells in table:
        print(f"{cells[0]:<9}" + "".join(f"{c:>14}" for c in cells[1:]))
    write_report(
        args.out,
        {
            "benchmark": "rank_load",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "note": "shared 2-core machine, other engineers working: medians of --repeat "
            "rounds, case order rotated each round, page cache warm. 'alone': each rank's "
            "load by itself in one process (the world's slowest rank), as on a host per rank; "
            "'together': the world's gloo processes at once on these 2 cores, barrier to "
            "barrier (contention, not scaling); cpu seconds are the loading process's CPU time "
            "(all its threads), less disturbed by the other tenants than wall time. "
            "Decrypted bytes counted per chunk, header reads and the final chunk included; "
            "'data' is what a full load decrypts",
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "model": {
                "hidden": args.hidden,
                "ff": args.ff,
                "vocab": args.vocab,
                "layers": args.layers,
                "dtype": "F16",
                "chunk_size": 1 << 20,
            },
            "data_bytes": data,
            "repeat": args.repeat,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
