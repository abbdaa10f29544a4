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

__all__ = ["AESGCM", "ChaCha20Poly1305"]

_EMPTY = np.zeros(0, dtype=np.uint8)


def _u8(buf: Any) -> np.ndarray:
    if buf is None:
        return _EMPTY
    return np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)


class _Aead:
    """The shared plumbing: buffers as uint8 arrays, checks, wiping."""

    _key: np.ndarray

    def __repr__(self) -> str:
        return f"<native {type(self).__name__}>"

    def close(self) -> None:
        self._key[:] = 0

    def __del__(self) -> None:
        key = getattr(self, "_key", None)
        if key is not None:
            key[:] = 0

    def encrypt(self, nonce: Any, data: Any, associated_data: Any) -> bytes:
        out = bytearray(len(memoryview(data).cast("B")) + 16)
        self.encrypt_into(nonce, data, associated_data, out)
        return bytes(out)

    def decrypt(self, nonce: Any, data: Any, associated_data: Any) -> bytes:
        n = len(memoryview(data).cast("B"))
        out = bytearray(max(0, n - 16))
        self.decrypt_into(nonce, data, associated_data, out)
        return bytes(out)

    def encrypt_into(self, nonce: Any, data: Any, associated_data: Any, buf: Any) -> int:
        src, out, iv = _u8(data), _u8(buf), self._nonce(nonce)
        if not out.flags.writeable or len(out) != len(src) + 16:
            raise ValueError("buffer must be writable and len(data) + 16 bytes")
        self._seal(iv, _u8(associated_data), src, out)
        return len(out)

    def decrypt_into(self, nonce: Any, data: Any, associated_data: Any, buf: Any) -> int:
        src, out, iv = _u8(data), _u8(buf), self._nonce(nonce)
        if len(src) < 16:
            raise InvalidTag
        if not out.flags.writeable or len(out) != len(src) - 16:
            raise ValueError("buffer must be writable and len(data) - 16 bytes")
        if not self._open(iv, _u8(associated_data), src, out):
            raise InvalidTag
        return len(out)

    def _seal(self, iv: np.ndarray, aad: np.ndarray, src: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError

    def _open(self, iv: np.ndarray, aad: np.ndarray, src: np.ndarray, out: np.ndarray) -> bool:
        raise NotImplementedError


class AESGCM(_Aead):
    """AES-GCM (128/192/256-bit keys, 96-bit nonces) on the numba CPU kernels.

    Table-driven, so not constant-time against cache timing: a reference and
    an OpenSSL-free fallback, not the default (see ``sealstore.native.aes``).
    """

    def __init__(self, key: bytes | bytearray | memoryview) -> None:
        from sealstore.native import aes

        raw = np.frombuffer(memoryview(key).cast("B"), dtype=np.uint8)
        if len(raw) not in (16, 24, 32):
            raise ValueError("AESGCM key must be 128, 192, or 256 bits.")
        self._key = aes.expand_key(raw)

    @staticmethod
    def _nonce(nonce: Any) -> np.ndarray:
        iv = _u8(nonce)
        if len(iv) != 12:
            raise ValueError("only 96-bit (12-byte) nonces are supported")
        return iv

    def _seal(self, iv: np.ndarray, aad: np.ndarray, src: np.ndarray, out: np.ndarray) -> None:
        from sealstore.native import aes

        aes.gcm_encrypt(self._key, iv, aad, src, out)

    def _open(self, iv: np.ndarray, aad: np.ndarray, src: np.ndarray, out: np.ndarray) -> bool:
        from sealstore.native import aes

        return bool(aes.gcm_decrypt(self._key, iv, aad, src, out))


class ChaCha20Poly1305(_Aead):
    """ChaCha20-Poly1305 (RFC 8439) on the numba CPU kernels."""

    def __init__(self, key: bytes | bytearray | memoryview) -> None:
        raw = memoryview(key).cast("B")
        if len(raw) != 32:
            raise ValueError("ChaCha20Poly1305 key must be 32 bytes")
        self._key = np.frombuffer(raw, dtype="<u4").astype(np.uint32)

    @staticmethod
    def _nonce(nonce: Any) -> np.ndarray:
        raw = memoryview(nonce).cast("B")
        if len(raw) != 12:
            raise ValueError("Nonce must be 12 bytes")
        return np.frombuffer(raw, dtype="<u4").astype(np.uint32)

    def _seal(self, iv: np.ndarray, aad: np.ndarray, src: np.ndarray, out: np.ndarray) -> None:
        from sealstore.native import chacha

        chacha.aead_encrypt(self._key, iv, aad, src, out)

    def _open(self, iv: np.ndarray, aad: np.ndarray, src: np.ndarray, out: np.ndarray) -> bool:
        from sealstore.native import chacha

        return bool(chacha.aead_decrypt(self._key, iv, aad, src, out))
