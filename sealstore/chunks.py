"""Chunk geometry and nonces of the v1 payload, shared by the writer and the readers."""

from __future__ import annotations

import ctypes
import os
import struct
import warnings
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from sealstore.errors import AuthenticationError, FormatError
from sealstore.format import TAG_SIZE, Header

__all__ = ["MAX_CHUNKS", "ChunkLayout", "Progress", "chunk_nonce", "copy_into", "new_aead", "zero"]

_IDX = struct.Struct(">I")
MAX_CHUNKS = 1 << 32

Aead = AESGCM | ChaCha20Poly1305
Progress = Callable[[int], None]  # called with each chunk's byte count


def new_aead(suite: str, key: bytes) -> Aead:
    """The AEAD of a v1 suite (the suite name was validated with the header).

    OpenSSL's, through cryptography. ``SEALSTORE_AEAD=native`` selects the
    numba ChaCha20-Poly1305 of ``sealstore.native`` for that suite only, with
    a warning: it is constant-time, but slower and far less reviewed than
    OpenSSL. AES-256-GCM always stays on OpenSSL: the numba AES is
    table-driven (its timing depends on the key through the cache) and slow,
    a reference and test oracle that no production path may use.

    Raises:
        ValueError: ``SEALSTORE_AEAD`` is neither ``openssl`` nor ``native``.
    """
    engine = os.environ.get("SEALSTORE_AEAD", "openssl")
    if engine not in ("openssl", "native"):
        raise ValueError(f"SEALSTORE_AEAD must be 'openssl' or 'native', not {engine!r}")
    if engine == "native":
        if suite == "AES-256-GCM":
            warnings.warn(
                "SEALSTORE_AEAD=native: AES-256-GCM stays on OpenSSL (the native AES is a "
                "table-driven reference, not constant-time)",
                stacklevel=2,
            )
        else:
            warnings.warn(
                "SEALSTORE_AEAD=native: ChaCha20-Poly1305 runs on sealstore's numba kernels "
                "instead of OpenSSL",
                stacklevel=2,
            )
            from sealstore.native import aead

            return aead.ChaCha20Poly1305(key)  # type: ignore[return-value]
    return AESGCM(key) if suite == "AES-256-GCM" else ChaCha20Poly1305(key)


def chunk_nonce(prefix: bytes, index: int, last: bool) -> bytes:
    """The 12-byte nonce of chunk *index*."""
    if not 0 <= index < MAX_CHUNKS:
        raise ValueError("chunk index out of range")
    return prefix + _IDX.pack(index) + (b"\x01" if last else b"\x00")


class ChunkLayout:
    """Where each chunk sits, derived from the payload length alone.

    Raises:
        AuthenticationError: the payload length is impossible for a sealed file
            (cut inside a tag, an empty last chunk after full ones, or a size that
            contradicts the header's ``plaintext_size``).
    """

    def __init__(self, header: Header, payload_offset: int, payload_len: int) -> None:
        cs = header.chunk_size
        full = cs + TAG_SIZE
        n, rem = divmod(payload_len, full)
        if rem == 0 and n > 0:
            count, last_len = n, cs
        elif rem >= TAG_SIZE and (n == 0 or rem > TAG_SIZE):
            count, last_len = n + 1, rem - TAG_SIZE
        else:
            raise AuthenticationError("sealed payload is truncated or has trailing bytes")
        if count > MAX_CHUNKS:
            raise FormatError("too many chunks")
        self.chunk_size = cs
        self.count = count
        self.last_len = last_len
        self.payload_offset = payload_offset
        self.plaintext_size = (count - 1) * cs + last_len
        if header.plaintext_size is not None and header.plaintext_size != self.plaintext_size:
            raise AuthenticationError("sealed payload length does not match the header")

    def plain_len(self, i: int) -> int:
        return self.last_len if i == self.count - 1 else self.chunk_size

    def offset(self, i: int) -> int:
        return self.payload_offset + i * (self.chunk_size + TAG_SIZE)


def zero(buf: memoryview) -> None:
    """Overwrite *buf*: what a failed decryption wrote there is never left behind."""
    buf[:] = bytes(len(buf))


_GIL_FREE_COPY = 1 << 16


def copy_into(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src`` for writable byte views of one length, without holding the GIL.

    ``ctypes.memmove`` drops the GIL (a slice assignment keeps it), so lanes
    scattering decrypted chunks run side by side. Small copies stay slices.
    """
    n = len(src)
    if len(dst) != n:
        raise ValueError("copy_into: lengths differ")
    if n < _GIL_FREE_COPY or dst.readonly or src.readonly:
        dst[:] = src
        return
    ctypes.memmove(
        ctypes.addressof(ctypes.c_char.from_buffer(dst)),
        ctypes.addressof(ctypes.c_char.from_buffer(src)),
        n,
    )
