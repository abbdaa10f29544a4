"""The CUDA kernels' shape: launches per batch, the AES grid-stride XOR, Wycheproof on the device.

numba's simulator (or a GPU with SEALSTORE_CUDA=device). What is counted here
-- launches, CUDA blocks, ChaCha20 blocks spent on the Poly1305 key -- is the
work the kernels are given; their speed needs a GPU (benchmarks/gpu_load.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numba import cuda

from sealstore.loaders import gpu
from sealstore.native import aes, cuda_aes, cuda_chacha, cuda_common
from sealstore.native.cuda_common import words
from tests.test_native_cuda import CHACHA, record_arrays, run, sealed_batch, simulator_only

AES = "AES-256-GCM"
DATA = Path(__file__).resolve().parent / "data" / "wycheproof"


class Launches:
    """Stands in for a kernel: records each launch's (name, grid, threads), then runs it."""

    def __init__(self, real: Any, name: str, log: list[tuple[str, Any, Any]]) -> None:
        self.real, self.name, self.log = real, name, log

    def __getitem__(self, config: tuple) -> Any:
        self.log.append((self.name, config[0], config[1]))
        return self.real[config]


def record(monkeypatch: pytest.MonkeyPatch, module: Any, names: list[str]) -> list[tuple]:
    log: list[tuple[str, Any, Any]] = []
    for name in names:
        monkeypatch.setattr(module, name, Launches(getattr(module, name), name, log))
    return log


def aes_device(key: bytes) -> tuple[Any, Any, Any]:
    """The expanded key, H's tables and the round tables on the device (as the loader has them)."""
    rk = aes.expand_key(np.frombuffer(key, dtype=np.uint8))
    return cuda.to_device(rk), cuda.to_device(cuda_aes.h_tables(rk)), cuda_aes.device_tables()


def batch_args(key: bytes, aad: bytes, chunks: list[bytes], suite: str) -> tuple:
    ct, nonces = sealed_batch(key, aad, chunks, suite)
    order = ">u4" if suite == AES else "<u4"
    words_ = np.frombuffer(b"".join(nonces), dtype=order).astype(np.uint32).reshape(-1, 3)
    size = sum(len(c) for c in chunks)
    return (
        cuda.to_device(words_),
        cuda.to_device(np.frombuffer(aad, dtype=np.uint8).copy()),
        cuda.to_device(ct),
        len(chunks[0]),
        len(chunks[-1]),
        cuda.device_array(size, dtype=np.uint8),
        cuda.device_array(len(chunks), dtype=np.uint8),
    )


def test_aes_gcm_is_three_launches_a_batch_every_chunk_in_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the powers of H made once (as the loader does), a batch is GHASH, tags, XOR.

    GHASH runs (chunks x groups) CUDA blocks, not one a chunk; the XOR grid
    is capped and every CUDA block stages the AES tables once.
    """
    log = record(
        monkeypatch, cuda_aes, ["_powers_kernel", "_ghash_kernel", "_tag_kernel", "_xor_kernel"]
    )
    key, aad, cs = os.urandom(32), os.urandom(9), 96
    chunks = [os.urandom(cs) for _ in range(5)] + [os.urandom(17)]
    rk, h_tab, tables = aes_device(key)
    powers = cuda_aes.ghash_powers(h_tab, tables[2], 4, 3)
    assert log == [("_powers_kernel", 1, 8)]  # 4 + 3 + 1 rows, one thread a power
    log.clear()
    nonces, d_aad, ct, _, last, out, ok = batch_args(key, aad, chunks, AES)
    cuda_aes.decrypt_chunks(
        rk,
        h_tab,
        tables,
        nonces,
        d_aad,
        ct,
        cs,
        last,
        out,
        ok,
        tag_threads=4,
        tag_groups=3,
        powers=powers,
    )
    assert ok.copy_to_host().tolist() == [1] * 6
    assert out.copy_to_host().tobytes() == b"".join(chunks)
    assert log == [("_ghash_kernel", (6, 3), 4), ("_tag_kernel", 1, 6), ("_xor_kernel", 1, 256)]
    with pytest.raises(ValueError, match="powers of H must have shape"):
        cuda_aes.decrypt_chunks(
            rk,
            h_tab,
            tables,
            nonces,
            d_aad,
            ct,
            cs,
            last,
            out,
            ok,
            tag_threads=4,
            tag_groups=2,
            powers=powers,
        )
    # Scratch for one more chunk than the batch has: refused, never read as a 7th chunk
    # (the kernel takes the batch's size from its grid, not from the scratch).
    spare = cuda.device_array((7, 3, 2), dtype=np.uint64)
    with pytest.raises(ValueError, match="sums must have shape"):
        cuda_aes.decrypt_chunks(
            rk,
            h_tab,
            tables,
            nonces,
            d_aad,
            ct,
            cs,
            last,
            out,
            ok,
            tag_threads=4,
            tag_groups=3,
            powers=powers,
            sums=spare,
        )
    sums = cuda.device_array((6, 3, 2), dtype=np.uint64)
    out2, ok2 = cuda.device_array(out.shape[0], dtype=np.uint8), cuda.device_array(6, np.uint8)
    cuda_aes.decrypt_chunks(
        rk,
        h_tab,
        tables,
        nonces,
        d_aad,
        ct,
        cs,
        last,
        out2,
        ok2,
        tag_threads=4,
        tag_groups=3,
        powers=powers,
        sums=sums,
    )
    assert ok2.copy_to_host().tolist() == [1] * 6
    assert out2.copy_to_host().tobytes() == b"".join(chunks)


def test_aes_lane_groups_fill_the_device_for_large_chunks() -> None:
    assert cuda_aes.lane_groups(1 << 20, 0) == 32  # 64 MiB batch: 2048 CUDA blocks of 128
    assert cuda_aes.lane_groups(1 << 30, 0) == cuda_aes.MAX_GROUPS
    assert cuda_aes.lane_groups(4096, 32) == 1


def test_the_aes_xor_loops_over_the_batch_with_the_grids_stride(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One CUDA block of 16 threads for 3 chunks of 100 bytes: each thread takes several blocks."""
    monkeypatch.setattr(cuda_aes, "XOR_BLOCKS", 1)
    monkeypatch.setattr(cuda_aes, "XOR_THREADS", 16)
    log = record(monkeypatch, cuda_aes, ["_xor_kernel"])
    key, aad, cs = os.urandom(32), b"", 100
    chunks = [os.urandom(cs), os.urandom(cs), os.urandom(3)]
    args = batch_args(key, aad, chunks, AES)
    cuda_aes.decrypt_chunks(*aes_device(key), *args, tag_threads=2)
    assert log == [("_xor_kernel", 1, 16)]  # 7 + 7 + 7 counter blocks over 16 threads
    assert args[-1].copy_to_host().tolist() == [1, 1, 1]
    assert args[-2].copy_to_host().tobytes() == b"".join(chunks)


def test_a_one_shot_aes_call_zeroes_the_powers_of_h_it_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[Any] = []
    real = cuda_aes.ghash_powers

    def keeping(*a: Any, **kw: Any) -> Any:
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(cuda_aes, "ghash_powers", keeping)
    key, aad = os.urandom(32), b"a"
    chunks = [os.urandom(64), os.urandom(10)]
    nonces, d_aad, ct, cs, last, out, ok = batch_args(key, aad, chunks, AES)
    sums = cuda.to_device(np.zeros((2, 1, 2), np.uint64))
    cuda_aes.decrypt_chunks(
        *aes_device(key), nonces, d_aad, ct, cs, last, out, ok, tag_threads=3, sums=sums
    )
    assert ok.copy_to_host().tolist() == [1, 1]
    assert len(made) == 1 and not made[0].copy_to_host().any()
    assert not sums.copy_to_host().any()  # the tag kernel took the sums and zeroed them


@simulator_only
def test_the_ghash_kernels_leave_no_power_of_h_or_sum_in_local_or_shared_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every local and shared array the AES kernels fill is zero when they exit.

    Only the public tables (the AES round tables and GHASH's reduction
    table, staged in shared memory) keep their contents.
    """
    made = record_arrays(monkeypatch)
    key, aad, cs = os.urandom(32), b"aad", 96
    args = batch_args(key, aad, [os.urandom(cs), os.urandom(cs)], AES)
    cuda_aes.decrypt_chunks(*aes_device(key), *args, tag_threads=4, tag_groups=2)
    assert args[-1].copy_to_host().tolist() == [1, 1]  # it ran, and passed
    public = cuda_aes.host_tables()

    def is_public(arr: np.ndarray) -> bool:
        return any(arr.shape == t.shape and np.array_equal(arr, t) for t in public)

    names = {name for name, _ in made}
    assert names >= {"_powers_kernel", "_ghash_kernel", "_tag_kernel", "_encrypt"}
    assert [name for name, arr in made if arr.any() and not is_public(arr)] == []


@simulator_only
def test_the_poly1305_key_is_made_once_per_cuda_block_not_per_lane(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2 chunks x 3 groups of 4 lanes: 6 ChaCha20 blocks for r (+ 2 in the tag kernel), not 26."""
    calls: list[int] = []
    real = cuda_chacha._poly_key

    def counting(key: Any, nonces: Any, c: Any, x: Any, r: Any) -> None:
        calls.append(int(c))
        real(key, nonces, c, x, r)

    monkeypatch.setattr(cuda_chacha, "_poly_key", counting)
    key, aad, cs = os.urandom(32), b"x" * 5, 128
    chunks = [os.urandom(cs), os.urandom(60)]
    out, ok = run(key, aad, *sealed_batch(key, aad, chunks), cs, 60, 4, groups=3)
    assert ok.tolist() == [1, 1] and out.tobytes() == b"".join(chunks)
    assert sorted(calls) == [0] * 4 + [1] * 4


def test_chacha_is_three_launches_a_batch_every_chunk_in_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = record(monkeypatch, cuda_chacha, ["_lanes_kernel", "_tag_kernel", "_xor_kernel"])
    key, aad, cs = os.urandom(32), b"", 128
    chunks = [os.urandom(cs) for _ in range(4)]
    out, ok = run(key, aad, *sealed_batch(key, aad, chunks), cs, cs, 2, groups=2)
    assert ok.tolist() == [1] * 4 and out.tobytes() == b"".join(chunks)
    assert log == [("_lanes_kernel", (4, 2), 2), ("_tag_kernel", 1, 4), ("_xor_kernel", 1, 256)]


def test_the_zero_kernel_zeroes_every_element() -> None:
    arr = cuda.to_device(np.arange(1, 3 * 2 * 16 + 1, dtype=np.uint64).reshape(3, 2, 16))
    cuda_common.zero(arr)
    assert not arr.copy_to_host().any()


# ------------------------------------------------------------------- Wycheproof on the device


def wycheproof(suite: str, name: str) -> list[Any]:
    """The file's 96-bit-nonce cases (the sealed format's; the others: test_native.py).

    From tests/data (copies that travel to a GPU machine with the tests).
    """
    path = DATA / f"{name}_test.json"
    if not path.is_file():  # fail loudly: a missing vector file is not a pass
        raise FileNotFoundError(f"{path} is missing")
    doc = json.loads(path.read_text())
    cases = [t for g in doc["testGroups"] for t in g["tests"] if len(t["iv"]) == 24]
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        # The simulator runs every CUDA thread as a Python thread (~0.3 s a case):
        # there, one case of each shape (key, message and AAD lengths, verdict,
        # Wycheproof's flags) -- the kernels' paths; on a GPU, every case.
        shapes: dict[tuple, dict] = {}
        for t in cases:
            shape = (len(t["key"]), len(t["msg"]), len(t["aad"]), t["result"], *t["flags"])
            shapes.setdefault(shape, t)
        cases = list(shapes.values())
    return [pytest.param(suite, t, id=f"{name}-{t['tcId']}") for t in cases]


@pytest.mark.parametrize(
    ("suite", "case"),
    wycheproof(AES, "aes_gcm") + wycheproof(CHACHA, "chacha20_poly1305"),
)
def test_wycheproof_on_the_device_kernels(
    suite: str, case: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 96-bit-nonce Wycheproof case as a one-chunk batch (AES: 128/192/256-bit keys).

    Valid: ok and the message. Invalid: flagged, and the output all zeros.
    XOR blocks of 32 threads (the simulator runs each thread as a Python
    thread): AES's longest messages (33 counter blocks) loop on the grid.
    """
    monkeypatch.setattr(cuda_aes, "XOR_THREADS", 32)
    monkeypatch.setattr(cuda_aes, "XOR_BLOCKS", 1)
    monkeypatch.setattr(cuda_chacha, "XOR_THREADS", 32)
    key, iv, aad = (bytes.fromhex(case[k]) for k in ("key", "iv", "aad"))
    msg, ct, tag = (bytes.fromhex(case[k]) for k in ("msg", "ct", "tag"))
    assert len(tag) == 16  # every 96-bit-nonce case's (the sealed format's size)
    sealed = np.frombuffer(ct + tag, dtype=np.uint8).copy()
    n = len(ct)
    decrypt, order = gpu._kernels(cuda, suite, bytearray(key), [])
    out = cuda.to_device(np.full(max(n, 1), 0x55, dtype=np.uint8))[:n]
    ok = cuda.device_array(1, dtype=np.uint8)
    nonce = np.frombuffer(iv, dtype=order).astype(np.uint32).reshape(1, 3)
    d_aad = cuda.to_device(np.frombuffer(aad, dtype=np.uint8).copy())
    decrypt(
        cuda.to_device(nonce), d_aad, cuda.to_device(sealed), max(n, 1), n, out, ok, tag_threads=2
    )
    if case["result"] == "valid":
        assert ok.copy_to_host().tolist() == [1]
        assert out.copy_to_host().tobytes() == msg
    else:
        assert ok.copy_to_host().tolist() == [0]
        assert not out.copy_to_host().any()


def test_unaligned_views_still_decrypt_with_aes() -> None:
    """Ciphertext and output one byte into their allocations: the byte paths, same result."""
    key, aad, cs = os.urandom(32), b"aad", 128
    chunks = [os.urandom(cs), os.urandom(40)]
    ct, nonces = sealed_batch(key, aad, chunks, AES)
    decrypt, order = gpu._kernels(cuda, AES, bytearray(key), [])
    nw = np.frombuffer(b"".join(nonces), dtype=order).astype(np.uint32).reshape(-1, 3)
    d_ct = cuda.to_device(np.concatenate([np.zeros(1, np.uint8), ct]))[1:]
    out = cuda.device_array(cs + 41, dtype=np.uint8)[1:]
    assert words(d_ct).shape[0] == 0 and words(out).shape[0] == 0
    ok = cuda.device_array(2, dtype=np.uint8)
    aad_d = cuda.to_device(np.frombuffer(aad, dtype=np.uint8).copy())
    decrypt(cuda.to_device(nw), aad_d, d_ct, cs, 40, out, ok, tag_threads=4)
    assert ok.copy_to_host().tolist() == [1, 1]
    assert out.copy_to_host().tobytes() == b"".join(chunks)
