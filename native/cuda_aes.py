"""AES-GCM chunks authenticated and decrypted on a CUDA device (numba.cuda).

The same two-kernel shape as ``cuda_chacha`` (see there): a tag kernel with
one CUDA block per chunk, whose threads split the GHASH input into equal
segments (virtually left-padded with zero blocks) and run Horner with H over
their segment; thread 0 joins them with H^L (Shoup 4-bit tables of H and of
H^L in shared memory) and compares E_K(J0) xor GHASH with the stored tag.
Then one thread per 16-byte counter block writes plaintext (word-wise where
aligned) only for chunks whose tag matched, zeros for the others.

AES is table-driven (the round tables are staged in shared memory per CUDA
block); GHASH uses Shoup's tables. 128-bit values are (hi, lo) uint64 pairs
in GCM's big-endian byte order. All arithmetic is 64-bit and masked, which
keeps the CUDA simulator free of numpy overflow warnings.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, uint64

from sealstore.native.cuda_common import check_tag_threads, piece, segments, words, xor_grid

__all__ = ["TAG_THREADS", "decrypt_chunks", "device_tables", "host_tables"]

TAG_THREADS = 128
XOR_THREADS = 256

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


@cuda.jit(device=True)
def _shoup(vh, vl, hh, hl):  # type: ignore[no-untyped-def]
    """Shoup's 4-bit tables of V = (vh, vl): hh/hl[i] = i * V in GF(2^128)."""
    one = _U(1)
    hh[0] = _U(0)
    hl[0] = _U(0)
    hh[8] = vh
    hl[8] = vl
    i = 4
    while i > 0:
        t = (vl & one) * _U(0xE1000000)
        vl = (vh << _U(63)) | (vl >> one)
        vh = (vh >> one) ^ (t << _U(32))
        hh[i] = vh
        hl[i] = vl
        i >>= 1
    i = 2
    while i <= 8:
        for j in range(1, i):
            hh[i + j] = hh[i] ^ hh[j]
            hl[i + j] = hl[i] ^ hl[j]
        i *= 2


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


@cuda.jit(device=True, inline=True)
def _be(buf, base, j, limit):  # type: ignore[no-untyped-def]
    """Eight big-endian bytes at buf[base + j ..] as uint64, zeros past *limit* bytes."""
    v = _U(0)
    for k in range(8):
        b = _U(buf[base + j + k]) if j + k < limit else _U(0)
        v = (v << _U(8)) | b
    return v


@cuda.jit(device=True)
def _load(v, z, aad, aad_len, ct, base, n, w):  # type: ignore[no-untyped-def]
    """Virtual GHASH block v of a chunk into w[0], w[1]; False for the front padding."""
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
        w[0] = _be(ct, base + off, 0, n - off)
        w[1] = _be(ct, base + off, 8, n - off)
    else:
        w[0] = _U(aad_len) * _U(8)
        w[1] = _U(n) * _U(8)
    return True


@cuda.jit(cache=True)
def _tag_kernel(rk, te, sb, last4, h_tab, nonces, aad, ct, chunk_size, last_len, ok):  # type: ignore[no-untyped-def]
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    aad_len = aad.shape[0]
    n, base, seg, z = segments(c, nt, nonces.shape[0], chunk_size, last_len, aad_len)

    hh = cuda.shared.array(16, uint64)
    hl = cuda.shared.array(16, uint64)
    for i in range(t, 16, nt):
        hh[i] = h_tab[0, i]
        hl[i] = h_tab[1, i]
    cuda.syncthreads()
    y = cuda.local.array(2, uint64)
    w = cuda.local.array(2, uint64)
    y[0] = _U(0)
    y[1] = _U(0)
    for v in range(t * seg, (t + 1) * seg):
        if _load(v, z, aad, aad_len, ct, base, n, w):
            _gmul(y[0] ^ w[0], y[1] ^ w[1], hh, hl, last4, y)
    parts = cuda.shared.array((TAG_THREADS, 2), uint64)
    parts[t, 0] = y[0]
    parts[t, 1] = y[1]
    cuda.syncthreads()
    if t == 0:
        # H^L by square-and-multiply, each step through the tables of its operand.
        ph = cuda.local.array(16, uint64)
        pl = cuda.local.array(16, uint64)
        acc = cuda.local.array(2, uint64)
        sq = cuda.local.array(2, uint64)
        sq[0] = hh[8]  # H itself: the table entry of the nibble 8 (= x^0)
        sq[1] = hl[8]
        have = False
        e = seg
        while e > 0:
            if e & 1:
                if have:
                    _shoup(sq[0], sq[1], ph, pl)
                    _gmul(acc[0], acc[1], ph, pl, last4, acc)
                else:
                    acc[0] = sq[0]
                    acc[1] = sq[1]
                    have = True
            e >>= 1
            if e:
                _shoup(sq[0], sq[1], ph, pl)
                _gmul(sq[0], sq[1], ph, pl, last4, sq)
        _shoup(acc[0], acc[1], ph, pl)  # tables of H^L
        y[0] = _U(0)
        y[1] = _U(0)
        for s in range(nt):  # Y = Y * H^L + y_s
            _gmul(y[0], y[1], ph, pl, last4, y)
            y[0] ^= parts[s, 0]
            y[1] ^= parts[s, 1]
        ek = cuda.local.array(4, uint64)
        _encrypt(rk, te, sb, _U(nonces[c, 0]), _U(nonces[c, 1]), _U(nonces[c, 2]), _U(1), ek)
        diff = _U(0)
        tag = base + n
        for k in range(16):
            word = ek[k // 4]
            mask = (word >> _U(24 - 8 * (k % 4))) & _M8
            yv = y[0] if k < 8 else y[1]
            yb = (yv >> _U(56 - 8 * (k % 8))) & _M8
            diff |= (mask ^ yb) ^ _U(ct[tag + k])
        ok[c] = 1 if diff == 0 else 0
        for k in range(4):
            ek[k] = _U(0)


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
    c, b, start, end = piece(cuda.grid(1), 16, nonces.shape[0], chunk_size, last_len, ok, out)
    if c < 0:
        return
    dst = c * chunk_size + start
    src = c * (chunk_size + 16) + start
    ks = cuda.local.array(4, uint64)
    ctr = (_U(b) + _U(2)) & _M32
    _encrypt(rk, te, sb, _U(nonces[c, 0]), _U(nonces[c, 1]), _U(nonces[c, 2]), ctr, ks)
    done = 0
    if (  # word-wise where both sides are aligned and have words (see cuda_common.words)
        src % 4 == 0
        and dst % 4 == 0
        and (src + end - start) // 4 <= ct32.shape[0]
        and (dst + end - start) // 4 <= out32.shape[0]
    ):
        done = 4 * ((end - start) // 4)
        for k in range(done // 4):
            w = ks[k]  # big-endian keystream word, byte-swapped to the load's order
            le = (
                ((w >> _U(24)) & _M8)
                | ((w >> _U(8)) & _U(0xFF00))
                | ((w << _U(8)) & _U(0xFF0000))
                | ((w << _U(24)) & _U(0xFF000000))
            )
            out32[dst // 4 + k] = np.uint32((_U(ct32[src // 4 + k]) ^ le) & _M32)
    for k in range(done, end - start):
        byte = (ks[k // 4] >> _U(24 - 8 * (k % 4))) & _M8
        out[dst + k] = np.uint8(_U(ct[src + k]) ^ byte)
    for k in range(4):
        ks[k] = _U(0)


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
) -> None:
    """Authenticate and decrypt a batch of AES-GCM chunks, all in device memory.

    Args:
        rk: device uint32[4 * (rounds + 1)], the expanded payload key.
        h_tab: device uint64[2, 16], Shoup's tables of H = E_K(0^128).
        tables: ``device_tables()``.
        nonces: device uint32[count, 3], each chunk's nonce as *big-endian* words.
        Others as ``cuda_chacha.decrypt_chunks``.
    """
    check_tag_threads(tag_threads, TAG_THREADS)
    te, sb, last4 = tables
    count = nonces.shape[0]  # type: ignore[attr-defined]
    _tag_kernel[count, tag_threads, stream](
        rk, te, sb, last4, h_tab, nonces, aad, ct, chunk_size, last_len, ok
    )
    grid = xor_grid(count, chunk_size, 16, XOR_THREADS)
    _xor_kernel[grid, XOR_THREADS, stream](
        rk, te, sb, nonces, ct, words(ct), chunk_size, last_len, ok, out, words(out)
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
