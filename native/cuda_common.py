"""What the CUDA ChaCha20-Poly1305 and AES-GCM kernels share: how a batch of chunks is cut up.

Both take chunks laid out as in the file (chunk c's ciphertext at
``c * (chunk_size + 16)``, its tag after it, its plaintext going to
``c * chunk_size``); both deal each chunk's MAC input out to lanes over a
grid of (chunks x groups) CUDA blocks (``segments``, ``lane_groups``), check
the tags one thread a chunk, and then run a keystream kernel over pieces of
*width* bytes (``piece``, ``xor_grid``).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

__all__ = [
    "check_tag_threads",
    "lane_block",
    "lane_groups",
    "piece",
    "segments",
    "word_wise",
    "words",
    "xor_grid",
    "zero",
]


def check_tag_threads(tag_threads: int, most: int) -> None:
    if not 1 <= tag_threads <= most:
        raise ValueError(f"tag_threads must be 1..{most}")


def lane_groups(chunk_size: int, aad_len: int, tag_threads: int, rows: int, most: int) -> int:
    """CUDA blocks of *tag_threads* MAC lanes per chunk: about *rows* 16-byte blocks a lane.

    Enough blocks that a 64 MiB batch of 1 MiB chunks fills every SM of an
    H100/H200 (one block a chunk left half of them idle), at most *most*.
    """
    blocks = (aad_len + 15) // 16 + (chunk_size + 15) // 16 + 1
    return max(1, min(most, blocks // (tag_threads * rows)))


def words(arr: object) -> object:
    """A uint8 device array's whole 32-bit words as a uint32 view (same memory, no copy).

    The kernels read and write through it where an offset is 4-byte aligned
    (one load instead of four; the bytes past the last whole word, and any
    unaligned layout, go byte by byte through the uint8 array). An array
    that starts at an unaligned address gets an empty view.
    """
    n = arr.shape[0]  # type: ignore[attr-defined]
    if _address(arr) % 4:
        # A view at an unaligned address would fault on the device (a sticky CUDA
        # error): no words at all, so every access takes the byte path.
        return arr[:0].view(np.uint32)  # type: ignore[index]
    return arr[: n - n % 4].view(np.uint32)  # type: ignore[index]


def _address(arr: object) -> int:
    """The array's first byte's address (the simulator's arrays are numpy's); 1 if unknown."""
    for name in ("__cuda_array_interface__", "__array_interface__"):
        try:
            return int(getattr(arr, name)["data"][0])
        except AttributeError:
            continue
    return 1


def xor_grid(count: int, chunk_size: int, width: int, threads: int, most: int = 0) -> int:
    """CUDA blocks of *threads* for one thread per *width*-byte piece of every chunk.

    *most* > 0 caps the grid: a kernel that loops over its pieces with the
    grid's stride (the AES XOR, which stages its tables once per CUDA block)
    then gives each thread several.
    """
    pieces = count * ((chunk_size + width - 1) // width)
    blocks = max(1, (pieces + threads - 1) // threads)
    return min(blocks, most) if most > 0 else blocks


@cuda.jit(cache=True)
def _zero_kernel(arr):  # type: ignore[no-untyped-def]
    i = cuda.grid(1)
    while i < arr.shape[0]:
        arr[i] = 0
        i += cuda.gridsize(1)


def zero(arr: object, stream: object = 0) -> None:
    """Zero a contiguous device array with a kernel on *stream* (key material a kernel made)."""
    flat = arr.reshape(arr.size)  # type: ignore[attr-defined]
    if flat.shape[0]:
        n = flat.shape[0]
        _zero_kernel[min(64, (n + 63) // 64), min(64, n), stream](flat)


@cuda.jit(device=True)
def segments(c, nt, count, chunk_size, last_len, aad_len):  # type: ignore[no-untyped-def]
    """Chunk c's (length, offset in the batch, L, virtual zero blocks in front).

    Its MAC input (AAD, padding, ciphertext, padding, lengths), after z
    zero blocks that make the count a multiple of *nt* (a zero block changes
    nothing), is L rows of *nt* 16-byte blocks: both kernels deal it out to
    *nt* interleaved lanes of L blocks (lane l: blocks l, l + nt, ...).
    """
    n = last_len if c == count - 1 else chunk_size
    total = (aad_len + 15) // 16 + (n + 15) // 16 + 1
    seg = (total + nt - 1) // nt
    return n, c * (chunk_size + 16), seg, seg * nt - total


@cuda.jit(device=True)
def piece(g, width, count, chunk_size, last_len, ok, out):  # type: ignore[no-untyped-def]
    """Thread g's piece: (chunk, block index, start, end) within the chunk, or chunk -1.

    -1 means nothing to decrypt: g is past the batch or the chunk's end, or
    the chunk failed its tag -- then this thread has zeroed its piece of the
    output instead, so a failed chunk's plaintext never exists.
    """
    per = (chunk_size + width - 1) // width
    c = g // per
    if c >= count:
        return -1, 0, 0, 0
    b = g - c * per
    n = last_len if c == count - 1 else chunk_size
    start = width * b
    if start >= n:
        return -1, 0, 0, 0
    end = min(start + width, n)
    if ok[c] != 1:
        for i in range(start, end):
            out[c * chunk_size + i] = 0
        return -1, 0, 0, 0
    return c, b, start, end


@cuda.jit(device=True)
def lane_block(chunk_size, last_len, aad_len):  # type: ignore[no-untyped-def]
    """This thread's place in a MAC lanes kernel's grid of (chunks, groups) CUDA blocks.

    Returns (c, g, t, nt, lanes, lane) -- chunk, group, thread, threads a
    block, lanes a chunk, this lane -- then ``segments`` of chunk c. The
    batch's chunk count is the grid's: a scratch array with spare rows must
    not make the last chunk a full one (a read past the ciphertext).
    """
    c = cuda.blockIdx.x
    g = cuda.blockIdx.y
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    lanes = nt * cuda.gridDim.y
    n, base, rows, z = segments(c, lanes, cuda.gridDim.x, chunk_size, last_len, aad_len)
    return c, g, t, nt, lanes, g * nt + t, n, base, rows, z


@cuda.jit(device=True)
def word_wise(src, dst, length, ct32, out32):  # type: ignore[no-untyped-def]
    """Whether *length* bytes from ct[src] to out[dst] can go as 32-bit words: both
    offsets 4-byte aligned and inside the word views (see :func:`words`)."""
    return (
        src % 4 == 0
        and dst % 4 == 0
        and (src + length) // 4 <= ct32.shape[0]
        and (dst + length) // 4 <= out32.shape[0]
    )
