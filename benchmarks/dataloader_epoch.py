#!/usr/bin/env python3
"""A DataLoader epoch over sealed shards vs the same shards in plaintext (samples/s).

webdataset-style tar shards (``--shards`` of them, ``--size`` bytes in all;
each sample a ``.bin`` payload of ``--sample`` bytes and a small ``.json``)
are written to a temp dir, and each is sealed beside it (1 MiB chunks,
``local:`` key). Both are read through :class:`sealstore.loaders.SealedShards`
(``decode="tar"``, shuffled, a window of 4 shards): the sealed ones through
``sealstore.open`` (every byte authenticated), the plaintext ones through a
subclass whose ``open_shard`` opens the plain file -- so the order, the
decoding and the DataLoader (``--workers`` fork workers, ``--batch``) are the
same and only the bytes' source differs.

``--repeat`` epochs of each, alternating which goes first, page cache warm,
a new epoch (``set_epoch``) each time; medians reported. Writes a table and
``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.format_throughput import parse_size, write_report

MIB = 1 << 20


def build(root: Path, size: int, shards: int, sample: int) -> tuple[list[str], list[str], int]:
    import numpy as np

    import sealstore
    from tests.conftest import make_keyring

    home = root / "home"
    home.mkdir()
    os.environ["SEALSTORE_HOME"] = str(home)
    os.environ.setdefault("SEALSTORE_PASSPHRASE", "benchmark")
    make_keyring(home / "keyring.json")
    per_shard = max(1, size // shards // sample)
    rng = np.random.default_rng(0)
    plain, sealed = [], []
    for s in range(shards):
        p = root / f"shard-{s:04d}.tar"
        with tarfile.open(p, "w") as tar:
            for i in range(per_shard):
                key = f"{s:04d}{i:06d}"
                members = (("bin", rng.bytes(sample)), ("json", json.dumps({"i": i}).encode()))
                for ext, data in members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sealstore.seal_file(p, root / f"{p.name}.seal", ["local:"])
        plain.append(str(p))
        sealed.append(str(root / f"{p.name}.seal"))
    return plain, sealed, per_shard * shards


def _shards_class() -> Any:
    from sealstore.loaders import SealedShards

    class PlainShards(SealedShards):
        """The same dataset over plaintext files (the baseline)."""

        def open_shard(self, i: int) -> BinaryIO:
            return open(self.shards[i], "rb")

    return SealedShards, PlainShards


def epoch(ds: Any, n: int, workers: int, batch: int) -> float:
    """Seconds for one epoch of *ds* through a DataLoader (checks every sample came)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=batch, num_workers=workers, multiprocessing_context="fork")
    t = time.perf_counter()
    got = sum(len(b["__key__"]) for b in loader)
    took = time.perf_counter() - t
    if got != n:
        raise SystemExit(f"an epoch gave {got} samples, not {n}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("256MiB"))
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--sample", type=parse_size, default=parse_size("16KiB"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="docs/perf/dataloader_epoch.json")
    args = ap.parse_args()

    import torch

    sealed_cls, plain_cls = _shards_class()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dataloader-epoch-") as tmp:
        t0 = time.perf_counter()
        plain, sealed, n = build(Path(tmp), args.size, args.shards, args.sample)
        print(f"built {args.shards} shards, {n} samples, in {time.perf_counter() - t0:.1f} s")
        options = {"decode": "tar", "batch_size": args.batch, "seed": 0}
        cases = {"plain": plain_cls(plain, **options), "sealed": sealed_cls(sealed, **options)}
        for ds in cases.values():
            epoch(ds, n, args.workers, args.batch)  # warm-up: page cache, imports
        samples: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for r in range(args.repeat):
            for name in names[r % 2 :] + names[: r % 2]:
                cases[name].set_epoch(r + 1)
                samples[name].append(epoch(cases[name], n, args.workers, args.batch))

    med = {name: statistics.median(s) for name, s in samples.items()}
    rate = {name: n / med[name] for name in cases}
    ratio = rate["sealed"] / rate["plain"]
    print(f"{'case':<8} {'median s':>9} {'samples/s':>11} {'MiB/s':>8}")
    for name in cases:
        mib = rate[name] * args.sample / MIB
        print(f"{name:<8} {med[name]:>9.3f} {rate[name]:>11.0f} {mib:>8.1f}")
    print(f"sealed_vs_plain {ratio:.2f}x")
    write_report(
        args.out,
        {
            "benchmark": "dataloader_epoch",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "note": "shared 2-core machine, others working: medians of --repeat epochs of each, "
            "alternating which goes first; page cache warm; fork workers; tar shards decoded "
            "whole by SealedShards(decode='tar'), sealed read through sealstore.open",
            "load_average_before_after": [load_before, os.getloadavg()],
            "size_bytes": args.size,
            "shards": args.shards,
            "samples_per_epoch": n,
            "sample_bytes": args.sample,
            "workers": args.workers,
            "batch_size": args.batch,
            "repeat": args.repeat,
            "median_seconds": med,
            "samples_per_s": rate,
            "ratios": {"sealed_vs_plain": ratio},
            "samples": samples,
        },
    )


if __name__ == "__main__":
    main()
