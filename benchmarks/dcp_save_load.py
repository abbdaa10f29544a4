#!/usr/bin/env python3
"""Sealed DCP save/load against plaintext ``FileSystemWriter`` / ``FileSystemReader``.

A training-like state of ``--size`` bytes (fp32 tensors of ``--tensor`` bytes
each, plus a step counter) is saved with ``torch.distributed.checkpoint.save``
and loaded back with ``torch.distributed.checkpoint.load`` into preallocated
tensors, two ways in the same temp dir:

* ``plain``  -- DCP's ``FileSystemWriter`` / ``FileSystemReader`` (one file,
  fsync on, as by default);
* ``sealed`` -- :class:`sealstore.loaders.dcp.SealedStorageWriter` /
  ``SealedStorageReader`` into a file:// store (sealed, signed manifest,
  objects fsynced before the commit; on load every chunk authenticated and
  each object's digest checked).

One process, no process group (DCP's single-rank path: the same writer and
reader code every rank runs). ``--repeat`` rounds, the two ways alternating
which goes first; medians reported, and ratios as throughput (plain seconds /
sealed seconds: 1.0 is parity, higher is better for sealed). Writes a table
and ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.format_throughput import bench_keyring, parse_size, write_report

MIB = 1 << 20
MODES = ("plain", "sealed")


def make_state(size: int, tensor: int) -> dict[str, Any]:
    import torch

    n = max(1, size // tensor)
    g = torch.Generator().manual_seed(0)
    state: dict[str, Any] = {
        f"layer{i}.weight": torch.randn(tensor // 4, generator=g) for i in range(n)
    }
    state["step"] = 1
    return state


def zeros_like(state: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in state.items()}


def one_round(
    mode: str, state: dict[str, Any], tmp: Path, store: Any, step: int
) -> dict[str, float]:
    """Save then load *state* the *mode* way; seconds of each."""
    import torch
    import torch.distributed.checkpoint as dcp

    from sealstore.loaders.dcp import SealedStorageReader, SealedStorageWriter
    from sealstore.vault.lifecycle import shred

    target = zeros_like(state)
    if mode == "plain":
        path = tmp / f"plain-{step}"
        writer: Any = dcp.FileSystemWriter(path)
        reader: Any = dcp.FileSystemReader(path)
    else:
        writer = SealedStorageWriter(store, "bench", step, keys=["local:"])
        reader = SealedStorageReader(store, "bench", step)
    t0 = time.perf_counter()
    dcp.save(state, storage_writer=writer)
    t1 = time.perf_counter()
    dcp.load(target, storage_reader=reader)
    t2 = time.perf_counter()
    first = next(k for k in state if k != "step")
    assert torch.equal(target[first], state[first]) and target["step"] == state["step"]
    if mode == "plain":
        shutil.rmtree(path)
    else:
        shred(store, f"bench:{step}")  # deletes its objects: disk stays flat
    return {"save": t1 - t0, "load": t2 - t1}


def _rank(rank: int, world: int, tmp: str, args: tuple[int, int, int], out: str) -> None:
    """One rank of ``--world`` ranks: the state sharded by rows (DTensor ``Shard(0)``)."""
    import json

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from sealstore.loaders.dcp import SealedStorageReader, SealedStorageWriter
    from sealstore.vault.lifecycle import shred
    from sealstore.vault.store import Store

    warnings.filterwarnings("ignore", "torch.distributed is disabled")
    size, tensor, repeat = args
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    store = Store.open(f"file://{tmp}/store")
    local = make_state(size // world, tensor // world)
    step = local.pop("step")

    def sharded(zero: bool) -> dict[str, Any]:
        made = {
            k: DTensor.from_local(torch.zeros_like(v) if zero else v, mesh, [Shard(0)])
            for k, v in local.items()
        }
        return {**made, "step": 0 if zero else step}

    state = sharded(False)
    times: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for r in range(repeat + 1):  # round 0 warms up
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            if mode == "plain":
                writer: Any = dcp.FileSystemWriter(f"{tmp}/plain-{r}")
                reader: Any = dcp.FileSystemReader(f"{tmp}/plain-{r}")
            else:
                writer = SealedStorageWriter(store, "bench", r, keys=["local:"])
                reader = SealedStorageReader(store, "bench", r)
            target = sharded(True)
            dist.barrier()
            t0 = time.perf_counter()
            dcp.save(state, storage_writer=writer)
            dist.barrier()
            t1 = time.perf_counter()
            dcp.load(target, storage_reader=reader)
            dist.barrier()
            t2 = time.perf_counter()
            first = next(iter(local))
            assert torch.equal(target[first].to_local(), local[first])
            if r:
                times[mode].append({"save": t1 - t0, "load": t2 - t1})
            if rank == 0:
                if mode == "plain":
                    shutil.rmtree(f"{tmp}/plain-{r}")
                else:
                    shred(store, f"bench:{r}")
            dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("512MiB"))
    ap.add_argument("--tensor", type=parse_size, default=parse_size("16MiB"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="docs/perf/dcp_save_load.json")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--world", type=int, default=1, help="ranks (gloo, DTensor Shard(0))")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", "torch.distributed is disabled")
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as name:
        tmp = Path(name)
        bench_keyring(tmp / "home")
        from sealstore.vault.store import Store

        store = Store.init(f"file://{tmp}/store")
        if args.world > 1:
            import json

            import torch.multiprocessing as mp

            out = tmp / "times.json"
            task = (args.size, args.tensor, args.repeat)
            mp.spawn(_rank, args=(args.world, str(tmp), task, str(out)), nprocs=args.world)
            samples = json.loads(out.read_text())
            size = (args.size // args.tensor) * (args.tensor // args.world // 4) * 4 * args.world
        else:
            state = make_state(args.size, args.tensor)
            # Warm-up (imports, the BoM schema, the keyring unlock), not timed.
            one_round("plain", state, tmp, store, 0)
            one_round("sealed", state, tmp, store, 0)
            samples = {m: [] for m in MODES}
            for r in range(args.repeat):
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    samples[mode].append(one_round(mode, state, tmp, store, r + 1))
            size = sum(v.numel() * 4 for v in state.values() if hasattr(v, "numel"))
    results: dict[str, Any] = {"state_mib": round(size / MIB, 1)}
    for mode, got in samples.items():
        results[mode] = {
            "save_seconds": statistics.median(s["save"] for s in got),
            "load_seconds": statistics.median(s["load"] for s in got),
            "samples": got,
        }
    for op in ("save", "load"):
        plain, sealed = results["plain"][f"{op}_seconds"], results["sealed"][f"{op}_seconds"]
        results[f"{op}_throughput_ratio"] = plain / sealed
    print(f"{'mode':<8}{'save s':>9}{'save GB/s':>11}{'load s':>9}{'load GB/s':>11}")
    for mode in MODES:
        m = results[mode]
        print(
            f"{mode:<8}{m['save_seconds']:>9.2f}{size / m['save_seconds'] / 1e9:>11.2f}"
            f"{m['load_seconds']:>9.2f}{size / m['load_seconds'] / 1e9:>11.2f}"
        )
    print(
        f"sealed/plain throughput: save {results['save_throughput_ratio']:.2f}x, "
        f"load {results['load_throughput_ratio']:.2f}x (target >= 0.8x)"
    )
    report = {
        "benchmark": "dcp_save_load",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "size_bytes": size,
        "tensor_bytes": args.tensor,
        "repeat": args.repeat,
        "world": args.world,
        "note": (
            "a shared 2-core machine with other work running: medians of alternating "
            "rounds; one rank in one process (no process group), or --world ranks over "
            "gloo each holding its rows (timed from barrier to barrier); page cache warm "
            "for loads"
        ),
        "results": results,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
