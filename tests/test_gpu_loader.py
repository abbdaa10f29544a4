"""The GPU-direct loader (loaders/gpu_file.py) end to end, under numba's CUDA simulator.

torch here has no CUDA, so the loader's device memory is swapped for
``SimMemory``: torch CPU tensors seen by the simulator's kernels as device
arrays. Everything else -- the header read on the device, the per-tensor
destinations, scratch and its wipes, the suite policy, the per-file state --
is the code a GPU runs. What only a GPU shows (torch's stream and caching
allocator) is in ``TorchMemory`` and is not exercised here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numba import cuda
from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
from safetensors.torch import save as st_save

from sealstore.errors import AuthenticationError
from sealstore.keys import DataKey
from sealstore.loaders import DeviceUnavailable, gpu, gpu_file, load_file, safe_open
from sealstore.stream import SealedFile
from tests.conftest import CS, seal_bytes

CHACHA, AES = "CHACHA20-POLY1305", "AES-256-GCM"
HOST_DECRYPTS = (
    "_decrypt_chunk",
    "decrypt_chunk_into",
    "read_into",
    "read_scatter",
    "read_range",
    "iter_chunks",
    "_verify_end",
)


class SimMemory(gpu.NumbaMemory):
    """The simulator's device memory, with output tensors as torch CPU tensors."""

    made: list[SimMemory] = []

    def __init__(self, device: str = "cuda:0") -> None:
        super().__init__(cuda)
        self.staged: list[np.ndarray] = []
        self.released = False
        SimMemory.made.append(self)

    def tensor(self, nbytes: int) -> tuple[Any, Any]:
        t = torch.empty(nbytes, dtype=torch.uint8)
        return t, FakeCUDAArray(t.numpy())

    def pinned(self, n: int) -> np.ndarray:
        self.staged.append(super().pinned(n))
        return self.staged[-1]

    def release(self) -> None:
        self.released = True


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[SimMemory]]:
    """GPU-direct loads run on the simulator (torch's CUDA check passes)."""
    SimMemory.made = []
    monkeypatch.setattr(gpu, "check_device", lambda device: None)
    monkeypatch.setattr(gpu_file, "TorchMemory", SimMemory)
    yield SimMemory


def tensors(big: bool = False) -> dict[str, torch.Tensor]:
    """Tensors sharing a chunk with the header and each other, and an empty one.

    *big*: one tensor runs across the boundary of chunk 0 into the final
    chunk. (The simulator takes seconds a chunk: the rest stay within one.)
    """
    g = torch.Generator().manual_seed(7)
    return {
        "a.small": torch.randn(5, generator=g),  # shares chunk 0 with the header
        "b.big": torch.randn(CS // 4 + 37 if big else 300, generator=g),
        "c.empty": torch.zeros(0, dtype=torch.float16),
        "d.ints": torch.randint(0, 1 << 30, (43,), generator=g, dtype=torch.int64),
        "e.bytes": torch.randint(0, 255, (1001,), generator=g, dtype=torch.uint8),
    }


def sealed(tmp_path: Path, suite: str = CHACHA, big: bool = False) -> tuple[Path, DataKey, bytes]:
    plain = st_save(tensors(big), metadata={"format": "pt"})
    dek = DataKey.generate()
    path = tmp_path / "m.seal"
    path.write_bytes(seal_bytes(plain, dek, suite=suite))
    return path, dek, plain


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


@pytest.fixture
def no_host_decrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way SealedFile decrypts on the CPU fails the test if it is called."""
    for name in HOST_DECRYPTS:

        def refuse(*args: Any, _name: str = name, **kwargs: Any) -> Any:
            raise AssertionError(f"SealedFile.{_name} decrypted on the host")

        monkeypatch.setattr(SealedFile, name, refuse)


@pytest.mark.parametrize("device", [0, "cuda", torch.device("cuda", 0)])
def test_every_spelling_of_a_cuda_device_decrypts_on_the_device(
    sim: type[SimMemory], no_host_decrypt: None, tmp_path: Path, device: Any
) -> None:
    """``device=0`` and ``torch.device("cuda", 0)`` take the GPU path, never a CPU decrypt."""
    path, dek, _ = sealed(tmp_path)
    with SealedFile(path, dek) as sf:
        same(load_file(sf, device=device), tensors())
        with safe_open(sf, device=device) as f:
            assert torch.equal(f.get_tensor("d.ints"), tensors()["d.ints"])
            same(f.get_tensors(), tensors())
    assert sim.made  # the device memory was used


def test_no_plaintext_tensor_byte_reaches_a_host_buffer_and_each_tensor_has_its_own_storage(
    sim: type[SimMemory], no_host_decrypt: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staging holds ciphertext only; the one device-to-host copy is the header's bytes."""
    path, dek, plain = sealed(tmp_path, big=True)
    ciphertext = path.read_bytes()
    data_start = 8 + int.from_bytes(plain[:8], "little")
    to_host: list[bytes] = []
    real = gpu_file.GpuFile._to_host

    def recording(t: Any) -> Any:
        to_host.append(bytes(real(t)))
        return to_host[-1]

    monkeypatch.setattr(gpu_file.GpuFile, "_to_host", staticmethod(recording))
    with SealedFile(path, dek) as sf:
        assert sf.chunk_count == 2
        got = load_file(sf, device=0)
    same(got, tensors(big=True))
    assert to_host == [plain[:8], plain[:data_start]]  # the length prefix, then the header
    staged = [buf.tobytes() for m in sim.made for buf in m.staged]
    assert staged
    tensor_bytes = plain[data_start:]
    for held in staged:
        for k in range(0, len(tensor_bytes) - 32, 997):  # no 32-byte run of plaintext
            assert tensor_bytes[k : k + 32] not in held
        assert held.strip(b"\0") == b"" or held.rstrip(b"\0")[:64] in ciphertext
    # Not views of one whole-file buffer: keeping one tensor keeps only its bytes.
    for t in got.values():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    ptrs = {t.untyped_storage().data_ptr() for t in got.values() if t.numel()}
    assert len(ptrs) == sum(1 for t in got.values() if t.numel())


def test_safe_open_sets_up_the_device_once_per_file_and_wipes_it_at_close(
    sim: type[SimMemory], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, dek, _ = sealed(tmp_path)
    keys: list[int] = []
    real = SealedFile.device_key

    def counting(self: SealedFile) -> bytearray:
        keys.append(1)
        return real(self)

    monkeypatch.setattr(SealedFile, "device_key", counting)
    with SealedFile(path, dek) as sf:
        f = safe_open(sf, device=0)
        for name in ["a.small", "b.big", "d.ints", "e.bytes", "c.empty", "b.big"]:
            assert torch.equal(f.get_tensor(name), tensors()[name])
        memory = sim.made[-1]
        assert len(sim.made) == 1 and len(keys) == 1 and len(memory.staged) == 2
        secrets = list(f._gpu._dec._secrets)
        scratch = f._gpu._dec._scratch
        f.close()
        assert memory.released
        assert all(not np.asarray(a._ary).any() for a in [*secrets, scratch])
        assert f._gpu is None


@pytest.mark.parametrize("how", ["load_file", "safe_open"])
def test_aes_on_the_device_is_refused_unless_allowed(
    sim: type[SimMemory], tmp_path: Path, how: str
) -> None:
    """Table AES is a timing side channel on a shared GPU: opt-in only; ChaCha20 needs nothing."""
    path, dek, _ = sealed(tmp_path, AES)
    with SealedFile(path, dek) as sf:
        with pytest.raises(ValueError, match="allow_table_aes=True"):
            load_file(sf, device=0) if how == "load_file" else safe_open(sf, device=0)
        assert not sim.made  # refused before the key went to the device
        if how == "load_file":
            same(load_file(sf, device=0, allow_table_aes=True), tensors())
        else:
            with safe_open(sf, device=0, allow_table_aes=True) as f:
                assert torch.equal(f.get_tensor("e.bytes"), tensors()["e.bytes"])


def test_a_chunk_that_fails_on_the_device_wipes_every_tensor(
    sim: type[SimMemory], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file changes under an open safe_open: the tensors already decrypted are wiped too."""
    path, dek, _ = sealed(tmp_path, big=True)
    made: list[torch.Tensor] = []
    real_tensor, real_read = SimMemory.tensor, SealedFile.read_raw_chunks

    def keeping(self: SimMemory, n: int) -> tuple[Any, Any]:
        t, arr = real_tensor(self, n)
        made.append(t)
        return t, arr

    def flipping(self: SealedFile, first: int, count: int, buf: Any) -> int:
        n = real_read(self, first, count, buf)
        if first + count - 1 == 1:  # the final chunk's ciphertext, as read now
            buf[n - 20] ^= 1
        return n

    with SealedFile(path, dek) as sf:
        f = safe_open(sf, device=0)
        monkeypatch.setattr(SimMemory, "tensor", keeping)
        monkeypatch.setattr(SealedFile, "read_raw_chunks", flipping)
        with pytest.raises(AuthenticationError, match="chunk 1"):
            f.get_tensors()
        assert len(made) == 5 and all(not t.any() for t in made)
        # The scratch the shared chunks went through (uninitialised memory, not zeros).
        scratch = np.asarray(f._gpu._dec._scratch._ary).tobytes()
        plain = st_save(tensors(big=True))
        assert all(plain[k : k + 32] not in scratch for k in range(0, len(plain) - 32, 331))
        f.close()


def test_a_device_fault_wipes_what_it_can_and_says_so(
    sim: type[SimMemory], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sticky CUDA error fails every later call, the wipes too: one clear error, not two."""
    path, dek, _ = sealed(tmp_path)
    calls = {"n": 0}
    real_wipe = SimMemory.wipe

    def kernel_fault(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS")

    def sticky_wipe(self: SimMemory, arr: Any) -> None:
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS")
        real_wipe(self, arr)

    from sealstore.native import cuda_chacha

    with SealedFile(path, dek) as sf:
        f = safe_open(sf, device=0)
        monkeypatch.setattr(cuda_chacha, "decrypt_chunks", kernel_fault)
        monkeypatch.setattr(SimMemory, "wipe", sticky_wipe)
        with pytest.raises(DeviceUnavailable, match=r"could not be wiped.*end this process"):
            f.get_tensor("d.ints")
        with pytest.raises(DeviceUnavailable, match="key among them"):
            f.close()
        assert f._gpu is None  # closed all the same: nothing left to retry against a dead context
        assert calls["n"] >= 3  # every buffer was tried, not only the first


@pytest.mark.parametrize("suite", [CHACHA, AES])
def test_every_device_buffer_comes_from_the_files_memory_once(
    sim: type[SimMemory], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suite: str
) -> None:
    """Key, AES tables, lane sums: all from the memory object at open; a batch allocates nothing.

    (On a GPU the memory is torch's caching allocator: numba's own would
    fight it for the card and free with a device-wide synchronize.)
    """
    path, dek, _ = sealed(tmp_path, suite)
    calls = {"empty": 0, "numba": 0}
    real_empty, real_array, real_to_device = SimMemory.empty, cuda.device_array, cuda.to_device

    def empty(self: SimMemory, *args: Any, **kwargs: Any) -> Any:
        calls["empty"] += 1
        return real_empty(self, *args, **kwargs)

    def counted(real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls["numba"] += 1
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(SimMemory, "empty", empty)
    monkeypatch.setattr(cuda, "device_array", counted(real_array))
    monkeypatch.setattr(cuda, "to_device", counted(real_to_device))
    sums: list[Any] = []
    from sealstore.native import cuda_chacha

    real_decrypt = cuda_chacha.decrypt_chunks

    def seeing(key: Any, nonces: Any, *args: Any, **kwargs: Any) -> None:
        sums.append(kwargs.get("sums"))
        real_decrypt(key, nonces, *args, **kwargs)

    monkeypatch.setattr(cuda_chacha, "decrypt_chunks", seeing)
    with SealedFile(path, dek) as sf, safe_open(sf, device=0, allow_table_aes=True) as f:
        at_open = dict(calls)
        assert at_open["numba"] == at_open["empty"]  # each one a memory.empty, nothing else
        assert torch.equal(f.get_tensor("d.ints"), tensors()["d.ints"])
        assert calls == at_open  # the batches allocated nothing
        if suite == CHACHA:
            whole = f._gpu._dec._secrets[-1]
            assert sums and all(s is not None and s.shape[1:] == whole.shape[1:] for s in sums)
            assert all(np.shares_memory(np.asarray(s._ary), np.asarray(whole._ary)) for s in sums)


def test_two_threads_get_tensors_of_one_file_in_turn(
    sim: type[SimMemory], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's staging ring and scratch are shared: two threads' batches never interleave."""
    import threading
    import time

    path, dek, _ = sealed(tmp_path)
    inside = {"now": 0, "most": 0}
    real_read = SealedFile.read_raw_chunks

    def slow_read(self: SealedFile, first: int, count: int, buf: Any) -> int:
        inside["now"] += 1
        inside["most"] = max(inside["most"], inside["now"])
        time.sleep(0.05)  # another thread, were it let in, would be here too
        try:
            return real_read(self, first, count, buf)
        finally:
            inside["now"] -= 1

    monkeypatch.setattr(SealedFile, "read_raw_chunks", slow_read)
    want = tensors()
    got: dict[str, list[torch.Tensor]] = {"b.big": [], "e.bytes": []}
    errors: list[BaseException] = []
    with SealedFile(path, dek) as sf, safe_open(sf, device=0) as f:

        def load(name: str) -> None:
            try:
                got[name].extend(f.get_tensor(name) for _ in range(2))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=load, args=(n,)) for n in got]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert inside["most"] == 1
    for name, ts in got.items():
        assert len(ts) == 2 and all(torch.equal(t, want[name]) for t in ts), name


def test_slices_decrypted_on_the_host_for_a_device_leave_zeroed_host_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dim > 0 slice (and a plan's) goes host -> device: the host copy is wiped after.

    ``meta`` stands in for a CUDA device (torch here is a CPU build): any
    device but the CPU takes the copy-and-wipe path.
    """
    from sealstore.loaders import safetensors as st
    from sealstore.loaders.st_header import Layout

    want = torch.arange(1, 61, dtype=torch.float32).reshape(6, 10)
    dek = DataKey.generate()
    path = tmp_path / "m.seal"
    path.write_bytes(seal_bytes(st_save({"w": want, "v": want[0].clone()}), dek))
    made: list[torch.Tensor] = []
    real_empty = torch.empty

    def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        t = real_empty(*args, **kwargs)
        made.append(t)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    with SealedFile(path, dek) as sf:
        layout = Layout(sf)  # type: ignore[arg-type]
        got = st._read_slices(sf, layout, {"w": (1, 2, 5), "v": None}, "meta", 1, False)
        assert got["w"].device.type == "meta" and list(got["w"].shape) == [6, 3]
        assert list(got["v"].shape) == [10]
        host = [t for t in made if t.numel()]  # the buffers and scratch of the device load
        cpu = st._read_slices(sf, layout, {"w": (1, 2, 5)}, "cpu", 1, False)
    assert torch.equal(cpu["w"], want[:, 2:5])  # the same path decrypts the right bytes
    assert len(host) >= 3 and all(not t.any() for t in host)


def test_a_closed_gpu_direct_safe_open_refuses_rather_than_decrypting_on_the_host(
    sim: type[SimMemory], tmp_path: Path, no_host_decrypt: None
) -> None:
    path, dek, _ = sealed(tmp_path)
    with SealedFile(path, dek) as sf:  # the caller's file stays open after close
        f = safe_open(sf, device=0)
        f.close()
        with pytest.raises(ValueError, match="closed"):
            f.get_tensor("d.ints")
        with pytest.raises(ValueError, match="closed"):
            f.get_tensors()


@pytest.mark.parametrize("how", ["load_file", "safe_open"])
def test_a_device_setup_that_fails_half_way_wipes_the_key_and_gives_the_memory_back(
    sim: type[SimMemory], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The key is on the device when the pinned staging is refused: wiped, and released at once.

    (Not when the half-made file object is collected: a traceback kept by a
    serving process would hold torch's buffers, the key's among them.)
    """
    path, dek, _ = sealed(tmp_path)
    made: list[Any] = []
    real_empty = SimMemory.empty

    def empty(self: SimMemory, *args: Any, **kwargs: Any) -> Any:
        made.append(real_empty(self, *args, **kwargs))
        return made[-1]

    def no_pinned(self: SimMemory, n: int) -> np.ndarray:
        raise MemoryError("pinned host memory exhausted")

    monkeypatch.setattr(SimMemory, "empty", empty)
    monkeypatch.setattr(SimMemory, "pinned", no_pinned)
    with SealedFile(path, dek) as sf, pytest.raises(MemoryError, match="pinned"):
        load_file(sf, device=0) if how == "load_file" else safe_open(sf, device=0)
    assert len(sim.made) == 1 and sim.made[0].released
    key = [a for a in made if a.dtype == np.uint32 and a.shape == (8,)]
    assert len(key) == 1 and not np.asarray(key[0]._ary).any()


@pytest.mark.parametrize("suite", [CHACHA, AES])
def test_a_device_fault_in_a_full_load_is_one_device_error_and_the_memory_goes_back(
    sim: type[SimMemory], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suite: str
) -> None:
    """The first kernel (the header's) faults and every wipe fails, as under a sticky error.

    load_file raises DeviceUnavailable saying the key could not be wiped --
    not the RuntimeError of a failed cleanup -- and the file's buffers are
    handed back all the same.
    """
    from sealstore.native import cuda_aes, cuda_chacha

    path, dek, _ = sealed(tmp_path, suite)
    wipes = {"n": 0}

    def kernel_fault(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS")

    def dead_wipe(self: SimMemory, arr: Any) -> None:
        wipes["n"] += 1
        raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS")

    monkeypatch.setattr(cuda_chacha, "decrypt_chunks", kernel_fault)
    monkeypatch.setattr(cuda_aes, "decrypt_chunks", kernel_fault)
    monkeypatch.setattr(SimMemory, "wipe", dead_wipe)
    fault = pytest.raises(DeviceUnavailable, match=r"key among them.*end this process")
    with SealedFile(path, dek) as sf, fault:
        load_file(sf, device=0, allow_table_aes=True)
    assert len(sim.made) == 1 and sim.made[0].released
    assert wipes["n"] >= 2  # the output and scratch, then the key at close: each tried
