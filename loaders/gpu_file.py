"""A sealed safetensors file opened for GPU-direct loads: header and tensors decrypted on a GPU.

``GpuFile`` holds one file's device state (``gpu.DeviceDecryptor``: key,
staging ring, scratch) from open to close, so a lazy ``safe_open`` pays for
it once, not per tensor. Nothing of the plaintext is decrypted on the host:
the safetensors header is decrypted on the device too, and only its own
bytes are copied back (the tensor bytes that share its chunks stay on the
device and are wiped). Every tensor is decrypted into its own storage, so
``load_state_dict`` of the result never holds the model twice.

On a CUDA machine the memory is :class:`TorchMemory`: every buffer from
torch's caching allocator, every kernel, copy and wipe on the stream current
when the file was opened. Calls from several threads take turns.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from sealstore.loaders.gpu import DeviceDecryptor, _cuda, check_device, check_suite
from sealstore.loaders.st_header import Layout
from sealstore.stream import SealedFile

__all__ = ["GpuFile", "TorchMemory"]


class TorchMemory:
    """Device buffers from torch's caching allocator, work on torch's current stream.

    numba launches on ``cuda.external_stream`` of torch's current stream, so
    a kernel writing a tensor is ordered after ``torch.empty`` made it, and
    torch's next use of the tensor is ordered after the kernel -- no event
    and no device-wide synchronize. (The stream is the one current when the
    file is opened; see :meth:`handoff`.) Wipes are memsets (``zero_``) on
    that same stream, never the caller's current one: they allocate nothing,
    so an OOM cannot stop one, and a buffer goes back to the allocator only
    after its wipe is queued where its last use was. numba's views and the
    stream are made in this device's context, so ``cuda:N`` with N > 0 is
    not run in device 0's.

    Args:
        device: ``"cuda[:N]"``.
    """

    def __init__(self, device: str) -> None:
        import torch

        check_device(device)
        self.cuda = _cuda()
        dev = torch.device(device)
        self.index = dev.index if dev.index is not None else torch.cuda.current_device()
        self.torch_device = torch.device("cuda", self.index)
        self._stream = torch.cuda.current_stream(self.torch_device)
        with self.device():  # numba's stream belongs to this device's context, not device 0's
            self.stream = self.cuda.external_stream(self._stream.cuda_stream)
        # id(numba array) -> (that array, the torch tensor behind it): the
        # decryptor's own buffers, alive until release().
        self._buffers: dict[int, tuple[Any, Any]] = {}
        self._pinned: list[Any] = []

    def tensor(self, nbytes: int) -> tuple[Any, Any]:
        """A new uint8 tensor on the device, and a numba view of it (None when empty)."""
        import torch

        with torch.cuda.stream(self._stream):  # made on the stream that will write it
            t = torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)
        if not nbytes:
            return t, None
        # sync=False: the tensor is used on the very stream it was made on. Not
        # kept in self._buffers: the caller's tensor must not outlive its use.
        with self.device():
            return t, self.cuda.as_cuda_array(t, sync=False)

    def empty(self, shape: Any, dtype: Any = np.uint8) -> Any:
        """An uninitialised device array from torch's allocator.

        Allocated as bytes and viewed as *dtype* by numba: torch's CUDA array
        interface does not export every unsigned type the kernels take.
        """
        import math

        import torch

        dt = np.dtype(dtype)
        count = math.prod(shape) if isinstance(shape, tuple) else int(shape)
        nbytes = max(1, count * dt.itemsize)
        with torch.cuda.stream(self._stream):  # its first and last use is on the file's stream
            t = torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)
        with self.device():
            arr = self.cuda.as_cuda_array(t, sync=False)[: count * dt.itemsize]
        if dt != np.uint8:
            arr = arr.view(dt)
        if isinstance(shape, tuple):
            arr = arr.reshape(shape)
        self._buffers[id(arr)] = (arr, t)
        return arr

    def pinned(self, n: int) -> np.ndarray:
        """A pinned host buffer from torch's pinned allocator (it only ever holds ciphertext)."""
        import torch

        t = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        self._pinned.append(t)
        return t.numpy()

    def wipe(self, arr: Any) -> None:
        """Zero *arr* on the file's stream: ``zero_`` of its tensor, or a memset of a view.

        Not on torch's current stream: after a switch (see :meth:`handoff`)
        that one is not ordered with the file's work, so a zeroing there could
        run late, into memory the allocator has given to a new tensor.
        """
        import torch

        held = self._buffers.get(id(arr))
        if held is not None and held[0] is arr:
            with torch.cuda.stream(self._stream):
                held[1].zero_()
            return
        from sealstore.loaders.gpu import _wipe

        with self.device():
            _wipe(self.cuda, arr, self.stream)

    def handoff(self, tensors: list[Any]) -> None:
        """Order the stream current now after the decryption of *tensors* (an event, no sync).

        The file's work stays on the stream that was current at open (its
        staging and scratch were allocated there); a caller that has since
        switched streams waits for it on the device, and its stream is
        recorded on each tensor so the allocator does not reuse one early.
        """
        import torch

        current = torch.cuda.current_stream(self.torch_device)
        if current != self._stream:
            current.wait_stream(self._stream)
            for t in tensors:
                t.record_stream(current)

    def device(self) -> Any:
        """numba's context for this device (torch's primary context)."""
        return self.cuda.gpus[self.index]

    def release(self) -> None:
        """Hand every buffer back to torch's caches."""
        self._buffers.clear()
        self._pinned.clear()


class _HeaderBytes:
    """The decrypted header, read by ``Layout`` like a sealed file (it knows the size)."""

    def __init__(self, data: bytes, size: int) -> None:
        self._data, self.size = data, size

    def read_range(self, offset: int, n: int) -> bytes:
        return self._data[offset : offset + n]


class GpuFile:
    """A sealed safetensors file whose header and tensors are decrypted on the GPU.

    Args:
        sf: the open sealed file (the caller closes it).
        device: ``"cuda[:N]"``.
        allow_table_aes: accept AES-256-GCM files (see ``gpu.check_suite``).
        memory: the device memory to use (default :class:`TorchMemory`; tests
            pass the simulator's).

    Raises:
        ValueError: AES-256-GCM without *allow_table_aes*, or a suite with no kernels.
        DeviceUnavailable: no CUDA device, or one that failed.
        AuthenticationError, FormatError: the header chunks (or the final chunk) fail.
    """

    def __init__(
        self,
        sf: SealedFile,
        device: str,
        *,
        allow_table_aes: bool = False,
        memory: Any = None,
        batch_bytes: int | None = None,
    ) -> None:
        check_suite(sf.header.suite, allow_table_aes)  # before the key goes anywhere
        self.sf = sf
        # One call at a time: a tensor's decryption and its handoff stay together,
        # and close waits for a load in flight (the decryptor has its own lock too).
        self._lock = threading.Lock()
        self.memory = memory if memory is not None else TorchMemory(device)
        kw = {} if batch_bytes is None else {"batch_bytes": batch_bytes}
        try:
            self._dec = DeviceDecryptor(sf, self.memory, **kw)  # wipes its own key if it fails
        except BaseException:
            # What it took from the memory before failing (key, tables, staging)
            # goes back now, not when this half-made object is collected.
            release = getattr(self.memory, "release", None)
            if release is not None:
                release()
            raise
        try:
            self.layout = Layout(_HeaderBytes(self._header(), sf.size))  # type: ignore[arg-type]
        except BaseException:
            self.close()
            raise

    def _bytes(self, start: int, end: int) -> Any:
        """Plaintext [start, end) decrypted into a new device tensor (start < end)."""
        cs = self.sf.layout.chunk_size
        with self._lock:
            t, arr = self.memory.tensor(end - start)
            self._dec.decrypt(start // cs, (end - 1) // cs, [(start, arr)])
            self._handoff([t])
        return t

    def _handoff(self, tensors: list[Any]) -> None:
        handoff = getattr(self.memory, "handoff", None)
        if handoff is not None:
            handoff(tensors)

    def _header(self) -> bytes:
        """The safetensors header (length prefix included), decrypted on the device.

        Only these bytes come back to the host; the tensor bytes that share
        their chunks stay in a device buffer, which is wiped.
        """
        import struct

        from sealstore.errors import FormatError
        from sealstore.loaders.st_header import MAX_HEADER

        size = self.sf.size
        if size < 8:
            self._dec.decrypt(0, 0, [])  # authenticate before saying anything about it
            raise FormatError("not a safetensors file: shorter than 8 bytes")
        # The first chunk is decrypted once, into a device buffer wiped after:
        # the length prefix and (usually) the whole header are copied out of it.
        first = self._bytes(0, min(size, self.sf.layout.chunk_size))
        try:
            (n,) = struct.unpack("<Q", self._to_host(first[:8]))
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(f"not a safetensors file: header length {n}")
            end = 8 + n
            if end <= first.shape[0]:
                return self._to_host(first[:end])
        finally:
            first.zero_()
        whole = self._bytes(0, end)  # a header longer than a chunk: its chunks once more
        try:
            return self._to_host(whole)
        finally:
            whole.zero_()

    @staticmethod
    def _to_host(t: Any) -> bytes:
        """The bytes of device tensor *t* on the host (header bytes only, never a tensor's)."""
        return t.cpu().numpy().tobytes()

    def tensor(self, start: int, end: int, dtype: Any, shape: list[int]) -> Any:
        """Plaintext [start, end) of the data region as a device tensor of *dtype* / *shape*."""
        base = self.layout.data_start
        if end == start:
            return self._empty(dtype, shape)
        return self._bytes(base + start, base + end).view(dtype).reshape(shape)

    def _empty(self, dtype: Any, shape: list[int]) -> Any:
        t, _ = self.memory.tensor(0)
        return t.view(dtype).reshape(shape)

    def tensors(self, entries: dict[str, tuple[Any, list[int], int, int]]) -> dict[str, Any]:
        """Every tensor of *entries* (name -> dtype, shape, start, end), each in its own storage.

        One pass over the chunks: each chunk is decrypted once, straight into
        the tensor it lies in, or through scratch when tensors share it.

        Raises:
            AuthenticationError: a chunk fails; every tensor is wiped, none returned.
        """
        base, cs = self.layout.data_start, self.sf.layout.chunk_size
        out, dests = {}, []
        with self._lock:
            for name, (dtype, shape, start, end) in entries.items():
                t, arr = self.memory.tensor(end - start)
                out[name] = (t, dtype, shape)
                if end > start:
                    dests.append((base + start, arr))
            if dests:
                first = dests[0][0] // cs
                last = (dests[-1][0] + dests[-1][1].shape[0] - 1) // cs
                self._dec.decrypt(first, last, dests)
            self._handoff([t for t, _, _ in out.values()])
        return {name: t.view(dtype).reshape(shape) for name, (t, dtype, shape) in out.items()}

    def close(self) -> None:
        """Wipe the device key and scratch and give the buffers back (the file stays open).

        Raises:
            DeviceUnavailable: the device failed and its key could not be wiped.
        """
        dec = getattr(self, "_dec", None)
        if dec is None:
            return
        with self._lock:  # after any load in flight, so its buffers are not released under it
            try:
                dec.close()
            finally:
                release = getattr(self.memory, "release", None)
                if release is not None:
                    release()

    def __enter__(self) -> GpuFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def opened(sf: SealedFile, device: str, allow_table_aes: bool) -> Iterator[GpuFile]:
    """A :class:`GpuFile` for one full load, closed (key wiped) after it."""
    g = GpuFile(sf, device, allow_table_aes=allow_table_aes)
    try:
        yield g
    finally:
        g.close()
