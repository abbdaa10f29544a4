"""GCM's GF(2^128) pieces that the CPU and the CUDA kernels both compile.

Plain functions, not decorated: ``aes`` compiles them with ``njit`` and
``cuda_aes`` with ``cuda.jit(device=True)`` (numba compiles one Python
function for either target), so the table builder is written once.
128-bit values are (hi, lo) uint64 pairs in GCM's big-endian bit order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["shoup_tables"]

_U = np.uint64


def shoup_tables(vh, vl, hh, hl):  # type: ignore[no-untyped-def]
    """Shoup's 4-bit tables of V = (vh, vl): hh/hl[i] = i * V for the 16 nibbles."""
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
