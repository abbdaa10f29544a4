"""The CUDA AEAD kernels (both suites): numba's simulator, or a GPU with SEALSTORE_CUDA=device."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from numba import cuda

from sealstore.errors import AuthenticationError
from sealstore.keys import DataKey
from sealstore.loaders import gpu
from sealstore.loaders.gpu import decrypt_to_device
from sealstore.native import cuda_chacha
from sealstore.native.cuda_common import words as words_view
from sealstore.stream import SealedFile
from tests.conftest import CS, seal_bytes

CHACHA = "CHACHA20-POLY1305"
OPENSSL = {CHACHA: ChaCha20Poly1305, "AES-256-GCM": AESGCM}
# Tests that look inside the simulator (its local and shared arrays, device
# functions swapped at run time): on a GPU the kernels are compiled code.
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
simulator_only = pytest.mark.skipif(not SIMULATED, reason="looks inside numba's CUDA simulator")
# The simulator runs each CUDA thread in Python: a 64 KiB chunk (the format's
# smallest) takes it tens of seconds. Under it, the file-level tests below use
# the fewest whole chunks that still take the same path; a GPU gets one more.
SPARE_CHUNKS = 0 if SIMULATED else 1


def sealed_batch(
    key: bytes, aad: bytes, chunks: list[bytes], suite: str = CHACHA
) -> tuple[np.ndarray, list[bytes]]:
    """Chunks sealed by OpenSSL, laid out as in a sealed file, and their nonces."""
    nonces = [os.urandom(12) for _ in chunks]
    aead = OPENSSL[suite](key)
    ct = b"".join(aead.encrypt(n, c, aad) for n, c in zip(nonces, chunks, strict=True))
    return np.frombuffer(ct, dtype=np.uint8).copy(), nonces


def run(
    key: bytes,
    aad: bytes,
    ct: np.ndarray,
    nonces: list[bytes],
    cs: int,
    last: int,
    threads: int,
    suite: str = CHACHA,
    groups: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decrypt a batch with the suite's kernels, keyed as the GPU-direct loader keys them."""
    decrypt, nonce_order = gpu._kernels(cuda, suite, bytearray(key), [])
    count = len(nonces)
    out = cuda.device_array((count - 1) * cs + last, dtype=np.uint8)
    ok = cuda.device_array(count, dtype=np.uint8)
    words = np.frombuffer(b"".join(nonces), dtype=nonce_order).astype(np.uint32).reshape(-1, 3)
    decrypt(
        cuda.to_device(words),
        cuda.to_device(np.frombuffer(aad, dtype=np.uint8).copy()),
        cuda.to_device(ct),
        cs,
        last,
        out,
        ok,
        tag_threads=threads,
        **({"tag_groups": groups} if groups else {}),
    )
    return out.copy_to_host(), ok.copy_to_host()


@pytest.mark.parametrize("suite", sorted(OPENSSL))
@pytest.mark.parametrize(
    ("cs", "last", "aad_len", "threads"),
    [
        (128, 128, 0, 1),
        (200, 77, 37, 4),
        (64, 1, 16, 3),
        (160, 0, 5, 8),
        (96, 50, 300, 2),
        (70, 33, 7, 5),
        (1024, 1000, 13, 24),
    ],
)
def test_kernels_decrypt_what_openssl_sealed(
    suite: str, cs: int, last: int, aad_len: int, threads: int
) -> None:
    """Chunk and AAD lengths off every block size; Poly1305 / GHASH split over 1-24 lanes.

    Chunk size 70 puts chunk 1 at an unaligned offset (the kernels' byte path);
    the others are 4-byte aligned (word loads and stores) with partial tails.
    """
    key, aad = os.urandom(32), os.urandom(aad_len)
    chunks = [os.urandom(cs), os.urandom(cs), os.urandom(last)]
    ct, nonces = sealed_batch(key, aad, chunks, suite)
    out, ok = run(key, aad, ct, nonces, cs, last, threads, suite)
    assert ok.tolist() == [1, 1, 1]
    assert out.tobytes() == b"".join(chunks)
    ct[cs + 16 + 3] ^= 1  # chunk 1
    out, ok = run(key, aad, ct, nonces, cs, last, threads, suite)
    assert ok.tolist() == [1, 0, 1] and out[cs : 2 * cs].tobytes() == bytes(cs)


@pytest.mark.parametrize("suite", sorted(OPENSSL))
@pytest.mark.parametrize(("threads", "groups"), [(3, 2), (4, 3), (2, 7)])
def test_the_mac_split_over_several_cuda_blocks_per_chunk(
    suite: str, threads: int, groups: int
) -> None:
    """Poly1305 / GHASH lanes over *groups* CUDA blocks a chunk (more lanes than blocks: 2 x 7)."""
    key, aad, cs = os.urandom(32), os.urandom(21), 300
    chunks = [os.urandom(cs), os.urandom(cs), os.urandom(45)]
    ct, nonces = sealed_batch(key, aad, chunks, suite)
    out, ok = run(key, aad, ct, nonces, cs, 45, threads, suite, groups=groups)
    assert ok.tolist() == [1, 1, 1] and out.tobytes() == b"".join(chunks)
    ct[2 * (cs + 16) + 44] ^= 0x80  # chunk 2's last ciphertext byte
    out, ok = run(key, aad, ct, nonces, cs, 45, threads, suite, groups=groups)
    assert ok.tolist() == [1, 1, 0] and not out[2 * cs :].any()


@pytest.mark.parametrize("suite", sorted(OPENSSL))
def test_many_chunks_in_one_launch_with_a_one_byte_last_chunk_and_one_bad_chunk(
    suite: str,
) -> None:
    """Seven chunks a launch, the last 1 byte: a bad tag in chunk 4 flags and zeroes it alone."""
    key, aad, cs = os.urandom(32), os.urandom(40), 80
    chunks = [os.urandom(cs) for _ in range(6)] + [os.urandom(1)]
    ct, nonces = sealed_batch(key, aad, chunks, suite)
    out, ok = run(key, aad, ct, nonces, cs, 1, 2, suite, groups=2)
    assert ok.tolist() == [1] * 7 and out.tobytes() == b"".join(chunks)
    ct[4 * (cs + 16) + cs + 7] ^= 0x01  # chunk 4's tag
    out, ok = run(key, aad, ct, nonces, cs, 1, 2, suite, groups=2)
    assert ok.tolist() == [1, 1, 1, 1, 0, 1, 1]
    assert out[4 * cs : 5 * cs].tobytes() == bytes(cs)  # never plaintext, even on the device
    rest = out[: 4 * cs].tobytes() + out[5 * cs :].tobytes()
    assert rest == b"".join(chunks[:4] + chunks[5:])


def test_buffers_at_unaligned_addresses_take_the_byte_path() -> None:
    """Output and ciphertext one byte into their allocations: no word access, same result."""
    key, aad, cs = os.urandom(32), b"aad", 128
    chunks = [os.urandom(cs), os.urandom(40)]
    ct, nonces = sealed_batch(key, aad, chunks)
    decrypt, order = gpu._kernels(cuda, CHACHA, bytearray(key), [])
    words = np.frombuffer(b"".join(nonces), dtype=order).astype(np.uint32).reshape(-1, 3)
    d_ct = cuda.to_device(np.concatenate([np.zeros(1, np.uint8), ct]))[1:]
    out = cuda.device_array(cs + 41, dtype=np.uint8)[1:]
    assert words_view(d_ct).shape[0] == 0 and words_view(out).shape[0] == 0
    ok = cuda.device_array(2, dtype=np.uint8)
    aad_d = cuda.to_device(np.frombuffer(aad, dtype=np.uint8).copy())
    decrypt(cuda.to_device(words), aad_d, d_ct, cs, 40, out, ok, tag_threads=4)
    assert ok.copy_to_host().tolist() == [1, 1]
    assert out.copy_to_host().tobytes() == b"".join(chunks)


def test_lane_groups_fill_the_device_for_large_chunks_only() -> None:
    assert cuda_chacha.lane_groups(1 << 20, 0) == 16  # 64 MiB batch: 1024 CUDA blocks
    assert cuda_chacha.lane_groups(1 << 30, 0) == cuda_chacha.MAX_GROUPS
    assert cuda_chacha.lane_groups(4096, 32) == 1
    with pytest.raises(ValueError, match="tag_groups"):
        run(
            os.urandom(32),
            b"",
            *sealed_batch(os.urandom(32), b"", [b"x" * 64]),
            64,
            64,
            2,
            groups=cuda_chacha.MAX_GROUPS + 1,
        )


@pytest.mark.parametrize("suite", sorted(OPENSSL))
def test_a_failed_chunk_is_zeroed_and_flagged(suite: str) -> None:
    key, aad, cs = os.urandom(32), b"preamble", 192
    chunks = [os.urandom(cs) for _ in range(3)]
    ct, nonces = sealed_batch(key, aad, chunks, suite)
    for pos in (cs + 16 + 5, 2 * (cs + 16) - 1):  # chunk 1: a ciphertext byte, a tag byte
        bad = ct.copy()
        bad[pos] ^= 1
        out, ok = run(key, aad, bad, nonces, cs, cs, 4, suite)
        assert ok.tolist() == [1, 0, 1]
        assert out[cs : 2 * cs].tobytes() == bytes(cs)  # never plaintext, even on the device
        assert out[:cs].tobytes() == chunks[0] and out[2 * cs :].tobytes() == chunks[2]
    out, ok = run(key, b"other", ct, nonces, cs, cs, 4, suite)
    assert ok.tolist() == [0, 0, 0] and not out.any()
    wrong = os.urandom(32)
    out, ok = run(wrong, aad, ct, nonces, cs, cs, 4, suite)
    assert ok.tolist() == [0, 0, 0] and not out.any()


def test_too_many_tag_threads_is_refused() -> None:
    with pytest.raises(ValueError, match="tag_threads"):
        run(
            os.urandom(32),
            b"",
            *sealed_batch(os.urandom(32), b"", [b"x" * 64]),
            64,
            64,
            cuda_chacha.TAG_THREADS + 1,
        )


# --------------------------------------------------------------------------- the GPU-direct path


def sealed_file(
    tmp_path: Path, data: bytes, suite: str = "CHACHA20-POLY1305"
) -> tuple[Path, DataKey]:
    dek = DataKey.generate()
    path = tmp_path / "f.seal"
    path.write_bytes(seal_bytes(data, dek, suite=suite))
    return path, dek


def test_decrypt_to_device_stages_only_ciphertext(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plaintext lands in device memory only: pinned staging holds the file's bytes, no more."""
    data = os.urandom(2 * CS + 1000)
    path, dek = sealed_file(tmp_path, data)
    sealed = path.read_bytes()
    staged: list[np.ndarray] = []
    fills: list[int] = []
    real_pinned, real_read = cuda.pinned_array, SealedFile.read_raw_chunks

    def pinned(*args: Any, **kwargs: Any) -> np.ndarray:
        staged.append(real_pinned(*args, **kwargs))
        return staged[-1]

    def read(self: SealedFile, first: int, count: int, buf: Any) -> int:
        n = real_read(self, first, count, buf)
        start = self.layout.offset(first)
        assert bytes(buf[:n]) == sealed[start : start + n]  # exactly the sealed bytes
        fills.append(first)
        return n

    monkeypatch.setattr(cuda, "pinned_array", pinned)
    monkeypatch.setattr(SealedFile, "read_raw_chunks", read)
    with SealedFile(path, dek) as sf:
        out = cuda.device_array(len(data), dtype=np.uint8)
        decrypt_to_device(sf, 0, sf.chunk_count - 1, out, batch_bytes=CS)  # 3 batches, 2 slots
    assert out.copy_to_host().tobytes() == data
    assert fills == [0, 1, 2] and len(staged) == 2
    for buf in staged:  # nothing was ever copied back into them
        held = buf.tobytes()
        assert all(data[k : k + 32] not in held for k in range(0, len(data), 512))


@pytest.mark.parametrize("suite", ["CHACHA20-POLY1305", "AES-256-GCM"])
def test_decrypt_to_device_fails_closed(tmp_path: Path, suite: str) -> None:
    """A later batch fails (chunk 1: the final one under the simulator, a whole one on
    a GPU): the batch before it, already decrypted, is wiped with it."""
    data = os.urandom((1 + SPARE_CHUNKS) * CS + 10)
    path, dek = sealed_file(tmp_path, data, suite)
    bad = bytearray(path.read_bytes())
    with SealedFile(path, dek) as sf:
        bad[sf.layout.offset(1) + 5] ^= 1
    path.write_bytes(bad)
    out = cuda.to_device(np.full(len(data), 0x77, dtype=np.uint8))
    with SealedFile(path, dek) as sf, pytest.raises(AuthenticationError, match="chunk 1"):
        decrypt_to_device(sf, 0, sf.chunk_count - 1, out, batch_bytes=CS)
    assert not out.copy_to_host().any()  # the whole output wiped, good chunks too


def test_decrypt_to_device_checks_the_final_chunk_for_partial_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealstore.loaders import gpu

    data = os.urandom(2 * CS + 10)
    path, dek = sealed_file(tmp_path, data)
    bad = bytearray(path.read_bytes())
    bad[-3] ^= 1  # the final chunk's tag: truncation and tampering show only there
    path.write_bytes(bad)
    wiped: list[int] = []
    real = gpu._wipe

    def recording(cuda_: Any, arr: Any) -> None:
        wiped.append(arr.size)
        real(cuda_, arr)

    monkeypatch.setattr(gpu, "_wipe", recording)
    out = cuda.to_device(np.full(CS, 0x77, dtype=np.uint8))
    with SealedFile(path, dek) as sf, pytest.raises(AuthenticationError, match="chunk 2"):
        decrypt_to_device(sf, 1, 1, out)
    assert not out.copy_to_host().any()  # chunk 1 was good, and is wiped all the same
    assert 10 in wiped  # the final chunk's scratch (10 bytes) too, not only the output
    assert 8 in wiped  # and the key words on the device


@pytest.mark.parametrize("suite", ["CHACHA20-POLY1305", "AES-256-GCM"])
def test_decrypt_to_device_partial_range(tmp_path: Path, suite: str) -> None:
    """Chunks 1..2, to the output's start: the final partial one under the simulator,
    two whole ones before a final chunk on a GPU."""
    data = os.urandom((2 + SPARE_CHUNKS) * CS + 10)
    path, dek = sealed_file(tmp_path, data, suite)
    want = data[CS : 3 * CS]
    out = cuda.device_array(len(want), dtype=np.uint8)
    with SealedFile(path, dek) as sf:
        decrypt_to_device(sf, 1, 2, out)
    assert out.copy_to_host().tobytes() == want


SPANS = [
    (0, 0),
    (0, 1),
    (5, CS),
    (CS - 1, CS + 1),
    (CS, 2 * CS),
    (2 * CS - 3, 3 * CS + 10),
    (3 * CS + 10, 3 * CS + 10),
    (3 * CS + 9, 3 * CS + 10),
    (100, 3 * CS + 10),
]


def test_chunk_span_covers_exactly_the_range(tmp_path: Path) -> None:
    """The chunks a lazy GPU get_tensor decrypts: edges +-1, empty ranges, the file's end.

    Checked with the CPU decryptor (the arithmetic); the device decrypting a
    span is the next test.
    """
    from sealstore.loaders.gpu import chunk_span

    data = os.urandom(3 * CS + 10)
    path, dek = sealed_file(tmp_path, data)
    with SealedFile(path, dek) as sf:
        for start, end in SPANS:
            first, last, nbytes, base = chunk_span(sf.layout, start, end)
            assert 0 <= first <= last < sf.chunk_count
            assert last - first <= max(0, (end - start - 1) // CS + 1)  # no chunk too many
            buf = np.empty(nbytes, dtype=np.uint8)
            sf.read_into(first * CS, buf)
            assert buf[base : base + end - start].tobytes() == data[start:end], (start, end)
        for start, end in [(0, len(data) + 1), (-1, 5), (10, 5)]:
            with pytest.raises(IndexError):
                chunk_span(sf.layout, start, end)


def test_a_span_decrypts_on_the_device(tmp_path: Path) -> None:
    from sealstore.loaders.gpu import chunk_span

    data = os.urandom(CS + 10)
    path, dek = sealed_file(tmp_path, data)
    with SealedFile(path, dek) as sf:
        first, last, nbytes, base = chunk_span(sf.layout, CS + 3, CS + 9)
        out = cuda.device_array(nbytes, dtype=np.uint8)
        decrypt_to_device(sf, first, last, out)
    assert out.copy_to_host()[base : base + 6].tobytes() == data[CS + 3 : CS + 9]


def test_decrypt_to_device_refuses_an_unknown_suite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealstore.loaders import gpu

    path, dek = sealed_file(tmp_path, b"x" * 100)
    monkeypatch.setattr(gpu, "GPU_SUITES", ("AES-256-GCM",))
    with SealedFile(path, dek) as sf, pytest.raises(ValueError, match="cpu-decrypt"):
        decrypt_to_device(sf, 0, 0, cuda.device_array(100, dtype=np.uint8))


@simulator_only
def test_the_poly1305_lanes_kernel_leaves_no_r_power_or_sum_in_local_or_shared_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every local and shared array the lanes kernel fills is zero when it exits.

    The simulator's arrays are recorded as they are made; only the block
    loader's (AAD, ciphertext and lengths: public) may keep its contents.
    """
    made = record_arrays(monkeypatch)
    key, aad, cs = os.urandom(32), b"aad", 96
    ct, nonces = sealed_batch(key, aad, [os.urandom(cs), os.urandom(cs)])
    words = np.frombuffer(b"".join(nonces), dtype="<u4").astype(np.uint32).reshape(-1, 3)
    d_ct = cuda.to_device(ct)
    sums = cuda.to_device(np.zeros((2, 2, 5), np.uint64))
    d_key = cuda.to_device(np.frombuffer(key, dtype="<u4").astype(np.uint32))
    aad_d = cuda.to_device(np.frombuffer(aad, dtype=np.uint8).copy())
    args = (d_key, cuda.to_device(words), aad_d, d_ct, words_view(d_ct), cs, cs, sums)
    cuda_chacha._lanes_kernel[(2, 2), 4](*args)
    assert sums.copy_to_host().any()  # it ran, and its sums went out
    kept = [name for name, arr in made if name != "_load_block" and arr.any()]
    assert {name for name, _ in made} >= {"_lanes_kernel", "_power", "_mul_rows", "_poly_key"}
    assert kept == []


def record_arrays(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, np.ndarray]]:
    """Every local and shared array the simulator's kernels make: (the function making it, it).

    Each starts zeroed (uninitialised on a GPU: only what a kernel writes
    counts). A CUDA block's threads share one shared array per source line,
    as in the simulator, whose own bookkeeping (by its caller's line) this
    replaces -- through a wrapper it would see one line and alias them all.
    """
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    made: list[tuple[str, np.ndarray]] = []

    def local(self: Any, shape: Any, dtype: Any) -> np.ndarray:
        arr = np.zeros(shape, numpy_support.as_dtype(dtype))
        made.append((sys._getframe(1).f_code.co_name, arr))
        return arr

    lock = threading.Lock()  # the block's threads are Python threads: one array, not two

    def shared(self: Any, shape: Any, dtype: Any) -> np.ndarray:
        caller = sys._getframe(1)
        where = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            arr = self._allocations.get(where)
            if arr is None:
                arr = self._allocations[where] = np.zeros(shape, numpy_support.as_dtype(dtype))
                made.append((caller.f_code.co_name, arr))
        return arr

    monkeypatch.setattr(kernelapi.FakeCUDALocal, "array", local)
    monkeypatch.setattr(kernelapi.FakeCUDAShared, "array", shared)
    return made
