#!/usr/bin/env python3
"""Loading a sealed state dict onto a CUDA device, one run on one device.

* ``plaintext``     -- ``safetensors.torch.load_file(path, device="cuda")`` of the plaintext;
* ``gpu_direct``    -- ``sealstore.loaders.load_file(sealed, device="cuda")``: ciphertext
  staged in pinned memory, authenticated and decrypted on the device;
* ``cpu_decrypt``   -- the same with ``prefer="cpu-decrypt"``: decrypted on the CPU, copied;
* ``kernel``        -- the ChaCha20-Poly1305 kernels alone, device memory to device
  memory (GB/s of plaintext), ``--kernel-mib`` of chunks, launched as the loader
  launches them (per 64 MiB batch, lane sums from torch's allocator once).

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
from benchmarks.load_cpu import make_state


def kernel_rate(
    mib: int,
    rounds: int,
    memory: Any,
    chunk_size: int = 1 << 20,
    batch_bytes: int | None = None,
    suite: str = "CHACHA20-POLY1305",
) -> list[float]:
    """GB/s of the suite's kernels over *mib* MiB of chunks already on the device.

    Called as the loader calls them: ``gpu._kernels`` with the loader's
    *memory* (``TorchMemory``: the key, AES's powers of H and the lane sums
    from torch's allocator, once), one launch sequence per batch of
    ``BATCH_BYTES`` of chunks, each passing its view of the one lane-sum
    buffer. Only the file reads and the staging copies are left out.
    """
    import numpy as np
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    from sealstore.loaders import gpu

    cuda, cs = memory.cuda, chunk_size
    count = max(1, (mib << 20) // cs)
    per = max(1, min((batch_bytes or gpu.BATCH_BYTES) // cs, count))
    key, aad = os.urandom(32), os.urandom(32)
    nonces = [os.urandom(12) for _ in range(count)]
    chunk = os.urandom(cs)
    aead = AESGCM(key) if suite == "AES-256-GCM" else ChaCha20Poly1305(key)
    ct = b"".join(aead.encrypt(n, chunk, aad) for n in nonces)
    secrets: list[Any] = []
    with memory.device():
        decrypt, order = gpu._kernels(
            cuda, suite, bytearray(key), secrets, memory, per, cs, len(aad)
        )
        d_ct = cuda.to_device(np.frombuffer(ct, dtype=np.uint8))
        d_nonces = cuda.to_device(
            np.frombuffer(b"".join(nonces), dtype=order).astype(np.uint32).reshape(count, 3)
        )
        d_aad = cuda.to_device(np.frombuffer(aad, dtype=np.uint8))
        out = cuda.device_array(count * cs, dtype=np.uint8)
        ok = cuda.device_array(count, dtype=np.uint8)
    stream = memory.stream

    def batches() -> None:
        with memory.device():
            for s in range(0, count, per):
                n = min(per, count - s)
                src = d_ct[s * (cs + 16) : (s + n) * (cs + 16)]
                dst = out[s * cs : (s + n) * cs]
                decrypt(d_nonces[s : s + n], d_aad, src, cs, cs, dst, ok[s : s + n], stream=stream)
            stream.synchronize()

    batches()  # compile, warm
    assert (ok.copy_to_host() == 1).all()
    assert out[:cs].copy_to_host().tobytes() == chunk
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        batches()
        rates.append(count * cs / (time.perf_counter() - t) / 1e9)
    for arr in secrets:
        memory.wipe(arr)
    return rates


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

        kernel = kernel_rate(args.kernel_mib, args.repeat, TorchMemory(dev))
        kernel_aes = kernel_rate(
            args.kernel_mib, args.repeat, TorchMemory(dev), suite="AES-256-GCM"
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
