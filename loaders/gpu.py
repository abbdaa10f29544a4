"""GPU-direct decryption: ciphertext to the device, plaintext only ever in device memory.

The path (``decrypt_to_device``): the sealed bytes of a batch of chunks are
read from the file into a pinned host staging buffer (a ring of two), copied
to the device asynchronously on that slot's CUDA stream, and the kernels of
``sealstore.native.cuda_chacha`` authenticate and decrypt them there,
straight into the output buffer. While the device works on one slot, the
host reads the next batch into the other. Host memory only ever holds
ciphertext; a chunk whose tag fails is zeroed on the device, and then the
whole output is wiped and the load fails.

Both suites decrypt on the GPU (``sealstore.native.cuda_chacha`` and
``cuda_aes``); ``load_file(..., prefer="cpu-decrypt")`` decrypts on the CPU
and copies instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sealstore.errors import AuthenticationError, SealstoreError
from sealstore.stream import SealedFile

__all__ = [
    "GPU_SUITES",
    "DeviceUnavailable",
    "chunk_span",
    "decrypt_to_device",
    "normalize_device",
    "read_to_cuda",
]

GPU_SUITES = ("AES-256-GCM", "CHACHA20-POLY1305")
BATCH_BYTES = 64 << 20  # plaintext per staging slot


class DeviceUnavailable(SealstoreError):
    """A CUDA device was asked for and cannot be used."""


def _cuda() -> Any:
    try:
        from numba import cuda
    except ImportError as exc:  # pragma: no cover - numba is a core dependency
        raise DeviceUnavailable(f"numba.cuda cannot be imported: {exc}") from None
    if not cuda.is_available():
        raise DeviceUnavailable(
            "no CUDA device is available to numba (pass prefer='cpu-decrypt' to decrypt "
            "on the CPU and copy)"
        )
    return cuda


def decrypt_to_device(
    sf: SealedFile,
    first: int,
    last: int,
    out: Any,
    *,
    batch_bytes: int = BATCH_BYTES,
    slots: int = 2,
) -> None:
    """Decrypt chunks first..last of *sf* into the device array *out* (uint8).

    Chunk i lands at ``out[(i - first) * chunk_size]``. Every chunk is
    authenticated on the device; on any failure *out* is zeroed and
    ``AuthenticationError`` raised.

    Raises:
        DeviceUnavailable: no CUDA device (or simulator).
        ValueError: a suite the GPU kernels do not implement, or *out* too small.
        AuthenticationError: a chunk failed (out is wiped).
    """
    cuda = _cuda()
    suite = sf.header.suite
    if suite not in GPU_SUITES:
        raise ValueError(
            f"GPU-direct decryption of {suite} is not implemented (only "
            f"{', '.join(GPU_SUITES)}); pass prefer='cpu-decrypt'"
        )
    layout = sf.layout
    cs = layout.chunk_size
    if not 0 <= first <= last < layout.count:
        raise IndexError("chunk range out of bounds")
    need = (last - first) * cs + layout.plain_len(last)
    if out.shape[0] < need:
        raise ValueError(f"device buffer of {out.shape[0]} bytes is too small ({need} needed)")
    per = max(1, min(batch_bytes // cs, last - first + 1))
    key = sf.device_key()
    secrets: list[Any] = []  # device arrays holding key material, wiped at the end
    scratch = None
    try:
        decrypt_chunks, nonce_order = _kernels(cuda, suite, key, secrets)
        d_aad = cuda.to_device(np.frombuffer(sf.preamble.aad, dtype=np.uint8).copy())
        streams = [cuda.stream() for _ in range(slots)]
        staging = [cuda.pinned_array(per * (cs + 16), dtype=np.uint8) for _ in range(slots)]
        d_ct = [cuda.device_array(per * (cs + 16), dtype=np.uint8) for _ in range(slots)]
        d_nonces = [cuda.device_array((per, 3), dtype=np.uint32) for _ in range(slots)]
        jobs = [(start, min(per, last + 1 - start), out, (start - first) * cs)
                for start in range(first, last + 1, per)]  # fmt: skip
        if last != layout.count - 1:
            # Truncation shows only in the final chunk: authenticate it too,
            # on the device, into scratch that is wiped afterwards.
            final = layout.count - 1
            scratch = cuda.device_array(layout.plain_len(final) or 1, np.uint8)
            jobs.append((final, 1, scratch, 0))
        d_ok = cuda.device_array(len(jobs) * per, dtype=np.uint8)
        for k, (start, count, dest, dst) in enumerate(jobs):
            slot, stream = k % slots, streams[k % slots]
            stream.synchronize()  # the slot's previous batch has been consumed
            n = sf.read_raw_chunks(start, count, staging[slot])
            nonces = np.frombuffer(
                b"".join(sf.chunk_nonce(i) for i in range(start, start + count)), dtype=nonce_order
            ).astype(np.uint32).reshape(count, 3)  # fmt: skip
            d_nonces[slot][:count].copy_to_device(nonces, stream=stream)
            ct = d_ct[slot][:n]
            ct.copy_to_device(staging[slot][:n], stream=stream)
            last_len = layout.plain_len(start + count - 1)
            size = (count - 1) * cs + last_len
            ok = d_ok[k * per : k * per + count]
            decrypt_chunks(d_nonces[slot][:count], d_aad, ct, cs, last_len,
                           dest[dst : dst + size], ok, stream=stream)  # fmt: skip
        cuda.synchronize()
        flags = d_ok.copy_to_host()
        for k, (start, count, _, _) in enumerate(jobs):
            bad = np.flatnonzero(flags[k * per : k * per + count] != 1)
            if bad.size:
                raise AuthenticationError(
                    f"chunk {start + int(bad[0])} failed authentication on the device"
                )
    except BaseException:
        _wipe(cuda, out)
        raise
    finally:
        key[:] = bytes(len(key))
        for buf in [scratch, *secrets]:
            if buf is not None:
                _wipe(cuda, buf)


def _kernels(cuda: Any, suite: str, key: bytearray, secrets: list[Any]) -> tuple[Any, str]:
    """The suite's batch decryptor with the key (and its derived tables) on the device.

    Returns ``(decrypt, nonce_dtype)``: ``decrypt(nonces, aad, ct, cs, last_len,
    out, ok, stream=)``, and how nonces are read as words (ChaCha20: little-endian,
    AES-GCM's counter block: big-endian). The device arrays holding key
    material are appended to *secrets* for the caller to wipe.
    """
    if suite == "CHACHA20-POLY1305":
        from sealstore.native import cuda_chacha

        words = np.frombuffer(key, dtype="<u4").astype(np.uint32)
        d_key = cuda.to_device(words)
        words[:] = 0
        secrets.append(d_key)

        def chacha(*args: Any, **kw: Any) -> None:
            cuda_chacha.decrypt_chunks(d_key, *args, **kw)

        return chacha, "<u4"
    from sealstore.native import aes, cuda_aes

    rk = aes.expand_key(np.frombuffer(key, dtype=np.uint8))
    h_tab = cuda_aes.h_tables(rk)
    d_rk, d_h = cuda.to_device(rk), cuda.to_device(h_tab)
    rk[:] = 0
    h_tab[:] = 0
    secrets.extend([d_rk, d_h])
    tables = cuda_aes.device_tables()

    def gcm(*args: Any, **kw: Any) -> None:
        cuda_aes.decrypt_chunks(d_rk, d_h, tables, *args, **kw)

    return gcm, ">u4"


def _wipe(cuda: Any, arr: Any) -> None:
    """Zero a device array: small key arrays whole, byte buffers in BATCH_BYTES pieces."""
    if arr.dtype != np.uint8 or arr.ndim != 1:
        arr.copy_to_device(np.zeros(arr.shape, dtype=arr.dtype))
    else:
        zeros = cuda.to_device(np.zeros(max(1, min(arr.shape[0], BATCH_BYTES)), dtype=np.uint8))
        for i in range(0, arr.shape[0], zeros.shape[0]):
            n = min(zeros.shape[0], arr.shape[0] - i)
            arr[i : i + n].copy_to_device(zeros[:n])
    cuda.synchronize()


def normalize_device(device: Any) -> str:
    """*device* as a string: the int ``N`` means ``"cuda:N"``, as in safetensors and torch.

    So ``device=0`` takes the GPU path (and its checks) like ``"cuda:0"``,
    never a silent CPU decryption. A ``torch.device`` is accepted too.

    Raises:
        TypeError: not a str, int or torch.device (a bool is refused).
        ValueError: a negative device index.
    """
    if isinstance(device, bool):
        raise TypeError(f"device must be a string or a CUDA index, not {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"device index must be >= 0, not {device}")
        return f"cuda:{device}"
    # torch.device by its type name: this module must not import torch to route a str.
    if isinstance(device, str) or type(device).__name__ == "device":
        return str(device)
    raise TypeError(f"device must be a string or a CUDA index, not {type(device).__name__}")


def check_device(device: str) -> None:
    """Refuse a CUDA *device* torch cannot use, with a message that says what to do.

    Raises:
        DeviceUnavailable: torch has no CUDA (a CPU build, or no GPU visible).
    """
    import torch

    if not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"device {device!r} was asked for, but torch {torch.__version__} sees no CUDA "
            "device; load with device='cpu'"
        )


def chunk_span(layout: Any, start: int, end: int) -> tuple[int, int, int, int]:
    """The chunks plaintext bytes [start, end) lie in: ``(first, last, nbytes, base)``.

    Decrypting chunks first..last gives *nbytes* bytes, in which byte *start*
    sits at *base*. An empty range still names one chunk (the one *start* is
    in, or the last), so the caller always has something to authenticate.
    """
    if not 0 <= start <= end <= layout.plaintext_size:
        raise IndexError(f"plaintext range [{start}, {end}) out of bounds")
    cs = layout.chunk_size
    first = min(start // cs, layout.count - 1)
    last = max(first, (end - 1) // cs)
    return first, last, (last - first) * cs + layout.plain_len(last), start - first * cs


def read_to_cuda(sf: SealedFile, start: int, end: int, device: str) -> Any:
    """Plaintext bytes [start, end) of *sf* as a uint8 tensor on *device*, decrypted there.

    Only the chunks the range covers (and the final chunk, for truncation)
    are read. The result is a view into a buffer of whole chunks.
    """
    import torch

    check_device(device)
    cuda = _cuda()
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    first, last, nbytes, base = chunk_span(sf.layout, start, end)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", index))
    with cuda.gpus[index]:
        decrypt_to_device(sf, first, last, cuda.as_cuda_array(buf))
    return buf[base : base + end - start]


def as_tensor(raw: Any, dtype: Any, shape: list[int]) -> Any:
    """View the uint8 tensor *raw* as *dtype* / *shape*, cloning it first if it is unaligned."""
    if raw.data_ptr() % dtype.itemsize:
        raw = raw.clone()  # a header length that leaves the tensor unaligned
    return raw.view(dtype).reshape(shape)


def load_to_cuda(sf: SealedFile, entries: dict[str, Any], data_start: int, device: str) -> dict:
    """The tensors of a sealed safetensors file, decrypted on the GPU (see module doc).

    One device buffer holds the decrypted chunks; the tensors are views into
    it (a GPU load keeps its weights together; a CPU load gives each tensor
    its own storage).
    """
    import torch

    check_device(device)
    if not entries:
        return {}
    if data_start >= sf.layout.plaintext_size:  # only empty tensors
        return {name: torch.empty(shape, dtype=dtype, device=torch.device(device))
                for name, (dtype, shape, _, _) in entries.items()}  # fmt: skip
    data = read_to_cuda(sf, data_start, sf.layout.plaintext_size, device)
    return {name: as_tensor(data[start:end], dtype, shape)
            for name, (dtype, shape, start, end) in entries.items()}  # fmt: skip
