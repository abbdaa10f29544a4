"""What the CPU kernels share."""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["tags_equal"]


@njit(cache=True, nogil=True)
def tags_equal(tag: np.ndarray, stored: np.ndarray) -> bool:
    """Compare two 16-byte tags in constant time (every byte is read, no early exit)."""
    diff = 0
    for i in range(16):
        diff |= tag[i] ^ stored[i]
    return diff == 0
