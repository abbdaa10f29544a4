"""On a CUDA device: GPU-direct loads against plaintext ``load_file(device=...)``; the kernels.

* ``plaintext``   -- ``safetensors.torch.load_file(path, device=...)``;
* ``gpu_direct``  -- ``sealstore.loaders.load_file(sealed, device=...)``: ciphertext
  staged in pinned memory, authenticated and decrypted on the device;
* ``cpu_decrypt`` -- the same with ``prefer="cpu-decrypt"`` (decrypt, then copy);
* ``kernel``      -- the suite's decrypt kernels alone, device memory to device
  memory, launched as the loader launches them (:func:`kernel_rate`).

The loads need torch with CUDA; the kernel runs in numba's CUDA simulator too
(``NUMBA_ENABLE_CUDASIM=1``), where its figure says only that the code runs.
``benchmarks/gpu_load.py`` times the same things.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["kernel_rate", "simulator", "torch_cuda"]


def simulator() -> bool:
    """Whether numba's CUDA simulator stands in for a device in this process."""
    if "numba" not in sys.modules:  # numba reads the variable when it is first imported
        return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)


def driver_present() -> bool:
    """Whether an NVIDIA driver shows here at all: no need to import torch to hear "no"."""
    return (
        Path("/proc/driver/nvidia/version").exists()
        or Path("/dev/dxg").exists()  # WSL's GPU
        or any(Path("/dev").glob("nvidia[0-9]*"))
    )


def torch_cuda() -> bool:
    """Whether torch is installed and sees a CUDA device (no driver or no torch: False)."""
    if not driver_present():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def device_name(device: str) -> str | None:
    if not torch_cuda():
        return "numba CUDA simulator" if simulator() else None
    import torch

    return str(torch.cuda.get_device_name(torch.device(device)))


def kernel_rate(
    nbytes: int,
    rounds: int,
    memory: Any,
    *,
    chunk_size: int = 1 << 20,
    batch_bytes: int | None = None,
    suite: str = "CHACHA20-POLY1305",
) -> list[float]:
    """GB/s of the suite's kernels over *nbytes* of chunks already on the device, per round.

    Called as the loader calls them: ``gpu._kernels`` with the loader's
    *memory* (``TorchMemory``, or ``NumbaMemory`` where torch has no device:
    the simulator), one launch sequence per batch of ``BATCH_BYTES`` of
    chunks. Only the file reads and the staging copies are left out. The
    first batch (compile, warm-up) is checked for the plaintext and every
    tag's verdict, untimed.
    """
    import numpy as np
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    from sealstore.loaders import gpu

    cuda, cs = memory.cuda, chunk_size
    count = max(1, nbytes // cs)
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

    try:
        batches()  # compile, warm
        if not (ok.copy_to_host() == 1).all() or out[:cs].copy_to_host().tobytes() != chunk:
            raise RuntimeError(f"the {suite} kernels did not give back the plaintext")
        rates = []
        for _ in range(rounds):
            t = time.perf_counter()
            batches()
            rates.append(count * cs / (time.perf_counter() - t) / 1e9)
    finally:
        for arr in secrets:
            memory.wipe(arr)
    return rates


def kernel_memory(device: str) -> Any:
    """The loader's memory on *device* (torch's allocator), or numba's under the simulator."""
    if torch_cuda():
        from sealstore.loaders.gpu_file import TorchMemory

        return TorchMemory(device)
    from sealstore.loaders.gpu import NumbaMemory, _cuda

    return NumbaMemory(_cuda())


def synchronize() -> None:
    import torch

    torch.cuda.synchronize()


def empty_cache() -> None:
    import torch

    torch.cuda.empty_cache()
