"""ChaCha20-Poly1305 chunks authenticated and decrypted on a CUDA device (numba.cuda).

Three kernels over a batch of sealed chunks that sit in device memory as
they sit in the file (chunk c at ``c * (chunk_size + 16)``: ciphertext, then
tag), every chunk of the batch in each launch:

1. ``_lanes_kernel``: a grid of (chunks, groups) CUDA blocks of nt threads.
   Each chunk's Poly1305 input (AAD, padding, ciphertext, padding, lengths,
   virtually left-padded with zero blocks to a multiple of the lane count
   nt * groups) is dealt out to lanes: lane l takes 16-byte blocks l,
   l + lanes, l + 2 lanes, ..., so a warp reads consecutive blocks
   (coalesced, as 32-bit words where aligned), and runs Horner with
   r^lanes. The chunk's r (ChaCha20 block 0) is made once per CUDA block by
   thread 0 and shared, not by every lane. Each lane's value is weighted by
   r^(lanes - l) (the powers r^1..r^nt are built once per CUDA block, by
   doubling, in shared memory) and the block sums its lanes in a
   shared-memory tree into ``sums[c, g]``.
   ``lane_groups`` picks the groups: 16 for a 1 MiB chunk, so a 64 MiB batch
   is 1024 CUDA blocks.
2. ``_tag_kernel``: one thread per chunk adds its groups' sums (and zeroes
   them), reduces, adds s and compares with the stored tag: ``ok[c]`` is 1
   only for a chunk whose tag matched.
3. ``_xor_kernel``: one thread per 64-byte ChaCha20 block, XOR word-wise
   where source and destination are 4-byte aligned. It writes plaintext only
   for chunks with ``ok[c] == 1`` and zeros for the others, so plaintext of
   a chunk that failed never exists, not even on the device.

Arithmetic is done in 64-bit integers and masked to 32 bits (LLVM narrows
it back to 32-bit instructions), which also keeps the CUDA simulator free of
numpy overflow warnings. Poly1305 uses five 26-bit limbs, as the CPU kernel.
The simulator (``NUMBA_ENABLE_CUDASIM=1``) runs these kernels in tests.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, uint64

from sealstore.native import cuda_common
from sealstore.native.cuda_common import (
    check_tag_threads,
    lane_block,
    piece,
    word_wise,
    words,
    xor_grid,
)

__all__ = ["TAG_THREADS", "decrypt_chunks", "lane_groups"]

TAG_THREADS = 256  # Poly1305 lanes per CUDA block
MAX_GROUPS = 64  # CUDA blocks of lanes per chunk
ROWS = 16  # 16-byte blocks a lane aims at (fewer lanes for short chunks)
XOR_THREADS = 256

_M32 = np.uint64(0xFFFFFFFF)
_M26 = np.uint64(0x3FFFFFF)
_U = np.uint64


@cuda.jit(device=True, inline=True)
def _rotl(v, c):  # type: ignore[no-untyped-def]
    return ((v << c) | (v >> (_U(32) - c))) & _M32


@cuda.jit(device=True, inline=True)
def _qr(x, a, b, c, d):  # type: ignore[no-untyped-def]
    x[a] = (x[a] + x[b]) & _M32
    x[d] = _rotl(x[d] ^ x[a], _U(16))
    x[c] = (x[c] + x[d]) & _M32
    x[b] = _rotl(x[b] ^ x[c], _U(12))
    x[a] = (x[a] + x[b]) & _M32
    x[d] = _rotl(x[d] ^ x[a], _U(8))
    x[c] = (x[c] + x[d]) & _M32
    x[b] = _rotl(x[b] ^ x[c], _U(7))


@cuda.jit(device=True)
def _block(key, n0, n1, n2, counter, x):  # type: ignore[no-untyped-def]
    """ChaCha20 block *counter* (RFC 8439 2.3) into x[0..15] (uint64 words < 2^32)."""
    init = cuda.local.array(16, uint64)
    init[0] = _U(0x61707865)
    init[1] = _U(0x3320646E)
    init[2] = _U(0x79622D32)
    init[3] = _U(0x6B206574)
    for i in range(8):
        init[4 + i] = _U(key[i])
    init[12] = _U(counter) & _M32
    init[13] = n0
    init[14] = n1
    init[15] = n2
    for i in range(16):
        x[i] = init[i]
    for _ in range(10):
        _qr(x, 0, 4, 8, 12)
        _qr(x, 1, 5, 9, 13)
        _qr(x, 2, 6, 10, 14)
        _qr(x, 3, 7, 11, 15)
        _qr(x, 0, 5, 10, 15)
        _qr(x, 1, 6, 11, 12)
        _qr(x, 2, 7, 8, 13)
        _qr(x, 3, 4, 9, 14)
    for i in range(16):
        x[i] = (x[i] + init[i]) & _M32
        init[i] = _U(0)


@cuda.jit(device=True, inline=True)
def _mulmod(h, r):  # type: ignore[no-untyped-def]
    """h *= r mod 2^130-5 (five 26-bit limbs in local arrays)."""
    five = _U(5)
    s26 = _U(26)
    s1 = r[1] * five
    s2 = r[2] * five
    s3 = r[3] * five
    s4 = r[4] * five
    d0 = h[0] * r[0] + h[1] * s4 + h[2] * s3 + h[3] * s2 + h[4] * s1
    d1 = h[0] * r[1] + h[1] * r[0] + h[2] * s4 + h[3] * s3 + h[4] * s2
    d2 = h[0] * r[2] + h[1] * r[1] + h[2] * r[0] + h[3] * s4 + h[4] * s3
    d3 = h[0] * r[3] + h[1] * r[2] + h[2] * r[1] + h[3] * r[0] + h[4] * s4
    d4 = h[0] * r[4] + h[1] * r[3] + h[2] * r[2] + h[3] * r[1] + h[4] * r[0]
    d1 += d0 >> s26
    d2 += d1 >> s26
    d3 += d2 >> s26
    d4 += d3 >> s26
    c = d4 >> s26
    e0 = (d0 & _M26) + c * five
    h[0] = e0 & _M26
    h[1] = (d1 & _M26) + (e0 >> s26)
    h[2] = d2 & _M26
    h[3] = d3 & _M26
    h[4] = d4 & _M26


@cuda.jit(device=True, inline=True)
def _byte(buf, base, j, limit):  # type: ignore[no-untyped-def]
    """buf[base + j] as uint64, or 0 past *limit* bytes (the AEAD's zero padding)."""
    if j < limit:
        return _U(buf[base + j])
    return _U(0)


@cuda.jit(device=True)
def _load_block(v, z, aad, aad_len, ct, ct32, base, n, m):  # type: ignore[no-untyped-def]
    """Virtual block v of a chunk's Poly1305 input as limbs into m; False for front padding.

    A whole ciphertext block at a 4-byte-aligned offset is read as four
    32-bit words through *ct32* (``ct`` viewed as uint32); other blocks
    (the AAD, a chunk's partial last block, unaligned layouts) byte by byte.
    """
    j = v - z
    if j < 0:
        return False
    na = (aad_len + 15) // 16
    nc = (n + 15) // 16
    w = cuda.local.array(4, uint64)
    for k in range(4):
        w[k] = _U(0)
    if j < na:
        for b in range(16):
            w[b // 4] |= _byte(aad, 16 * j, b, aad_len - 16 * j) << _U(8 * (b % 4))
    elif j < na + nc:
        off = 16 * (j - na)
        at = base + off
        if off + 16 <= n and at % 4 == 0 and at // 4 + 4 <= ct32.shape[0]:
            for k in range(4):
                w[k] = _U(ct32[at // 4 + k])
        else:
            for b in range(16):
                w[b // 4] |= _byte(ct, at, b, n - off) << _U(8 * (b % 4))
    else:
        w[0] = _U(aad_len) & _M32
        w[1] = _U(aad_len) >> _U(32)
        w[2] = _U(n) & _M32
        w[3] = _U(n) >> _U(32)
    m[0] = w[0] & _M26
    m[1] = ((w[0] >> _U(26)) | (w[1] << _U(6))) & _M26
    m[2] = ((w[1] >> _U(20)) | (w[2] << _U(12))) & _M26
    m[3] = ((w[2] >> _U(14)) | (w[3] << _U(18))) & _M26
    m[4] = (w[3] >> _U(8)) | (_U(1) << _U(24))
    return True


@cuda.jit(device=True)
def _power(r, e, out):  # type: ignore[no-untyped-def]
    """out = r^e mod 2^130-5 (e >= 0) by square-and-multiply on the limbs."""
    sq = cuda.local.array(5, uint64)
    for k in range(5):
        sq[k] = r[k]
        out[k] = _U(0)
    out[0] = _U(1)
    while e > 0:
        if e & 1:
            _mulmod(out, sq)
        e >>= 1
        if e > 0:
            _mulmod(sq, sq)
    for k in range(5):
        sq[k] = _U(0)  # a power of r


@cuda.jit(device=True)
def _poly_key(key, nonces, c, x, r):  # type: ignore[no-untyped-def]
    """Chunk c's ChaCha20 block 0 into x (s is x[4..7]) and its clamped r as limbs into r."""
    _block(key, _U(nonces[c, 0]), _U(nonces[c, 1]), _U(nonces[c, 2]), 0, x)
    lo = cuda.local.array(4, uint64)
    lo[0] = x[0] & _U(0x0FFFFFFF)
    lo[1] = x[1] & _U(0x0FFFFFFC)
    lo[2] = x[2] & _U(0x0FFFFFFC)
    lo[3] = x[3] & _U(0x0FFFFFFC)
    r[0] = lo[0] & _M26
    r[1] = ((lo[0] >> _U(26)) | (lo[1] << _U(6))) & _M26
    r[2] = ((lo[1] >> _U(20)) | (lo[2] << _U(12))) & _M26
    r[3] = ((lo[2] >> _U(14)) | (lo[3] << _U(18))) & _M26
    r[4] = lo[3] >> _U(8)
    for k in range(4):
        lo[k] = _U(0)


@cuda.jit(device=True, inline=True)
def _mul_rows(dst, a, ia, b, ib):  # type: ignore[no-untyped-def]
    """dst[0..4] = a[ia] * b[ib] (rows of 5 limbs, e.g. in shared memory)."""
    u = cuda.local.array(5, uint64)
    v = cuda.local.array(5, uint64)
    for k in range(5):
        u[k] = a[ia, k]
        v[k] = b[ib, k]
    _mulmod(u, v)
    for k in range(5):
        dst[k] = u[k]
        u[k] = _U(0)  # powers of r
        v[k] = _U(0)


@cuda.jit(cache=True)
def _lanes_kernel(key, nonces, aad, ct, ct32, chunk_size, last_len, sums):  # type: ignore[no-untyped-def]
    """CUDA block (c, g): lanes g * nt .. (g + 1) * nt - 1 of chunk c; their sum to sums[c, g]."""
    aad_len = aad.shape[0]
    c, g, t, nt, lanes, lane, n, base, rows, z = lane_block(chunk_size, last_len, aad_len)
    groups = cuda.gridDim.y
    # The chunk's r, once per CUDA block: thread 0 runs ChaCha20 block 0 and
    # puts r in shared memory (the other threads wait at the barrier).
    pw = cuda.shared.array((TAG_THREADS, 5), uint64)
    row = cuda.local.array(5, uint64)
    if t == 0:
        x = cuda.local.array(16, uint64)
        r = cuda.local.array(5, uint64)
        _poly_key(key, nonces, c, x, r)
        for k in range(5):
            pw[0, k] = r[k]
            r[k] = _U(0)
        for k in range(16):
            x[k] = _U(0)
    cuda.syncthreads()

    # pw[k] = r^(k+1) for k < nt, by doubling: in round s, threads s..2s-1 make
    # r^(t+1) = r^(t-s+1) * r^s from rows the rounds before finished.
    s = 1
    while s < nt:
        if s <= t < 2 * s:
            _mul_rows(row, pw, t - s, pw, s - 1)
            for k in range(5):
                pw[t, k] = row[k]
        cuda.syncthreads()
        s *= 2
    # step = r^lanes (one row of the lanes), shift = r^(nt * (groups - 1 - g)).
    common = cuda.shared.array((2, 5), uint64)
    if t == 0:
        rn = cuda.local.array(5, uint64)
        for k in range(5):
            rn[k] = pw[nt - 1, k]
        _power(rn, groups, row)
        for k in range(5):
            common[0, k] = row[k]
        _power(rn, groups - 1 - g, row)
        for k in range(5):
            common[1, k] = row[k]
            rn[k] = _U(0)
    cuda.syncthreads()

    # Lane l takes virtual blocks l, l + lanes, l + 2 lanes, ... (a warp reads
    # consecutive 16-byte blocks: coalesced), Horner with r^lanes; then weighted by
    # r^(lanes - l) = r^(nt - t) * shift, so block v counts r^(N - v) as in the
    # sequential definition (N = rows * lanes; the front z blocks are zeros).
    step = cuda.local.array(5, uint64)
    for k in range(5):
        step[k] = common[0, k]
    h = cuda.local.array(5, uint64)
    m = cuda.local.array(5, uint64)
    for k in range(5):
        h[k] = _U(0)
    for i in range(rows):
        _mulmod(h, step)
        if _load_block(i * lanes + lane, z, aad, aad_len, ct, ct32, base, n, m):
            for k in range(5):
                h[k] += m[k]
    _mul_rows(row, pw, nt - 1 - t, common, 1)
    _mulmod(h, row)
    cuda.syncthreads()  # every thread has read pw: it becomes the sum's tree
    for k in range(5):
        pw[t, k] = h[k]
    cuda.syncthreads()
    s = 1
    while s < nt:  # limbs grow by one bit a level, far from 64
        if t % (2 * s) == 0 and t + s < nt:
            for k in range(5):
                pw[t, k] += pw[t + s, k]
        cuda.syncthreads()
        s *= 2
    if t == 0:
        for k in range(5):
            sums[c, g, k] = pw[0, k]
    # r, its powers and the partial sums, local and shared, are not left behind
    # (as the tag kernel zeroes its copies); the sums go on in *sums* only.
    cuda.syncthreads()  # thread 0 has read the tree's root
    for k in range(5):
        pw[t, k] = _U(0)
        row[k] = _U(0)
        step[k] = _U(0)
        h[k] = _U(0)
        m[k] = _U(0)
    if t == 0:
        for k in range(5):
            common[0, k] = _U(0)
            common[1, k] = _U(0)


@cuda.jit(cache=True)
def _tag_kernel(key, nonces, ct, chunk_size, last_len, sums, ok):  # type: ignore[no-untyped-def]
    """One thread per chunk: add its lane groups' sums, reduce, add s, compare the tag."""
    c = cuda.grid(1)
    count = nonces.shape[0]
    if c >= count:
        return
    n = last_len if c == count - 1 else chunk_size
    h = cuda.local.array(5, uint64)
    for k in range(5):
        h[k] = _U(0)
    for g in range(sums.shape[1]):
        for k in range(5):
            h[k] += sums[c, g, k]
            sums[c, g, k] = _U(0)  # MAC state, not left behind
    x = cuda.local.array(16, uint64)
    r = cuda.local.array(5, uint64)
    _poly_key(key, nonces, c, x, r)
    # Full reduction mod 2^130-5, then + s mod 2^128 (as the CPU kernel).
    s26 = _U(26)
    for _ in range(2):
        for k in range(4):
            h[k + 1] += h[k] >> s26
            h[k] &= _M26
        h[0] += (h[4] >> s26) * _U(5)
        h[4] &= _M26
    for k in range(4):
        h[k + 1] += h[k] >> s26
        h[k] &= _M26
    g5 = cuda.local.array(5, uint64)
    carry = _U(5)
    for k in range(4):
        g5[k] = h[k] + carry
        carry = g5[k] >> s26
        g5[k] &= _M26
    g5[4] = h[4] + carry
    if g5[4] >= (_U(1) << s26):  # h >= p: take h - p
        g5[4] -= _U(1) << s26
        for k in range(5):
            h[k] = g5[k]
    w0 = (h[0] | (h[1] << _U(26))) & _M32
    w1 = ((h[1] >> _U(6)) | (h[2] << _U(20))) & _M32
    w2 = ((h[2] >> _U(12)) | (h[3] << _U(14))) & _M32
    w3 = ((h[3] >> _U(18)) | (h[4] << _U(8))) & _M32
    f = w0 + x[4]
    diff = _U(0)
    tag = c * (chunk_size + 16) + n
    for i in range(4):
        if i == 1:
            f = w1 + x[5] + (f >> _U(32))
        elif i == 2:
            f = w2 + x[6] + (f >> _U(32))
        elif i == 3:
            f = w3 + x[7] + (f >> _U(32))
        for b in range(4):
            diff |= ((f >> _U(8 * b)) & _U(255)) ^ _U(ct[tag + 4 * i + b])
    ok[c] = 1 if diff == 0 else 0
    for k in range(16):
        x[k] = _U(0)
    for k in range(5):
        r[k] = _U(0)


@cuda.jit(cache=True)
def _xor_kernel(key, nonces, ct, ct32, chunk_size, last_len, ok, out, out32):  # type: ignore[no-untyped-def]
    c, b, start, end = piece(cuda.grid(1), 64, nonces.shape[0], chunk_size, last_len, ok, out)
    if c < 0:
        return
    dst = c * chunk_size + start
    src = c * (chunk_size + 16) + start
    x = cuda.local.array(16, uint64)
    _block(key, _U(nonces[c, 0]), _U(nonces[c, 1]), _U(nonces[c, 2]), b + 1, x)
    done = 0
    if word_wise(src, dst, end - start, ct32, out32):
        done = 4 * ((end - start) // 4)
        for k in range(done // 4):
            out32[dst // 4 + k] = np.uint32((_U(ct32[src // 4 + k]) ^ x[k]) & _M32)
    for i in range(done, end - start):
        k = (x[i // 4] >> _U(8 * (i % 4))) & _U(255)
        out[dst + i] = np.uint8(_U(ct[src + i]) ^ k)
    for i in range(16):
        x[i] = _U(0)


def lane_groups(chunk_size: int, aad_len: int, tag_threads: int = TAG_THREADS) -> int:
    """CUDA blocks of *tag_threads* lanes per chunk: about ``ROWS`` blocks of 16 bytes a lane.

    A 1 MiB chunk with 256 lanes gets 16 groups, so a 64 MiB batch is 1024
    CUDA blocks of Poly1305 (enough to fill every SM of an H100/H200, where
    one block per chunk left half of them idle), each lane ~16 multiplies.
    """
    return cuda_common.lane_groups(chunk_size, aad_len, tag_threads, ROWS, MAX_GROUPS)


def decrypt_chunks(
    key: object,
    nonces: object,
    aad: object,
    ct: object,
    chunk_size: int,
    last_len: int,
    out: object,
    ok: object,
    stream: object = 0,
    tag_threads: int = TAG_THREADS,
    tag_groups: int | None = None,
    sums: object = None,
) -> None:
    """Authenticate and decrypt a batch of chunks, all in device memory.

    Three launches on *stream*, every chunk of the batch in each: Poly1305's
    lanes, the tags, the XOR.

    Args:
        key: device uint32[8], the payload key's words.
        nonces: device uint32[count, 3], each chunk's nonce as words.
        aad: device uint8[], the associated data every chunk is sealed with.
        ct: device uint8[], the chunks as in the file (ciphertext + tag each).
        chunk_size: plaintext bytes of every chunk but the last.
        last_len: plaintext bytes of the last chunk of the batch.
        out: device uint8[], plaintext: chunk c at ``c * chunk_size``.
        ok: device uint8[count]: 1 where the tag matched; failed chunks'
            output is zeros.
        stream: the CUDA stream every launch is ordered on.
        tag_threads: Poly1305 lanes per CUDA block (at most ``TAG_THREADS``).
        tag_groups: CUDA blocks per chunk; ``lane_groups()`` when None.
        sums: device uint64[count, tag_groups, 5] scratch for the lane groups'
            sums (zeroed again by the tag kernel); allocated when None -- a
            caller that loads many batches passes one (from torch's allocator,
            say) to allocate nothing per batch.

    Raises:
        ValueError: *tag_threads* or *tag_groups* out of range.
    """
    check_tag_threads(tag_threads, TAG_THREADS)
    count = nonces.shape[0]  # type: ignore[attr-defined]
    groups = tag_groups or lane_groups(chunk_size, aad.shape[0], tag_threads)  # type: ignore[attr-defined]
    if not 1 <= groups <= MAX_GROUPS:
        raise ValueError(f"tag_groups must be 1..{MAX_GROUPS}")
    if sums is None:
        sums = cuda.device_array((count, groups, 5), dtype=np.uint64, stream=stream)
    ct32, out32 = words(ct), words(out)
    _lanes_kernel[(count, groups), tag_threads, stream](
        key, nonces, aad, ct, ct32, chunk_size, last_len, sums
    )
    _tag_kernel[(count + 63) // 64, min(64, count), stream](
        key, nonces, ct, chunk_size, last_len, sums, ok
    )
    grid = xor_grid(count, chunk_size, 64, XOR_THREADS)
    _xor_kernel[grid, XOR_THREADS, stream](
        key, nonces, ct, ct32, chunk_size, last_len, ok, out, out32
    )
