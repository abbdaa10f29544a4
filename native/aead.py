"""The numba kernels behind the interface of cryptography's AEAD classes.

``ChaCha20Poly1305(key)`` and ``AESGCM(key)`` here have ``encrypt_into`` /
``decrypt_into`` / ``encrypt`` / ``decrypt`` with cryptography's signatures
and errors (``InvalidTag``), so the stream can use either engine unchanged.
Each call runs with the GIL released; the key schedule lives in a numpy
array that is wiped by :meth:`close` (and on garbage collection).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag

__all__ = ["ChaCha20Poly1305"]

_EMPTY = np.zeros(0, dtype=np.uint8)


def _u8(buf: Any) -> np.ndarray:
    if buf is None:
        return _EMPTY
    return np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)


class ChaCha20Poly1305:
    """ChaCha20-Poly1305 (RFC 8439) on the numba CPU kernels."""

    def __init__(self, key: bytes | bytearray | memoryview) -> None:
        raw = memoryview(key).cast("B")
        if len(raw) != 32:
            raise ValueError("ChaCha20Poly1305 key must be 32 bytes")
        self._key = np.frombuffer(raw, dtype="<u4").astype(np.uint32)

    def __repr__(self) -> str:
        return "<native ChaCha20Poly1305>"

    def close(self) -> None:
        self._key[:] = 0

    def __del__(self) -> None:
        key = getattr(self, "_key", None)
        if key is not None:
            key[:] = 0

    @staticmethod
    def _nonce(nonce: Any) -> np.ndarray:
        raw = memoryview(nonce).cast("B")
        if len(raw) != 12:
            raise ValueError("Nonce must be 12 bytes")
        return np.frombuffer(raw, dtype="<u4").astype(np.uint32)

    def encrypt_into(self, nonce: Any, data: Any, associated_data: Any, buf: Any) -> int:
        from sealstore.native import chacha

        src, out = _u8(data), _u8(buf)
        if not out.flags.writeable or len(out) != len(src) + 16:
            raise ValueError("buffer must be writable and len(data) + 16 bytes")
        chacha.aead_encrypt(self._key, self._nonce(nonce), _u8(associated_data), src, out)
        return len(out)

    def decrypt_into(self, nonce: Any, data: Any, associated_data: Any, buf: Any) -> int:
        from sealstore.native import chacha

        src, out, iv = _u8(data), _u8(buf), self._nonce(nonce)
        if len(src) < 16:
            raise InvalidTag
        if not out.flags.writeable or len(out) != len(src) - 16:
            raise ValueError("buffer must be writable and len(data) - 16 bytes")
        if not chacha.aead_decrypt(self._key, iv, _u8(associated_data), src, out):
            raise InvalidTag
        return len(out)

    def encrypt(self, nonce: Any, data: Any, associated_data: Any) -> bytes:
        out = bytearray(len(memoryview(data).cast("B")) + 16)
        self.encrypt_into(nonce, data, associated_data, out)
        return bytes(out)

    def decrypt(self, nonce: Any, data: Any, associated_data: Any) -> bytes:
        n = len(memoryview(data).cast("B"))
        out = bytearray(max(0, n - 16))
        self.decrypt_into(nonce, data, associated_data, out)
        return bytes(out)
