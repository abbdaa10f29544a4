"""ChaCha20 and Poly1305 (RFC 8439) as numba CPU kernels, and the AEAD built from them.

The reference for the CUDA kernels and a path that needs no OpenSSL. Both
primitives work on many blocks at once so LLVM turns the inner loops into SIMD:

* ChaCha20 computes ``LANES`` blocks side by side: its state is a 16 x LANES
  array and every quarter-round is a loop over the lanes.
* Poly1305 runs ``LANES`` interleaved Horner chains. Block j of n goes to
  chain j mod LANES; every step multiplies by r^LANES except the last row,
  where chain k multiplies by r^(LANES-k), so block j ends up weighted by
  r^(n-j) as the sequential definition says. The sequence is virtually
  left-padded with zero blocks to a multiple of LANES (a zero block adds
  nothing to a chain that starts at zero). The GPU kernel splits a chunk the
  same way. Limbs are 26 bits in 64-bit integers (poly1305-donna's).

Every kernel is ``nogil``: callers run one chunk per thread.
"""

from __future__ import annotations

import sys

import numpy as np
from numba import njit

from sealstore.native.common import tags_equal

__all__ = ["LANES", "aead_decrypt", "aead_encrypt", "chacha20_block", "chacha20_xor", "poly1305"]

if sys.byteorder != "little":  # keystream words are read as little-endian bytes
    raise ImportError("sealstore.native needs a little-endian machine")

LANES = 16
_SIGMA = np.array([0x61707865, 0x3320646E, 0x79622D32, 0x6B206574], dtype=np.uint32)
_M26 = np.uint64(0x3FFFFFF)


@njit(cache=True, nogil=True, inline="always")
def _rotl(v: np.uint32, c: int) -> np.uint32:
    return np.uint32((v << np.uint32(c)) | (v >> np.uint32(32 - c)))


@njit(cache=True, nogil=True, inline="always")
def _qr(a: np.uint32, b: np.uint32, c: np.uint32, d: np.uint32) -> tuple:
    a = np.uint32(a + b)
    d = _rotl(np.uint32(d ^ a), 16)
    c = np.uint32(c + d)
    b = _rotl(np.uint32(b ^ c), 12)
    a = np.uint32(a + b)
    d = _rotl(np.uint32(d ^ a), 8)
    c = np.uint32(c + d)
    b = _rotl(np.uint32(b ^ c), 7)
    return a, b, c, d


@njit(cache=True, nogil=True, inline="always")
def _double_round(s: tuple) -> tuple:
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = s
    x0, x4, x8, x12 = _qr(x0, x4, x8, x12)
    x1, x5, x9, x13 = _qr(x1, x5, x9, x13)
    x2, x6, x10, x14 = _qr(x2, x6, x10, x14)
    x3, x7, x11, x15 = _qr(x3, x7, x11, x15)
    x0, x5, x10, x15 = _qr(x0, x5, x10, x15)
    x1, x6, x11, x12 = _qr(x1, x6, x11, x12)
    x2, x7, x8, x13 = _qr(x2, x7, x8, x13)
    x3, x4, x9, x14 = _qr(x3, x4, x9, x14)
    return x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15


@njit(cache=True, nogil=True)
def _blocks(key: np.ndarray, nonce: np.ndarray, counter: int, x: np.ndarray) -> None:
    """Keystream blocks counter .. counter+LANES-1: word w of block j into x[w, j].

    The loop over blocks holds the whole state in scalars, with the ten
    double rounds written out (inlined), so LLVM vectorises it as one loop:
    each state word is one SIMD register of LANES blocks, and the state
    never goes through memory between rounds (measured: 3.2 GB/s against
    2.0 for a quarter-round-at-a-time loop over a state array).
    """
    k0, k1, k2, k3 = key[0], key[1], key[2], key[3]
    k4, k5, k6, k7 = key[4], key[5], key[6], key[7]
    n0, n1, n2 = nonce[0], nonce[1], nonce[2]
    c0, c1, c2, c3 = _SIGMA[0], _SIGMA[1], _SIGMA[2], _SIGMA[3]
    for j in range(LANES):
        ctr = np.uint32(counter + j)
        s = (c0, c1, c2, c3, k0, k1, k2, k3, k4, k5, k6, k7, ctr, n0, n1, n2)
        s = _double_round(s)
        s = _double_round(s)
        s = _double_round(s)
        s = _double_round(s)
        s = _double_round(s)
        s = _double_round(s)
        s = _double_round(s)
        s = _double_round(s)
        s = _double_round(s)
        s = _double_round(s)
        x[0, j] = s[0] + c0
        x[1, j] = s[1] + c1
        x[2, j] = s[2] + c2
        x[3, j] = s[3] + c3
        x[4, j] = s[4] + k0
        x[5, j] = s[5] + k1
        x[6, j] = s[6] + k2
        x[7, j] = s[7] + k3
        x[8, j] = s[8] + k4
        x[9, j] = s[9] + k5
        x[10, j] = s[10] + k6
        x[11, j] = s[11] + k7
        x[12, j] = s[12] + ctr
        x[13, j] = s[13] + n0
        x[14, j] = s[14] + n1
        x[15, j] = s[15] + n2


@njit(cache=True, nogil=True)
def chacha20_xor(
    key: np.ndarray, nonce: np.ndarray, counter: int, src: np.ndarray, dst: np.ndarray
) -> None:
    """``dst = src XOR keystream`` from block *counter* on (RFC 8439 section 2.4).

    *key*: 8 uint32 words, *nonce*: 3 (little-endian, as the RFC reads them);
    *src*, *dst*: uint8 arrays of one length (they may be the same array). The
    32-bit block counter must not wrap: at most 256 GiB from counter 0.
    """
    n = src.shape[0]
    x = np.empty((16, LANES), dtype=np.uint32)
    pos = 0
    block = counter
    while pos < n:
        _blocks(key, nonce, block, x)
        if pos + 64 * LANES <= n:
            for j in range(LANES):
                for w in range(16):
                    v = x[w, j]
                    p = pos + 64 * j + 4 * w
                    dst[p] = src[p] ^ np.uint8(v & 255)
                    dst[p + 1] = src[p + 1] ^ np.uint8((v >> 8) & 255)
                    dst[p + 2] = src[p + 2] ^ np.uint8((v >> 16) & 255)
                    dst[p + 3] = src[p + 3] ^ np.uint8(v >> 24)
        else:
            for i in range(n - pos):
                v = x[(i % 64) // 4, i // 64]
                dst[pos + i] = src[pos + i] ^ np.uint8((v >> (8 * (i % 4))) & 255)
        pos += 64 * LANES
        block += LANES
    x[:] = 0


@njit(cache=True, nogil=True)
def chacha20_block(key: np.ndarray, nonce: np.ndarray, counter: int, out: np.ndarray) -> None:
    """The 64-byte keystream block *counter* into *out* (uint8[64])."""
    x = np.empty((16, LANES), dtype=np.uint32)
    _blocks(key, nonce, counter, x)
    for w in range(16):
        v = x[w, 0]
        for b in range(4):
            out[4 * w + b] = (v >> (8 * b)) & 255
    x[:] = 0


# --------------------------------------------------------------------------- Poly1305


@njit(cache=True, nogil=True, inline="always")
def _le32(b: np.ndarray, p: int) -> np.uint64:
    return (
        np.uint64(b[p])
        | (np.uint64(b[p + 1]) << np.uint64(8))
        | (np.uint64(b[p + 2]) << np.uint64(16))
        | (np.uint64(b[p + 3]) << np.uint64(24))
    )


@njit(cache=True, nogil=True, inline="always")
def _limbs(b: np.ndarray, p: int, out: np.ndarray, k: int) -> None:
    """The 16 little-endian bytes b[p:p+16] as five 26-bit limbs in out[0..4, k]."""
    t0, t1, t2, t3 = _le32(b, p), _le32(b, p + 4), _le32(b, p + 8), _le32(b, p + 12)
    out[0, k] = t0 & _M26
    out[1, k] = ((t0 >> np.uint64(26)) | (t1 << np.uint64(6))) & _M26
    out[2, k] = ((t1 >> np.uint64(20)) | (t2 << np.uint64(12))) & _M26
    out[3, k] = ((t2 >> np.uint64(14)) | (t3 << np.uint64(18))) & _M26
    out[4, k] = t3 >> np.uint64(8)


@njit(cache=True, nogil=True, inline="always")
def _mulmod(h: np.ndarray, hk: int, r: np.ndarray, rk: int) -> None:
    """h[:, hk] *= r[:, rk] mod 2^130-5, limbs left just over 26 bits (donna's bound)."""
    h0, h1, h2, h3, h4 = h[0, hk], h[1, hk], h[2, hk], h[3, hk], h[4, hk]
    r0, r1, r2, r3, r4 = r[0, rk], r[1, rk], r[2, rk], r[3, rk], r[4, rk]
    five = np.uint64(5)
    s1, s2, s3, s4 = r1 * five, r2 * five, r3 * five, r4 * five
    d0 = h0 * r0 + h1 * s4 + h2 * s3 + h3 * s2 + h4 * s1
    d1 = h0 * r1 + h1 * r0 + h2 * s4 + h3 * s3 + h4 * s2
    d2 = h0 * r2 + h1 * r1 + h2 * r0 + h3 * s4 + h4 * s3
    d3 = h0 * r3 + h1 * r2 + h2 * r1 + h3 * r0 + h4 * s4
    d4 = h0 * r4 + h1 * r3 + h2 * r2 + h3 * r1 + h4 * r0
    s = np.uint64(26)
    d1 += d0 >> s
    d2 += d1 >> s
    d3 += d2 >> s
    d4 += d3 >> s
    c = d4 >> s
    h0 = (d0 & _M26) + c * five
    h1 = (d1 & _M26) + (h0 >> s)
    h[0, hk] = h0 & _M26
    h[1, hk] = h1
    h[2, hk] = d2 & _M26
    h[3, hk] = d3 & _M26
    h[4, hk] = d4 & _M26


@njit(cache=True, nogil=True)
def _poly_init(otk: np.ndarray, rp: np.ndarray) -> None:
    """Clamp r (RFC 8439 2.5.1) from the one-time key; rp[:, i] = r^(i+1), i < LANES."""
    r = np.empty(16, dtype=np.uint8)
    r[:] = otk[:16]
    for i in (3, 7, 11, 15):
        r[i] &= 15
    for i in (4, 8, 12):
        r[i] &= 252
    _limbs(r, 0, rp, 0)
    for i in range(1, rp.shape[1]):
        for w in range(5):
            rp[w, i] = rp[w, i - 1]
        _mulmod(rp, i, rp, 0)
    r[:] = 0


@njit(cache=True, nogil=True)
def _absorb(
    h: np.ndarray, rp: np.ndarray, data: np.ndarray, start: int, blocks: int, v: int, last_row: int
) -> int:
    """Absorb *blocks* whole 16-byte blocks of data[start:]; *v* is the first one's virtual index.

    Returns the next virtual index. Blocks at virtual index >= *last_row* are
    in the final row and take r^(LANES-k); all others r^LANES.
    """
    m = np.empty((5, LANES), dtype=np.uint64)
    hib = np.uint64(1) << np.uint64(24)
    b = 0
    while b < blocks:
        k = v % LANES
        if k == 0 and v + LANES <= last_row and blocks - b >= LANES:
            # A whole row before the last: the same step on every chain (SIMD).
            for q in range(LANES):
                _limbs(data, start + 16 * (b + q), m, q)
            for q in range(LANES):
                for w in range(5):
                    h[w, q] += m[w, q]
                h[4, q] += hib
            for q in range(LANES):
                _mulmod(h, q, rp, LANES - 1)
            b += LANES
            v += LANES
            continue
        _limbs(data, start + 16 * b, m, k)
        for w in range(5):
            h[w, k] += m[w, k]
        h[4, k] += hib
        _mulmod(h, k, rp, LANES - 1 - k if v >= last_row else LANES - 1)
        b += 1
        v += 1
    m[:] = 0
    return v


@njit(cache=True, nogil=True, inline="always")
def _put32(out: np.ndarray, p: int, v: np.uint64) -> None:
    for i in range(4):
        out[p + i] = (v >> np.uint64(8 * i)) & np.uint64(255)


@njit(cache=True, nogil=True)
def _finish(h: np.ndarray, otk: np.ndarray, tag: np.ndarray) -> None:
    """Sum the chains, reduce mod 2^130-5 fully, add s, write the 16-byte tag."""
    s = np.uint64(26)
    five = np.uint64(5)
    a = np.zeros(5, dtype=np.uint64)
    for k in range(h.shape[1]):
        for w in range(5):
            a[w] += h[w, k]
    # Two carry passes with the 2^130 = 5 wrap take the sum (limbs < 2^31)
    # under 2^130 + small; a last pass without the wrap makes limbs 0-3 exact.
    for _ in range(2):
        for w in range(4):
            a[w + 1] += a[w] >> s
            a[w] &= _M26
        a[0] += (a[4] >> s) * five
        a[4] &= _M26
    for w in range(4):
        a[w + 1] += a[w] >> s
        a[w] &= _M26
    # g = h + 5 - 2^130; keep it when non-negative, i.e. when h >= p
    # (selected with masks, not a branch).
    g = np.zeros(5, dtype=np.uint64)
    c = five
    for w in range(4):
        g[w] = a[w] + c
        c = g[w] >> s
        g[w] &= _M26
    g[4] = a[4] + c - (np.uint64(1) << s)
    use_g = np.uint64(0) - ((g[4] >> np.uint64(63)) ^ np.uint64(1))
    for w in range(5):
        a[w] = (a[w] & ~use_g) | (g[w] & use_g)
    # 130 bits -> four 32-bit words (mod 2^128), then + s mod 2^128.
    m32 = np.uint64(0xFFFFFFFF)
    words = (
        (a[0] | (a[1] << np.uint64(26))) & m32,
        ((a[1] >> np.uint64(6)) | (a[2] << np.uint64(20))) & m32,
        ((a[2] >> np.uint64(12)) | (a[3] << np.uint64(14))) & m32,
        ((a[3] >> np.uint64(18)) | (a[4] << np.uint64(8))) & m32,
    )
    f = np.uint64(0)
    for i in range(4):
        f = words[i] + _le32(otk, 16 + 4 * i) + (f >> np.uint64(32))
        _put32(tag, 4 * i, f & m32)
    a[:] = 0
    g[:] = 0


@njit(cache=True, nogil=True)
def _padded(h: np.ndarray, rp: np.ndarray, data: np.ndarray, v: int, last_row: int) -> int:
    """Absorb *data* zero-padded to whole blocks (the AEAD's padding)."""
    n = data.shape[0]
    full = n // 16
    v = _absorb(h, rp, data, 0, full, v, last_row)
    if n % 16:
        tail = np.zeros(16, dtype=np.uint8)
        tail[: n % 16] = data[full * 16 :]
        v = _absorb(h, rp, tail, 0, 1, v, last_row)
        tail[:] = 0
    return v


@njit(cache=True, nogil=True)
def _aead_tag(
    key: np.ndarray, nonce: np.ndarray, aad: np.ndarray, ct: np.ndarray, tag: np.ndarray
) -> None:
    """The RFC 8439 section 2.8 tag of (aad, ct) under (key, nonce) into *tag*."""
    otk = np.empty(64, dtype=np.uint8)
    chacha20_block(key, nonce, 0, otk)
    rp = np.empty((5, LANES), dtype=np.uint64)
    _poly_init(otk, rp)
    n = (aad.shape[0] + 15) // 16 + (ct.shape[0] + 15) // 16 + 1
    v = (-n) % LANES  # virtual zero blocks in front
    last_row = v + n - LANES
    h = np.zeros((5, LANES), dtype=np.uint64)
    v = _padded(h, rp, aad, v, last_row)
    v = _padded(h, rp, ct, v, last_row)
    lengths = np.zeros(16, dtype=np.uint8)
    la, lc = aad.shape[0], ct.shape[0]
    for i in range(8):
        lengths[i] = (la >> (8 * i)) & 255
        lengths[8 + i] = (lc >> (8 * i)) & 255
    _absorb(h, rp, lengths, 0, 1, v, last_row)
    _finish(h, otk, tag)
    otk[:] = 0
    rp[:] = 0
    h[:] = 0


@njit(cache=True, nogil=True)
def poly1305(otk: np.ndarray, msg: np.ndarray, tag: np.ndarray) -> None:
    """Poly1305 (RFC 8439 section 2.5) of *msg* under the 32-byte one-time key *otk*."""
    rp = np.empty((5, LANES), dtype=np.uint64)
    _poly_init(otk, rp)
    n = msg.shape[0]
    full = n // 16
    blocks = full + (1 if n % 16 else 0)
    v = (-blocks) % LANES
    last_row = v + blocks - LANES
    h = np.zeros((5, LANES), dtype=np.uint64)
    v = _absorb(h, rp, msg, 0, full, v, last_row)
    if n % 16:
        # A short final block: 0x01 after its bytes, no 2^128 bit.
        tail = np.zeros(16, dtype=np.uint8)
        tail[: n % 16] = msg[full * 16 :]
        tail[n % 16] = 1
        m = np.zeros((5, LANES), dtype=np.uint64)
        k = v % LANES
        _limbs(tail, 0, m, k)
        for w in range(5):
            h[w, k] += m[w, k]
        _mulmod(h, k, rp, LANES - 1 - k if v >= last_row else LANES - 1)
    _finish(h, otk, tag)
    rp[:] = 0
    h[:] = 0


@njit(cache=True, nogil=True)
def aead_encrypt(
    key: np.ndarray, nonce: np.ndarray, aad: np.ndarray, src: np.ndarray, dst: np.ndarray
) -> None:
    """ChaCha20-Poly1305 seal: dst[:n] = ciphertext, dst[n:n+16] = tag (n = len(src))."""
    n = src.shape[0]
    chacha20_xor(key, nonce, 1, src, dst[:n])
    _aead_tag(key, nonce, aad, dst[:n], dst[n : n + 16])


@njit(cache=True, nogil=True)
def aead_decrypt(
    key: np.ndarray, nonce: np.ndarray, aad: np.ndarray, src: np.ndarray, dst: np.ndarray
) -> bool:
    """ChaCha20-Poly1305 open: the tag is checked first; only then is dst written.

    *src* is ciphertext + 16-byte tag; *dst* gets len(src) - 16 bytes. Returns
    False (dst untouched) when the tag does not match.
    """
    n = src.shape[0] - 16
    if n < 0:
        return False
    tag = np.empty(16, dtype=np.uint8)
    _aead_tag(key, nonce, aad, src[:n], tag)
    if not tags_equal(tag, src[n:]):
        return False
    chacha20_xor(key, nonce, 1, src[:n], dst[:n])
    return True
