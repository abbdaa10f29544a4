"""The CUDA ChaCha20-Poly1305 kernels: numba's simulator, or a GPU with SEALSTORE_CUDA=device."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from numba import cuda

from sealstore.native import cuda_chacha


def sealed_batch(key: bytes, aad: bytes, chunks: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Chunks sealed by OpenSSL, laid out as in a sealed file, and their nonces as words."""
    nonces = [os.urandom(12) for _ in chunks]
    aead = ChaCha20Poly1305(key)
    ct = b"".join(aead.encrypt(n, c, aad) for n, c in zip(nonces, chunks, strict=True))
    words = np.frombuffer(b"".join(nonces), dtype="<u4").astype(np.uint32).reshape(-1, 3)
    return np.frombuffer(ct, dtype=np.uint8).copy(), words


def run(
    key: bytes, aad: bytes, ct: np.ndarray, nonces: np.ndarray, cs: int, last: int, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    count = nonces.shape[0]
    out = cuda.device_array((count - 1) * cs + last, dtype=np.uint8)
    ok = cuda.device_array(count, dtype=np.uint8)
    cuda_chacha.decrypt_chunks(
        cuda.to_device(np.frombuffer(key, dtype="<u4").astype(np.uint32)),
        cuda.to_device(nonces),
        cuda.to_device(np.frombuffer(aad, dtype=np.uint8).copy()),
        cuda.to_device(ct),
        cs,
        last,
        out,
        ok,
        tag_threads=threads,
    )
    return out.copy_to_host(), ok.copy_to_host()


@pytest.mark.parametrize(
    ("cs", "last", "aad_len", "threads"),
    [(128, 128, 0, 1), (200, 77, 37, 4), (64, 1, 16, 3), (160, 0, 5, 8), (96, 50, 300, 2)],
)
def test_kernels_decrypt_what_openssl_sealed(
    cs: int, last: int, aad_len: int, threads: int
) -> None:
    """Chunk and AAD lengths off every block size; Poly1305 split over 1-8 segments."""
    key, aad = os.urandom(32), os.urandom(aad_len)
    chunks = [os.urandom(cs), os.urandom(cs), os.urandom(last)]
    ct, nonces = sealed_batch(key, aad, chunks)
    out, ok = run(key, aad, ct, nonces, cs, last, threads)
    assert ok.tolist() == [1, 1, 1]
    assert out.tobytes() == b"".join(chunks)


def test_a_failed_chunk_is_zeroed_and_flagged() -> None:
    key, aad, cs = os.urandom(32), b"preamble", 192
    chunks = [os.urandom(cs) for _ in range(3)]
    ct, nonces = sealed_batch(key, aad, chunks)
    for pos in (cs + 16 + 5, 2 * (cs + 16) - 1):  # chunk 1: a ciphertext byte, a tag byte
        bad = ct.copy()
        bad[pos] ^= 1
        out, ok = run(key, aad, bad, nonces, cs, cs, 4)
        assert ok.tolist() == [1, 0, 1]
        assert out[cs : 2 * cs].tobytes() == bytes(cs)  # never plaintext, even on the device
        assert out[:cs].tobytes() == chunks[0] and out[2 * cs :].tobytes() == chunks[2]
    out, ok = run(key, b"other", ct, nonces, cs, cs, 4)
    assert ok.tolist() == [0, 0, 0] and not out.any()
    wrong = os.urandom(32)
    out, ok = run(wrong, aad, ct, nonces, cs, cs, 4)
    assert ok.tolist() == [0, 0, 0] and not out.any()


def test_too_many_tag_threads_is_refused() -> None:
    with pytest.raises(ValueError, match="tag_threads"):
        run(os.urandom(32), b"", *sealed_batch(os.urandom(32), b"", [b"x" * 64]), 64, 64,
            cuda_chacha.TAG_THREADS + 1)  # fmt: skip
