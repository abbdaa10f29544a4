"""AES (FIPS 197) and GCM (SP 800-38D) as numba CPU kernels: the reference for the GPU.

Table-driven: four 256-word round tables for the cipher and Shoup's 4-bit
tables for GHASH. Tables indexed by secret bytes leak through cache timing,
so this path is a reference and a fallback where OpenSSL is not available,
not the default: the CPU loaders use OpenSSL's AES-NI code, which is
constant-time. The tables are built here from the S-box's definition (the
GF(2^8) inverse and the affine map), not typed in.

96-bit nonces only (the sealed format's); the tag is checked before any
plaintext is written.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from sealstore.native import gf128
from sealstore.native.common import tags_equal

__all__ = ["expand_key", "gcm_decrypt", "gcm_encrypt"]


def _sbox() -> np.ndarray:
    def mul(a: int, b: int) -> int:
        r = 0
        while b:
            if b & 1:
                r ^= a
            a = ((a << 1) ^ 0x11B) if a & 0x80 else a << 1
            b >>= 1
        return r

    inv = [0] * 256
    for a in range(1, 256):
        for b in range(1, 256):
            if mul(a, b) == 1:
                inv[a] = b
                break
    box = np.empty(256, dtype=np.uint32)
    for x in range(256):
        b = inv[x]
        s = b
        for k in range(1, 5):
            s ^= ((b << k) | (b >> (8 - k))) & 0xFF
        box[x] = s ^ 0x63
    return box


def _tables(box: np.ndarray) -> np.ndarray:
    te = np.empty((4, 256), dtype=np.uint32)
    for x in range(256):
        s = int(box[x])
        s2 = ((s << 1) ^ 0x11B) & 0xFF if s & 0x80 else s << 1
        w = (s2 << 24) | (s << 16) | (s << 8) | (s2 ^ s)
        for k in range(4):
            te[k, x] = ((w >> (8 * k)) | (w << (32 - 8 * k))) & 0xFFFFFFFF
    return te


_S = _sbox()
_TE = _tables(_S)
_RCON = np.array([0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x1B, 0x36], dtype=np.uint32)
# GHASH reduction of the four bits shifted out (Shoup's table, from 0xE1 << 120).
_LAST4 = np.zeros(16, dtype=np.uint64)
for _i in range(16):
    for _b in range(4):
        if _i >> (3 - _b) & 1:
            _LAST4[_i] ^= np.uint64(0xE100 >> _b)


@njit(cache=True, nogil=True)
def _sub_word(w: np.uint32) -> np.uint32:
    return np.uint32(
        (_S[(w >> 24) & 255] << 24)
        | (_S[(w >> 16) & 255] << 16)
        | (_S[(w >> 8) & 255] << 8)
        | _S[w & 255]
    )


@njit(cache=True, nogil=True)
def expand_key(key: np.ndarray) -> np.ndarray:
    """The round keys (4 * (rounds + 1) big-endian words) of a 16-, 24- or 32-byte key."""
    nk = key.shape[0] // 4
    rounds = nk + 6
    w = np.empty(4 * (rounds + 1), dtype=np.uint32)
    for i in range(nk):
        w[i] = np.uint32(
            (np.uint32(key[4 * i]) << 24)
            | (np.uint32(key[4 * i + 1]) << 16)
            | (np.uint32(key[4 * i + 2]) << 8)
            | np.uint32(key[4 * i + 3])
        )
    for i in range(nk, w.shape[0]):
        t = w[i - 1]
        if i % nk == 0:
            t = _sub_word(np.uint32((t << 8) | (t >> 24))) ^ np.uint32(_RCON[i // nk - 1] << 24)
        elif nk > 6 and i % nk == 4:
            t = _sub_word(t)
        w[i] = w[i - nk] ^ t
    return w


@njit(cache=True, nogil=True)
def _encrypt_block(rk: np.ndarray, inp: np.ndarray, out: np.ndarray) -> None:
    """AES-encrypt the 16 bytes *inp* into *out* (uint8 arrays)."""
    rounds = rk.shape[0] // 4 - 1
    s = np.empty(4, dtype=np.uint32)
    t = np.empty(4, dtype=np.uint32)
    for c in range(4):
        s[c] = (
            np.uint32(
                (np.uint32(inp[4 * c]) << 24)
                | (np.uint32(inp[4 * c + 1]) << 16)
                | (np.uint32(inp[4 * c + 2]) << 8)
                | np.uint32(inp[4 * c + 3])
            )
            ^ rk[c]
        )
    for r in range(1, rounds):
        for c in range(4):
            t[c] = (
                _TE[0, (s[c] >> 24) & 255]
                ^ _TE[1, (s[(c + 1) % 4] >> 16) & 255]
                ^ _TE[2, (s[(c + 2) % 4] >> 8) & 255]
                ^ _TE[3, s[(c + 3) % 4] & 255]
                ^ rk[4 * r + c]
            )
        s[:] = t
    for c in range(4):
        v = (
            np.uint32(
                (_S[(s[c] >> 24) & 255] << 24)
                | (_S[(s[(c + 1) % 4] >> 16) & 255] << 16)
                | (_S[(s[(c + 2) % 4] >> 8) & 255] << 8)
                | _S[s[(c + 3) % 4] & 255]
            )
            ^ rk[4 * rounds + c]
        )
        out[4 * c] = (v >> 24) & 255
        out[4 * c + 1] = (v >> 16) & 255
        out[4 * c + 2] = (v >> 8) & 255
        out[4 * c + 3] = v & 255
    s[:] = 0
    t[:] = 0


@njit(cache=True, nogil=True)
def _be64(b: np.ndarray, p: int) -> np.uint64:
    v = np.uint64(0)
    for i in range(8):
        v = (v << np.uint64(8)) | np.uint64(b[p + i])
    return v


_shoup = njit(cache=True, nogil=True)(gf128.shoup_tables)


@njit(cache=True, nogil=True)
def _ghash_tables(h: np.ndarray, hh: np.ndarray, hl: np.ndarray) -> None:
    """Shoup's 4-bit tables of H: hh/hl[i] = i * H for the 16 nibbles (GCM's bit order)."""
    _shoup(_be64(h, 0), _be64(h, 8), hh, hl)


@njit(cache=True, nogil=True)
def _ghash_block(y: np.ndarray, hh: np.ndarray, hl: np.ndarray) -> None:
    """y = y * H in GF(2^128) (y: 16 bytes, updated in place)."""
    four = np.uint64(4)
    lo = y[15] & 15
    zh, zl = hh[lo], hl[lo]
    for i in range(15, -1, -1):
        lo = y[i] & 15
        hi = (y[i] >> 4) & 15
        if i != 15:
            rem = zl & np.uint64(15)
            zl = (zh << np.uint64(60)) | (zl >> four)
            zh = (zh >> four) ^ (_LAST4[rem] << np.uint64(48))
            zh ^= hh[lo]
            zl ^= hl[lo]
        rem = zl & np.uint64(15)
        zl = (zh << np.uint64(60)) | (zl >> four)
        zh = (zh >> four) ^ (_LAST4[rem] << np.uint64(48))
        zh ^= hh[hi]
        zl ^= hl[hi]
    for i in range(8):
        y[i] = (zh >> np.uint64(56 - 8 * i)) & np.uint64(255)
        y[8 + i] = (zl >> np.uint64(56 - 8 * i)) & np.uint64(255)


@njit(cache=True, nogil=True)
def _ghash(y: np.ndarray, hh: np.ndarray, hl: np.ndarray, data: np.ndarray) -> None:
    """Absorb *data*, zero-padded to whole blocks, into y."""
    n = data.shape[0]
    for p in range(0, n, 16):
        for i in range(min(16, n - p)):
            y[i] ^= data[p + i]
        _ghash_block(y, hh, hl)


@njit(cache=True, nogil=True)
def _ctr(rk: np.ndarray, nonce: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    """dst = src XOR AES-CTR keystream from counter 2 (GCM with a 96-bit nonce)."""
    cb = np.zeros(16, dtype=np.uint8)
    cb[:12] = nonce
    ks = np.empty(16, dtype=np.uint8)
    n = src.shape[0]
    ctr = 2
    for p in range(0, n, 16):
        cb[12] = (ctr >> 24) & 255
        cb[13] = (ctr >> 16) & 255
        cb[14] = (ctr >> 8) & 255
        cb[15] = ctr & 255
        _encrypt_block(rk, cb, ks)
        for i in range(min(16, n - p)):
            dst[p + i] = src[p + i] ^ ks[i]
        ctr = (ctr + 1) & 0xFFFFFFFF
    ks[:] = 0


@njit(cache=True, nogil=True)
def _tag(
    rk: np.ndarray, nonce: np.ndarray, aad: np.ndarray, ct: np.ndarray, tag: np.ndarray
) -> None:
    h = np.zeros(16, dtype=np.uint8)
    _encrypt_block(rk, np.zeros(16, dtype=np.uint8), h)
    hh = np.empty(16, dtype=np.uint64)
    hl = np.empty(16, dtype=np.uint64)
    _ghash_tables(h, hh, hl)
    y = np.zeros(16, dtype=np.uint8)
    _ghash(y, hh, hl, aad)
    _ghash(y, hh, hl, ct)
    lengths = np.zeros(16, dtype=np.uint8)
    la, lc = aad.shape[0] * 8, ct.shape[0] * 8
    for i in range(8):
        lengths[7 - i] = (la >> (8 * i)) & 255
        lengths[15 - i] = (lc >> (8 * i)) & 255
    _ghash(y, hh, hl, lengths)
    j0 = np.zeros(16, dtype=np.uint8)
    j0[:12] = nonce
    j0[15] = 1
    ek = np.empty(16, dtype=np.uint8)
    _encrypt_block(rk, j0, ek)
    for i in range(16):
        tag[i] = y[i] ^ ek[i]
    h[:] = 0
    hh[:] = 0
    hl[:] = 0
    ek[:] = 0


@njit(cache=True, nogil=True)
def gcm_encrypt(
    rk: np.ndarray, nonce: np.ndarray, aad: np.ndarray, src: np.ndarray, dst: np.ndarray
) -> None:
    """Seal: dst[:n] = ciphertext, dst[n:n+16] = tag (n = len(src); nonce: 12 bytes)."""
    n = src.shape[0]
    _ctr(rk, nonce, src, dst[:n])
    _tag(rk, nonce, aad, dst[:n], dst[n : n + 16])


@njit(cache=True, nogil=True)
def gcm_decrypt(
    rk: np.ndarray, nonce: np.ndarray, aad: np.ndarray, src: np.ndarray, dst: np.ndarray
) -> bool:
    """Open: check the tag of src (ciphertext + tag) first; only then write dst. False if bad."""
    n = src.shape[0] - 16
    if n < 0:
        return False
    tag = np.empty(16, dtype=np.uint8)
    _tag(rk, nonce, aad, src[:n], tag)
    if not tags_equal(tag, src[n:]):
        return False
    _ctr(rk, nonce, src[:n], dst[:n])
    return True
