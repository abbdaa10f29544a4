"""AES-GCM chunks authenticated and decrypted on a CUDA device (numba.cuda).

The shape of ``cuda_chacha`` (see there), over a batch of sealed chunks laid
out as in the file (chunk c at ``c * (chunk_size + 16)``: ciphertext, then
tag), every chunk of the batch in each launch:

0. ``_powers_kernel`` (once per key, or per call when no ``powers`` buffer
   is passed): Shoup's 4-bit tables of H^1..H^nt and of H^(nt * j) for
   j = 0..groups, one thread a power by square-and-multiply. A loader makes
   them once at open (``ghash_powers``) and reuses them for every batch.
1. ``_ghash_kernel``: a grid of (chunks, groups) CUDA blocks of nt threads.
   Each chunk's GHASH input (AAD, padding, ciphertext, padding, lengths,
   virtually left-padded with zero blocks to a multiple of the lane count
   nt * groups) is dealt out to lanes: lane l takes 16-byte blocks l,
   l + lanes, l + 2 lanes, ..., so a warp reads 32 consecutive blocks
   (512 contiguous bytes, as 32-bit words where aligned), and runs Horner
   with H^lanes (its table staged in shared memory). Lane l's value is
   weighted by H^(nt - t) (t its thread), the block's lanes are XORed in a
   shared-memory tree and thread 0 weights the sum by H^(nt * (groups - 1
   - g)), so block v of N counts H^(N - v) as in the sequential definition.
   The sum goes to ``sums[c, g]``. ``lane_groups`` picks the groups: 32 for
   a 1 MiB chunk, so a 64 MiB batch is 2048 CUDA blocks of 128 threads,
   each lane 16 multiplications (the earlier kernel: one CUDA block a
   chunk, 512-step chains over contiguous 8 KiB segments read byte by byte).
2. ``_tag_kernel``: one thread per chunk XORs its groups' sums (and zeroes
   them), adds E_K(J0) and compares with the stored tag: ``ok[c]`` is 1 only
   for a chunk whose tag matched.
3. ``_xor_kernel``: a grid of at most ``XOR_BLOCKS`` CUDA blocks that stage
   the AES round tables in shared memory once and then loop with the grid's
   stride over 16-byte counter blocks (consecutive threads, consecutive
   blocks), XOR word-wise where aligned. It writes plaintext only for chunks
   with ``ok[c] == 1`` and zeros for the others, so plaintext of a chunk
   that failed never exists, not even on the device.

AES is table-driven (the round tables are staged in shared memory per CUDA
block); GHASH uses Shoup's tables. Both leak through timing on a shared GPU
(docs/NATIVE.md): the loaders refuse this suite unless allowed. 128-bit
values are (hi, lo) uint64 pairs in GCM's big-endian byte order. All
arithmetic is 64-bit and masked, which keeps the CUDA simulator free of
numpy overflow warnings.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, uint64

from sealstore.native import cuda_common, gf128
from sealstore.native.cuda_common import (
    check_tag_threads,
    lane_block,
    piece,
    word_wise,
    words,
    xor_grid,
)

__all__ = [
    "TAG_THREADS",
    "decrypt_chunks",
    "device_tables",
    "ghash_powers",
    "host_tables",
    "lane_groups",
    "powers_shape",
]

TAG_THREADS = 128  # GHASH lanes per CUDA block
MAX_GROUPS = 64  # CUDA blocks of lanes per chunk
ROWS = 16  # 16-byte blocks a lane aims at (fewer lanes for short chunks)
XOR_THREADS = 256
XOR_BLOCKS = 1024  # at most: each CUDA block stages the tables once, then loops

_U = np.uint64
_M8 = np.uint64(0xFF)
_M32 = np.uint64(0xFFFFFFFF)


def host_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The round tables (4 x 256), S-box and GHASH reduction table, as the kernels take them.

    A loader copies these into buffers from its own allocator (torch's);
    :func:`device_tables` puts them in numba's.
    """
    from sealstore.native import aes

    return (
        aes._TE.astype(np.uint64),
        aes._S.astype(np.uint64),
        aes._LAST4.astype(np.uint64),
    )


def device_tables() -> tuple[object, object, object]:
    """:func:`host_tables` on the device, in buffers numba allocates."""
    te, sb, last4 = host_tables()
    return cuda.to_device(te), cuda.to_device(sb), cuda.to_device(last4)


@cuda.jit(device=True)
def _encrypt(rk, te, sb, b0, b1, b2, b3, out):  # type: ignore[no-untyped-def]
    """AES-encrypt the block of big-endian words b0..b3 into out[0..3] (words < 2^32)."""
    rounds = rk.shape[0] // 4 - 1
    s = cuda.local.array(4, uint64)
    t = cuda.local.array(4, uint64)
    s[0] = b0 ^ _U(rk[0])
    s[1] = b1 ^ _U(rk[1])
    s[2] = b2 ^ _U(rk[2])
    s[3] = b3 ^ _U(rk[3])
    for r in range(1, rounds):
        for c in range(4):
            t[c] = (
                te[0, (s[c] >> _U(24)) & _M8]
                ^ te[1, (s[(c + 1) % 4] >> _U(16)) & _M8]
                ^ te[2, (s[(c + 2) % 4] >> _U(8)) & _M8]
                ^ te[3, s[(c + 3) % 4] & _M8]
                ^ _U(rk[4 * r + c])
            )
        for c in range(4):
            s[c] = t[c]
    for c in range(4):
        out[c] = (
            (sb[(s[c] >> _U(24)) & _M8] << _U(24))
            | (sb[(s[(c + 1) % 4] >> _U(16)) & _M8] << _U(16))
            | (sb[(s[(c + 2) % 4] >> _U(8)) & _M8] << _U(8))
            | sb[s[(c + 3) % 4] & _M8]
        ) ^ _U(rk[4 * rounds + c])
    for c in range(4):
        s[c] = _U(0)
        t[c] = _U(0)


# The CPU kernels' table builder (aes._ghash_tables), compiled for the device.
_shoup = cuda.jit(device=True)(gf128.shoup_tables)


@cuda.jit(device=True)
def _gmul(xh, xl, hh, hl, last4, z):  # type: ignore[no-untyped-def]
    """z = X * V for the V whose Shoup tables are hh/hl; z[0], z[1] = hi, lo."""
    four = _U(4)
    zh = _U(0)
    zl = _U(0)
    for i in range(15, -1, -1):
        byte = (xl >> _U(8 * (15 - i))) & _M8 if i >= 8 else (xh >> _U(8 * (7 - i))) & _M8
        lo = byte & _U(15)
        hi = byte >> four
        if i != 15:
            rem = zl & _U(15)
            zl = (zh << _U(60)) | (zl >> four)
            zh = (zh >> four) ^ (last4[rem] << _U(48))
            zh ^= hh[lo]
            zl ^= hl[lo]
        else:
            zh = hh[lo]
            zl = hl[lo]
        rem = zl & _U(15)
        zl = (zh << _U(60)) | (zl >> four)
        zh = (zh >> four) ^ (last4[rem] << _U(48))
        zh ^= hh[hi]
        zl ^= hl[hi]
    z[0] = zh
    z[1] = zl


_ONE = np.uint64(1) << np.uint64(63)  # 1 in GF(2^128), GCM's bit order (x^0 is the top bit)


@cuda.jit(device=True, inline=True)
def _bswap(w):  # type: ignore[no-untyped-def]
    """A 32-bit word's bytes reversed: a little-endian load as GCM's big-endian word."""
    return (
        ((w >> _U(24)) & _M8)
        | ((w >> _U(8)) & _U(0xFF00))
        | ((w << _U(8)) & _U(0xFF0000))
        | ((w << _U(24)) & _U(0xFF000000))
    )


@cuda.jit(device=True, inline=True)
def _be(buf, base, j, limit):  # type: ignore[no-untyped-def]
    """Eight big-endian bytes at buf[base + j ..] as uint64, zeros past *limit* bytes."""
    v = _U(0)
    for k in range(8):
        b = _U(buf[base + j + k]) if j + k < limit else _U(0)
        v = (v << _U(8)) | b
    return v


@cuda.jit(device=True)
def _load(v, z, aad, aad_len, ct, ct32, base, n, w):  # type: ignore[no-untyped-def]
    """Virtual GHASH block v of a chunk into w[0], w[1]; False for the front padding.

    A whole ciphertext block at a 4-byte-aligned offset is four 32-bit loads
    through *ct32*; the AAD, a partial last block and unaligned layouts go
    byte by byte.
    """
    j = v - z
    if j < 0:
        return False
    na = (aad_len + 15) // 16
    nc = (n + 15) // 16
    if j < na:
        w[0] = _be(aad, 16 * j, 0, aad_len - 16 * j)
        w[1] = _be(aad, 16 * j, 8, aad_len - 16 * j)
    elif j < na + nc:
        off = 16 * (j - na)
        at = base + off
        if off + 16 <= n and at % 4 == 0 and at // 4 + 4 <= ct32.shape[0]:
            a = at // 4
            w[0] = (_bswap(_U(ct32[a])) << _U(32)) | _bswap(_U(ct32[a + 1]))
            w[1] = (_bswap(_U(ct32[a + 2])) << _U(32)) | _bswap(_U(ct32[a + 3]))
        else:
            w[0] = _be(ct, at, 0, n - off)
            w[1] = _be(ct, at, 8, n - off)
    else:
        w[0] = _U(aad_len) * _U(8)
        w[1] = _U(n) * _U(8)
    return True


@cuda.jit(cache=True)
def _powers_kernel(h_tab, last4, nt, pw):  # type: ignore[no-untyped-def]
    """Thread i: Shoup's tables of H^(i+1) (i < nt) or H^(nt * (i - nt)) into pw[i]."""
    i = cuda.grid(1)
    if i >= pw.shape[0]:
        return
    e = i + 1 if i < nt else nt * (i - nt)
    th = cuda.local.array(16, uint64)
    tl = cuda.local.array(16, uint64)
    acc = cuda.local.array(2, uint64)
    sq = cuda.local.array(2, uint64)
    acc[0] = _ONE
    acc[1] = _U(0)
    sq[0] = h_tab[0, 8]  # H itself: the table entry of the nibble 8 (= x^0)
    sq[1] = h_tab[1, 8]
    while e > 0:  # each product through the tables of its operand
        if e & 1:
            _shoup(sq[0], sq[1], th, tl)
            _gmul(acc[0], acc[1], th, tl, last4, acc)
        e >>= 1
        if e > 0:
            _shoup(sq[0], sq[1], th, tl)
            _gmul(sq[0], sq[1], th, tl, last4, sq)
    _shoup(acc[0], acc[1], pw[i, 0], pw[i, 1])
    for k in range(16):  # powers of H: not left behind
        th[k] = _U(0)
        tl[k] = _U(0)
    for k in range(2):
        acc[k] = _U(0)
        sq[k] = _U(0)


@cuda.jit(cache=True)
def _ghash_kernel(pw, last4_g, aad, ct, ct32, chunk_size, last_len, sums):  # type: ignore[no-untyped-def]
    """CUDA block (c, g): lanes g * nt .. (g + 1) * nt - 1 of chunk c; their sum to sums[c, g]."""
    aad_len = aad.shape[0]
    c, g, t, nt, lanes, lane, n, base, rows, z = lane_block(chunk_size, last_len, aad_len)
    groups = cuda.gridDim.y

    # The Horner step H^lanes (row nt + groups) and the reduction table, shared.
    sh = cuda.shared.array((2, 16), uint64)
    last4 = cuda.shared.array(16, uint64)
    for k in range(t, 16, nt):
        sh[0, k] = pw[nt + groups, 0, k]
        sh[1, k] = pw[nt + groups, 1, k]
        last4[k] = last4_g[k]
    cuda.syncthreads()

    # Lane l takes virtual blocks l, l + lanes, ... (a warp reads consecutive
    # 16-byte blocks: coalesced): y = y * H^lanes + X, then y * H^(nt - t).
    y = cuda.local.array(2, uint64)
    w = cuda.local.array(2, uint64)
    y[0] = _U(0)
    y[1] = _U(0)
    for i in range(rows):
        _gmul(y[0], y[1], sh[0], sh[1], last4, y)
        if _load(i * lanes + lane, z, aad, aad_len, ct, ct32, base, n, w):
            y[0] ^= w[0]
            y[1] ^= w[1]
    _gmul(y[0], y[1], pw[nt - 1 - t, 0], pw[nt - 1 - t, 1], last4, y)

    parts = cuda.shared.array((TAG_THREADS, 2), uint64)
    parts[t, 0] = y[0]
    parts[t, 1] = y[1]
    cuda.syncthreads()
    s = 1
    while s < nt:  # addition in GF(2^128) is XOR
        if t % (2 * s) == 0 and t + s < nt:
            parts[t, 0] ^= parts[t + s, 0]
            parts[t, 1] ^= parts[t + s, 1]
        cuda.syncthreads()
        s *= 2
    if t == 0:
        # The group's place in the chunk: times H^(nt * (groups - 1 - g)).
        shift = nt + groups - 1 - g
        _gmul(parts[0, 0], parts[0, 1], pw[shift, 0], pw[shift, 1], last4, y)
        sums[c, g, 0] = y[0]
        sums[c, g, 1] = y[1]
    # H^lanes and the partial sums, local and shared, are not left behind.
    cuda.syncthreads()  # thread 0 has read the tree's root
    parts[t, 0] = _U(0)
    parts[t, 1] = _U(0)
    for k in range(2):
        y[k] = _U(0)
        w[k] = _U(0)
    for k in range(t, 16, nt):
        sh[0, k] = _U(0)
        sh[1, k] = _U(0)


@cuda.jit(cache=True)
def _tag_kernel(rk, te, sb, nonces, ct, chunk_size, last_len, sums, ok):  # type: ignore[no-untyped-def]
    """One thread per chunk: XOR its lane groups' sums, add E_K(J0), compare the tag."""
    c = cuda.grid(1)
    count = nonces.shape[0]
    if c >= count:
        return
    n = last_len if c == count - 1 else chunk_size
    y = cuda.local.array(2, uint64)
    y[0] = _U(0)
    y[1] = _U(0)
    for g in range(sums.shape[1]):
        for k in range(2):
            y[k] ^= sums[c, g, k]
            sums[c, g, k] = _U(0)  # MAC state, not left behind
    ek = cuda.local.array(4, uint64)
    _encrypt(rk, te, sb, _U(nonces[c, 0]), _U(nonces[c, 1]), _U(nonces[c, 2]), _U(1), ek)
    diff = _U(0)
    tag = c * (chunk_size + 16) + n
    for k in range(16):
        mask = (ek[k // 4] >> _U(24 - 8 * (k % 4))) & _M8
        yb = (y[k // 8] >> _U(56 - 8 * (k % 8))) & _M8
        diff |= (mask ^ yb) ^ _U(ct[tag + k])
    ok[c] = 1 if diff == 0 else 0
    for k in range(4):
        ek[k] = _U(0)
    for k in range(2):
        y[k] = _U(0)


@cuda.jit(cache=True)
def _xor_kernel(rk, te_g, sb_g, nonces, ct, ct32, chunk_size, last_len, ok, out, out32):  # type: ignore[no-untyped-def]
    te = cuda.shared.array((4, 256), uint64)
    sb = cuda.shared.array(256, uint64)
    tid = cuda.threadIdx.x
    for i in range(tid, 256, cuda.blockDim.x):
        sb[i] = sb_g[i]
        for k in range(4):
            te[k, i] = te_g[k, i]
    cuda.syncthreads()
    count = nonces.shape[0]
    total = count * ((chunk_size + 15) // 16)
    ks = cuda.local.array(4, uint64)
    g = cuda.grid(1)
    while g < total:  # the grid's stride: consecutive threads, consecutive counter blocks
        c, b, start, end = piece(g, 16, count, chunk_size, last_len, ok, out)
        g += cuda.gridsize(1)
        if c < 0:
            continue
        dst = c * chunk_size + start
        src = c * (chunk_size + 16) + start
        ctr = (_U(b) + _U(2)) & _M32
        _encrypt(rk, te, sb, _U(nonces[c, 0]), _U(nonces[c, 1]), _U(nonces[c, 2]), ctr, ks)
        done = 0
        if word_wise(src, dst, end - start, ct32, out32):
            done = 4 * ((end - start) // 4)
            for k in range(done // 4):
                le = _bswap(ks[k])  # big-endian keystream word, in the load's byte order
                out32[dst // 4 + k] = np.uint32((_U(ct32[src // 4 + k]) ^ le) & _M32)
        for k in range(done, end - start):
            byte = (ks[k // 4] >> _U(24 - 8 * (k % 4))) & _M8
            out[dst + k] = np.uint8(_U(ct[src + k]) ^ byte)
    for k in range(4):
        ks[k] = _U(0)


def lane_groups(chunk_size: int, aad_len: int, tag_threads: int = TAG_THREADS) -> int:
    """CUDA blocks of *tag_threads* GHASH lanes per chunk (32 for 1 MiB at 128 lanes)."""
    return cuda_common.lane_groups(chunk_size, aad_len, tag_threads, ROWS, MAX_GROUPS)


def powers_shape(tag_threads: int, groups: int) -> tuple[int, int, int]:
    """The shape of the powers-of-H tables ``decrypt_chunks`` takes for this geometry."""
    return (tag_threads + groups + 1, 2, 16)


def _check_shape(arr: object, shape: tuple[int, int, int], what: str = "powers of H") -> None:
    got = tuple(arr.shape)  # type: ignore[attr-defined]
    if got != shape:
        raise ValueError(f"{what} must have shape {shape} for this launch, not {got}")


def ghash_powers(
    h_tab: object,
    last4: object,
    tag_threads: int,
    groups: int,
    out: object = None,
    stream: object = 0,
) -> object:
    """Shoup's tables of the powers of H a launch geometry needs, made on the device.

    Rows 0..nt-1: H^1..H^nt (each lane's weight); rows nt + j, j = 0..groups:
    H^(nt * j) (each group's shift, and H^lanes, the Horner step). Key
    material: the caller wipes *out* (allocated here when None).
    """
    shape = powers_shape(tag_threads, groups)
    if out is None:
        out = cuda.device_array(shape, dtype=np.uint64, stream=stream)
    _check_shape(out, shape)
    _powers_kernel[(shape[0] + 63) // 64, min(64, shape[0]), stream](h_tab, last4, tag_threads, out)
    return out


def decrypt_chunks(
    rk: object,
    h_tab: object,
    tables: tuple[object, object, object],
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
    powers: object = None,
    sums: object = None,
) -> None:
    """Authenticate and decrypt a batch of AES-GCM chunks, all in device memory.

    Three launches on *stream*, every chunk of the batch in each: GHASH's
    lanes, the tags, the XOR (four with the powers of H when *powers* is None).

    Args:
        rk: device uint32[4 * (rounds + 1)], the expanded payload key.
        h_tab: device uint64[2, 16], Shoup's tables of H = E_K(0^128).
        tables: ``device_tables()``.
        nonces: device uint32[count, 3], each chunk's nonce as *big-endian* words.
        tag_threads: GHASH lanes per CUDA block (at most ``TAG_THREADS``).
        tag_groups: CUDA blocks per chunk; ``lane_groups()`` when None.
        powers: ``ghash_powers()`` for this geometry, made once by a caller
            that loads many batches; made here (and zeroed after) when None.
        sums: device uint64[count, tag_groups, 2] scratch for the groups'
            sums (zeroed again by the tag kernel); allocated when None.
        Others as ``cuda_chacha.decrypt_chunks``.

    Raises:
        ValueError: *tag_threads*, *tag_groups* or *powers* out of range.
    """
    check_tag_threads(tag_threads, TAG_THREADS)
    te, sb, last4 = tables
    count = nonces.shape[0]  # type: ignore[attr-defined]
    groups = tag_groups or lane_groups(chunk_size, aad.shape[0], tag_threads)  # type: ignore[attr-defined]
    if not 1 <= groups <= MAX_GROUPS:
        raise ValueError(f"tag_groups must be 1..{MAX_GROUPS}")
    own = powers is None
    if own:
        pw = ghash_powers(h_tab, last4, tag_threads, groups, None, stream)
    else:
        pw = powers
        _check_shape(pw, powers_shape(tag_threads, groups))
    if sums is None:
        sums = cuda.device_array((count, groups, 2), dtype=np.uint64, stream=stream)
    else:
        _check_shape(sums, (count, groups, 2), "sums")
    ct32, out32 = words(ct), words(out)
    _ghash_kernel[(count, groups), tag_threads, stream](
        pw, last4, aad, ct, ct32, chunk_size, last_len, sums
    )
    _tag_kernel[(count + 63) // 64, min(64, count), stream](
        rk, te, sb, nonces, ct, chunk_size, last_len, sums, ok
    )
    if own:
        cuda_common.zero(pw, stream)  # powers of H made for this call only
    grid = xor_grid(count, chunk_size, 16, XOR_THREADS, XOR_BLOCKS)
    _xor_kernel[grid, XOR_THREADS, stream](
        rk, te, sb, nonces, ct, ct32, chunk_size, last_len, ok, out, out32
    )


def h_tables(rk_host: np.ndarray) -> np.ndarray:
    """Shoup's tables of H = E_K(0^128), uint64[2, 16], made on the host by the CPU kernels."""
    from sealstore.native import aes

    h = np.zeros(16, dtype=np.uint8)
    aes._encrypt_block(rk_host, np.zeros(16, dtype=np.uint8), h)
    out = np.empty((2, 16), dtype=np.uint64)
    aes._ghash_tables(h, out[0], out[1])
    h[:] = 0
    return out
