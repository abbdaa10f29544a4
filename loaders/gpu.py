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

import bisect
import contextlib
import threading
from typing import Any

import numpy as np

from sealstore.errors import AuthenticationError, DeviceUnavailable
from sealstore.format import TAG_SIZE as TAG
from sealstore.stream import SealedFile

__all__ = [
    "GPU_SUITES",
    "DeviceDecryptor",
    "DeviceUnavailable",
    "NumbaMemory",
    "check_device",
    "check_suite",
    "chunk_span",
    "decrypt_to_device",
    "normalize_device",
]

GPU_SUITES = ("AES-256-GCM", "CHACHA20-POLY1305")
BATCH_BYTES = 64 << 20  # plaintext per staging slot


def _cuda() -> Any:
    """``numba.cuda``, once the toolchain check finds the driver, device, NVVM and libdevice.

    Raises:
        CudaToolchainError (a DeviceUnavailable): one line naming what is missing.
    """
    from sealstore.native.cuda_toolchain import CudaToolchainError, require

    try:
        return require()
    except CudaToolchainError as exc:
        raise CudaToolchainError(
            f"{exc} (or pass prefer='cpu-decrypt' to decrypt on the CPU and copy)"
        ) from None


class NumbaMemory:
    """Device buffers from numba, on one numba stream: the primitive's (and the simulator's) memory.

    A loader uses ``sealstore.loaders.gpu_file.TorchMemory`` instead, which
    takes every buffer from torch's caching allocator and runs on torch's
    current stream. Both give the same small interface, so
    :class:`DeviceDecryptor` never allocates behind the caller's allocator.
    """

    def __init__(self, cuda: Any) -> None:
        self.cuda = cuda
        self.stream = cuda.stream()

    def empty(self, shape: Any, dtype: Any = np.uint8) -> Any:
        """An uninitialised device array."""
        return self.cuda.device_array(shape, dtype=dtype)

    def pinned(self, n: int) -> np.ndarray:
        """A page-locked host buffer of *n* bytes (it only ever holds ciphertext)."""
        return self.cuda.pinned_array(n, dtype=np.uint8)

    def wipe(self, arr: Any) -> None:
        """Zero *arr*, allocating nothing (see :func:`_wipe`).

        On the default stream, which numba's (blocking) stream is ordered with.
        """
        _wipe(self.cuda, arr)

    def device(self) -> Any:
        """The context to launch in (numba's current device)."""
        return contextlib.nullcontext()


class DeviceDecryptor:
    """One sealed file's device state: key, staging ring and scratch, kept until :meth:`close`.

    Everything a decryption needs on the device -- the key (and AES's derived
    tables), the AAD, the pinned staging ring, the device copies of the
    ciphertext, the nonces, the per-chunk flags and a scratch buffer -- is
    allocated once, from *memory*, and reused by every :meth:`decrypt`; a
    lazy ``safe_open`` pays for it once per file, not per tensor. All work is
    queued on ``memory.stream`` in order, so no device-wide synchronize is
    needed: the host waits on one event per staging slot (to refill it) and
    on the stream once per call (for the flags). One lock serialises
    :meth:`decrypt` and :meth:`close`: the staging ring, events, scratch and
    flags are shared by every call, so two threads (a parallel
    ``load_state_dict``, say) take turns rather than mix their batches.

    Args:
        sf: the open sealed file (its key is copied to the device and wiped on the host).
        memory: where buffers come from (:class:`NumbaMemory`, or torch's).
        batch_bytes: plaintext per staging slot.
        slots: staging slots (the host reads one while the device works on another).

    Raises:
        ValueError: a suite the GPU kernels do not implement.
    """

    def __init__(
        self, sf: SealedFile, memory: Any, *, batch_bytes: int = BATCH_BYTES, slots: int = 2
    ) -> None:
        suite = sf.header.suite
        if suite not in GPU_SUITES:
            raise ValueError(
                f"GPU-direct decryption of {suite} is not implemented (only "
                f"{', '.join(GPU_SUITES)}); pass prefer='cpu-decrypt'"
            )
        self.sf, self.memory, self.layout = sf, memory, sf.layout
        cs = self.layout.chunk_size
        self.per = max(1, min(batch_bytes // cs, self.layout.count))
        cuda = memory.cuda
        self._secrets: list[Any] = []  # device arrays holding key material
        self._closed = False
        self._lock = threading.Lock()
        key = sf.device_key()
        try:
            with memory.device():
                self._decrypt, self._order = _kernels(
                    cuda, suite, key, self._secrets, memory, self.per, cs, len(sf.preamble.aad)
                )
                aad = np.frombuffer(sf.preamble.aad, dtype=np.uint8)
                self._aad = memory.empty(max(1, aad.size))[: aad.size]
                if aad.size:
                    self._aad.copy_to_device(aad, stream=memory.stream)
                self._staging = [memory.pinned(self.per * (cs + TAG)) for _ in range(slots)]
                self._events = [cuda.event() for _ in range(slots)]
                self._d_ct = [memory.empty(self.per * (cs + TAG)) for _ in range(slots)]
                self._d_nonces = [memory.empty((self.per, 3), np.uint32) for _ in range(slots)]
                self._ok = memory.empty(self.layout.count)
                self._scratch = memory.empty(self.per * cs)
        except BaseException:
            self.close()
            raise
        finally:
            key[:] = bytes(len(key))

    def _jobs(self, first: int, last: int, dests: list[tuple[int, Any]]) -> list[tuple]:
        """Batches ``(start, count, target, at)``: *target* a dest array, or None for scratch.

        A run of chunks that lies wholly inside one destination is decrypted
        straight into it; a chunk a destination starts or ends in (or one no
        destination wants, like the final chunk checked for truncation) goes
        through the scratch buffer, and only the bytes a destination asks
        for are copied on.
        """
        layout, cs = self.layout, self.layout.chunk_size
        starts = [off for off, _ in dests]
        where = []  # per chunk: (dest index, offset in it) when it lies wholly inside one
        for i in range(first, last + 1):
            lo, hi = i * cs, i * cs + layout.plain_len(i)
            k = bisect.bisect_right(starts, lo) - 1  # the last destination starting at or before
            inside = k >= 0 and hi <= starts[k] + dests[k][1].shape[0]
            where.append((k, lo - starts[k]) if inside else None)
        jobs: list[tuple] = []
        for i, spot in zip(range(first, last + 1), where, strict=True):
            if jobs:
                start, count, target, at = jobs[-1]
                prev = where[i - 1 - first]
                same = (spot is None and prev is None) or (
                    spot is not None and prev is not None and spot[0] == prev[0]
                )
                if same and count < self.per:
                    jobs[-1] = (start, count + 1, target, at)
                    continue
            if spot is None:
                jobs.append((i, 1, None, 0))
            else:
                jobs.append((i, 1, dests[spot[0]][1], spot[1]))
        if last != layout.count - 1:
            # Truncation shows only in the final chunk: authenticate it too, on the device.
            jobs.append((layout.count - 1, 1, None, 0))
        return jobs

    def decrypt(self, first: int, last: int, dests: list[tuple[int, Any]]) -> None:
        """Decrypt chunks first..last; deliver plaintext ranges to *dests* on the device.

        Args:
            first: the first chunk; last: the last one (the final chunk is
                always authenticated too).
            dests: ``(plaintext offset, device uint8 array)`` pairs, each
                lying inside chunks first..last, not overlapping.

        Raises:
            IndexError: a chunk range or a destination out of bounds.
            AuthenticationError: a chunk failed; every destination is wiped.
            DeviceUnavailable: the device failed and could not even be wiped.
        """
        with self._lock:
            self._decrypt_locked(first, last, dests)

    def _decrypt_locked(self, first: int, last: int, dests: list[tuple[int, Any]]) -> None:
        """:meth:`decrypt`, with the lock held."""
        layout, cs = self.layout, self.layout.chunk_size
        if self._closed:
            raise ValueError("the device decryptor is closed")
        if not 0 <= first <= last < layout.count:
            raise IndexError("chunk range out of bounds")
        end = last * cs + layout.plain_len(last)
        for off, arr in dests:
            if not first * cs <= off <= off + arr.shape[0] <= end:
                raise IndexError("a destination lies outside the chunks decrypted")
        stream, used = self.memory.stream, 0
        dests = sorted(((off, arr) for off, arr in dests if arr.shape[0]), key=lambda d: d[0])
        jobs = self._jobs(first, last, dests)
        try:
            with self.memory.device():
                for k, (start, count, target, at) in enumerate(jobs):
                    slot = k % len(self._staging)
                    self._events[slot].synchronize()  # the slot's last copy has been read
                    n = self.sf.read_raw_chunks(start, count, self._staging[slot])
                    nonces = (
                        np.frombuffer(
                            b"".join(self.sf.chunk_nonce(i) for i in range(start, start + count)),
                            dtype=self._order,
                        )
                        .astype(np.uint32)
                        .reshape(count, 3)
                    )
                    self._d_nonces[slot][:count].copy_to_device(nonces, stream=stream)
                    ct = self._d_ct[slot][:n]
                    ct.copy_to_device(self._staging[slot][:n], stream=stream)
                    self._events[slot].record(stream)
                    last_len = layout.plain_len(start + count - 1)
                    size = (count - 1) * cs + last_len
                    out = self._scratch if target is None else target
                    at = 0 if target is None else at
                    self._decrypt(
                        self._d_nonces[slot][:count],
                        self._aad,
                        ct,
                        cs,
                        last_len,
                        out[at : at + size],
                        self._ok[start : start + count],
                        stream=stream,
                    )
                    if target is None:
                        used = max(used, size)
                        self._deliver(start * cs, size, dests, stream)
                flags = self._ok.copy_to_host(stream=stream)
                stream.synchronize()  # this stream only: torch's other work goes on
            for start, count, _, _ in jobs:
                bad = np.flatnonzero(flags[start : start + count] != 1)
                if bad.size:
                    raise AuthenticationError(
                        f"chunk {start + int(bad[0])} failed authentication on the device"
                    )
        except BaseException as exc:
            failed = self._wipe_all([arr for _, arr in dests] + [self._scratch[: max(used, 1)]])
            if failed is not None:
                raise _fault(failed) from exc
            raise
        if used:
            failed = self._wipe_all([self._scratch[:used]])
            if failed is not None:
                raise _fault(failed)

    def _deliver(self, base: int, size: int, dests: list[tuple[int, Any]], stream: Any) -> None:
        """Copy the scratch bytes (plaintext [base, base + size)) each destination wants."""
        for off, arr in dests:
            lo, hi = max(base, off), min(base + size, off + arr.shape[0])
            if lo < hi:
                arr[lo - off : hi - off].copy_to_device(
                    self._scratch[lo - base : hi - base], stream=stream
                )

    def _wipe_all(self, arrays: list[Any]) -> BaseException | None:
        """Wipe every array, going on past a failure; the first failure, or None."""
        failed = None
        for arr in arrays:
            try:
                self.memory.wipe(arr)
            except Exception as exc:  # a sticky CUDA error fails every later call
                failed = failed or exc
        return failed

    def close(self) -> None:
        """Wipe the device key material and scratch, and drop every buffer.

        Raises:
            DeviceUnavailable: the device failed and its key could not be wiped.
        """
        with self._lock:  # never while another thread's batch still uses the key
            self._close_locked()

    def _close_locked(self) -> None:
        """:meth:`close`, with the lock held."""
        if self._closed:
            return
        self._closed = True
        arrays = list(self._secrets)
        if getattr(self, "_scratch", None) is not None:
            arrays.append(self._scratch)
        failed = self._wipe_all(arrays)
        self._secrets.clear()
        self._staging = []
        if failed is not None:
            raise _fault(failed)

    def __enter__(self) -> DeviceDecryptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fault(exc: BaseException) -> DeviceUnavailable:
    """The one error a failed device gives: what failed, and that its memory was not wiped."""
    return DeviceUnavailable(
        f"the CUDA device failed ({type(exc).__name__}) and its buffers, the key among them, "
        "could not be wiped: the CUDA context is unusable, end this process to release them"
    )


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
    ``AuthenticationError`` raised. Buffers come from numba (a loader keeps a
    :class:`DeviceDecryptor` on torch's allocator instead). This primitive
    applies no suite policy: the loaders refuse table-based AES by default
    (:func:`check_suite`).

    Raises:
        DeviceUnavailable: no CUDA device (or simulator), or one that failed.
        ValueError: a suite the GPU kernels do not implement, or *out* too small.
        AuthenticationError: a chunk failed (out is wiped).
    """
    cuda = _cuda()
    layout = sf.layout
    if not 0 <= first <= last < layout.count:
        raise IndexError("chunk range out of bounds")
    need = (last - first) * layout.chunk_size + layout.plain_len(last)
    if out.shape[0] < need:
        raise ValueError(f"device buffer of {out.shape[0]} bytes is too small ({need} needed)")
    memory = NumbaMemory(cuda)
    with DeviceDecryptor(sf, memory, batch_bytes=batch_bytes, slots=slots) as dec:
        dec.decrypt(first, last, [(first * layout.chunk_size, out[:need])])


def _kernels(
    cuda: Any,
    suite: str,
    key: bytearray,
    secrets: list[Any],
    memory: Any = None,
    per: int = 1,
    chunk_size: int = 1,
    aad_len: int = 0,
) -> tuple[Any, str]:
    """The suite's batch decryptor with the key (and its derived tables) on the device.

    Returns ``(decrypt, nonce_dtype)``: ``decrypt(nonces, aad, ct, cs, last_len,
    out, ok, stream=)``, and how nonces are read as words (ChaCha20: little-endian,
    AES-GCM's counter block: big-endian). Every device array -- the key
    material, AES's tables and powers of H, the lane-sum scratch for batches of up to
    *per* chunks of *chunk_size* bytes with *aad_len* bytes of AAD -- comes from *memory* (numba's
    allocator when None), once: a batch allocates nothing. The arrays holding
    key material (and MAC state) are appended to *secrets* for the caller to wipe.
    """

    def place(host: np.ndarray) -> Any:
        if memory is None:
            return cuda.to_device(host)
        dev = memory.empty(host.shape, host.dtype)
        dev.copy_to_device(host, stream=memory.stream)
        return dev

    def upload(host: np.ndarray) -> Any:
        dev = place(host)
        secrets.append(dev)
        return dev

    if suite == "CHACHA20-POLY1305":
        from sealstore.native import cuda_chacha

        words = np.frombuffer(key, dtype="<u4").astype(np.uint32)
        try:
            d_key = upload(words)
            if memory is not None:
                memory.stream.synchronize()  # the copy has read *words*: now they can go
        finally:
            words[:] = 0
        if memory is None:
            sums = None  # decrypt_chunks allocates per batch: the one-shot primitive's way
        else:
            # The lane groups' sums, for the largest batch, from *memory* once: each
            # batch passes a view. MAC state, so wiped at close like the key.
            sums = memory.empty((per, cuda_chacha.lane_groups(chunk_size, aad_len), 5), np.uint64)
            secrets.append(sums)

        def chacha(nonces: Any, *args: Any, **kw: Any) -> None:
            view = None if sums is None else sums[: nonces.shape[0]]
            cuda_chacha.decrypt_chunks(d_key, nonces, *args, sums=view, **kw)

        return chacha, "<u4"
    from sealstore.native import aes, cuda_aes

    rk = aes.expand_key(np.frombuffer(key, dtype=np.uint8))
    h_tab = cuda_aes.h_tables(rk)
    try:
        d_rk, d_h = upload(rk), upload(h_tab)
        tables = tuple(place(t) for t in cuda_aes.host_tables())
        if memory is not None:
            memory.stream.synchronize()  # the copies have read the host arrays
    finally:
        rk[:] = 0
        h_tab[:] = 0

    if memory is None:
        powers = sums_gcm = None  # made per batch (and zeroed): the one-shot primitive's way
    else:
        # The powers of H for the loader's geometry, made on the device once, and the
        # groups' sums for the largest batch: key material and MAC state, wiped at close.
        groups = cuda_aes.lane_groups(chunk_size, aad_len)
        powers = memory.empty(cuda_aes.powers_shape(cuda_aes.TAG_THREADS, groups), np.uint64)
        secrets.append(powers)
        cuda_aes.ghash_powers(
            d_h, tables[2], cuda_aes.TAG_THREADS, groups, out=powers, stream=memory.stream
        )
        sums_gcm = memory.empty((per, groups, 2), np.uint64)
        secrets.append(sums_gcm)

    def gcm(nonces: Any, *args: Any, **kw: Any) -> None:
        view = None if sums_gcm is None else sums_gcm[: nonces.shape[0]]
        cuda_aes.decrypt_chunks(d_rk, d_h, tables, nonces, *args, powers=powers, sums=view, **kw)

    return gcm, ">u4"


def _wipe(cuda: Any, arr: Any, stream: Any = 0) -> None:
    """Zero a device array with a memset on *stream*: no allocation, so it works at an OOM.

    The simulator's arrays are host arrays, zeroed in place.
    """
    if arr.size == 0:
        return
    from numba import config

    if config.ENABLE_CUDASIM or not hasattr(arr, "device_ctypes_pointer"):
        arr[...] = 0
        return
    from numba.cuda.cudadrv.driver import device_memset

    device_memset(arr, 0, arr.size * arr.dtype.itemsize, stream=stream)


def check_suite(suite: str, allow_table_aes: bool) -> None:
    """Refuse GPU-direct AES-256-GCM unless *allow_table_aes*: the one place that policy lives.

    The device AES kernel looks its rounds up in tables in shared memory;
    which entries a block touches depends on key and data, and another
    tenant's kernel on the same GPU can time that (a cache-timing side
    channel). ChaCha20-Poly1305 is add-rotate-xor only: constant time.

    Raises:
        ValueError: AES-256-GCM without *allow_table_aes*.
    """
    if suite == "AES-256-GCM" and not allow_table_aes:
        raise ValueError(
            "GPU-direct AES-256-GCM uses table lookups a process sharing the GPU can time; "
            "seal with CHACHA20-POLY1305 for GPU loads, pass prefer='cpu-decrypt', or "
            "allow_table_aes=True to accept it"
        )


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
