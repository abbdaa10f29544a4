#!/usr/bin/env python3
"""Loading a sealed state dict onto a CUDA device, one run on one device.

* ``plaintext``     -- ``safetensors.torch.load_file(path, device="cuda")`` of the plaintext;
* ``gpu_direct``    -- ``sealstore.loaders.load_file(sealed, device="cuda")``: ciphertext
  staged in pinned memory, authenticated and decrypted on the device;
* ``cpu_decrypt``   -- the same with ``prefer="cpu-decrypt"``: decrypted on the CPU, copied;
* ``kernel``        -- the ChaCha20-Poly1305 kernels alone, device memory to device
  memory (GB/s of plaintext), ``--kernel-mib`` of chunks, launched as the loader
  launches them (per 64 MiB batch, lane sums from torch's allocator once):
  ``sealstore.bench.gpu.kernel_rate``, as ``sealstore bench`` times it.

The sealed file uses ChaCha20-Poly1305 (``--suite`` to change; the GPU has
kernels for both suites). Loads are interleaved in rounds, ``torch.cuda.synchronize()`` before every
clock read; medians. Targets (issue 6, on an H100): the kernel >= 200 GB/s;
GPU-direct end to end >= 0.9x the plaintext load. Needs a CUDA GPU with torch
and numba-cuda; without one it says so and exits 2.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.format_throughput import parse_size, write_report
from sealstore.bench.gpu import kernel_rate
from sealstore.bench.tensors import make_state


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--kernel-mib", type=int, default=1024)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--suite", default="CHACHA20-POLY1305")
    ap.add_argument("--out", default="benchmarks/results/gpu_load.json")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_load: torch sees no CUDA device; the GPU figures need a GPU machine")
        return 2
    from nacl import pwhash
    from safetensors.torch import load_file as st_load
    from safetensors.torch import save_file as st_save

    from sealstore.kms.envelope import seal_file
    from sealstore.kms.local import create_keyring
    from sealstore.loaders import load_file

    tmp = Path(tempfile.mkdtemp(prefix="sealstore-gpu-"))
    os.environ["SEALSTORE_HOME"] = str(tmp / "home")
    os.environ.setdefault("SEALSTORE_PASSPHRASE", "benchmark")
    create_keyring(
        tmp / "home" / "keyring.json",
        opslimit=pwhash.argon2id.OPSLIMIT_MIN,
        memlimit=pwhash.argon2id.MEMLIMIT_MIN,
    )
    dev = args.device
    samples: dict[str, list[float]] = {"plaintext": [], "gpu_direct": [], "cpu_decrypt": []}
    try:
        state = make_state(parse_size(args.size))
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        plain, sealed = tmp / "m.safetensors", tmp / "m.safetensors.seal"
        st_save(state, plain)
        seal_file(plain, sealed, ["local:"], suite=args.suite, threads=4)
        del state
        loads = {
            "plaintext": lambda: st_load(plain, device=dev),
            "gpu_direct": lambda: load_file(sealed, device=dev),
            "cpu_decrypt": lambda: load_file(sealed, device=dev, prefer="cpu-decrypt"),
        }
        ref, got = st_load(plain, device=dev), load_file(sealed, device=dev)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
        del ref, got
        for _ in range(args.repeat):
            for name, fn in loads.items():
                torch.cuda.synchronize()
                t = time.perf_counter()
                result = fn()
                torch.cuda.synchronize()
                samples[name].append(time.perf_counter() - t)
                del result
                torch.cuda.empty_cache()
        from sealstore.loaders.gpu_file import TorchMemory

        kernel = kernel_rate(args.kernel_mib << 20, args.repeat, TorchMemory(dev))
        kernel_aes = kernel_rate(
            args.kernel_mib << 20, args.repeat, TorchMemory(dev), suite="AES-256-GCM"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    report: dict[str, Any] = {
        "benchmark": "gpu_load",
        "device": torch.cuda.get_device_name(torch.device(dev)),
        "bytes": nbytes,
        "repeat": args.repeat,
        "median_s": med,
        "GBps": {k: nbytes / v / 1e9 for k, v in med.items()},
        "kernel_GBps_median": statistics.median(kernel),
        "kernel_aes_GBps_median": statistics.median(kernel_aes),
        "gpu_direct_vs_plaintext_speed": med["plaintext"] / med["gpu_direct"],
        "targets": "kernel >= 200 GB/s; gpu_direct >= 0.9x plaintext (H100)",
        "raw": {**samples, "kernel_GBps": kernel, "kernel_aes_GBps": kernel_aes},
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
    }
    for k, v in med.items():
        print(f"{k:12} {v * 1e3:9.1f} ms  {nbytes / v / 1e9:6.2f} GB/s")
    print(f"kernel       {report['kernel_GBps_median']:9.1f} GB/s (target >= 200)")
    print(f"kernel (AES) {report['kernel_aes_GBps_median']:9.1f} GB/s (table-driven)")
    print(f"GPU-direct speed / plaintext: {report['gpu_direct_vs_plaintext_speed']:.2f} (>= 0.9)")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
