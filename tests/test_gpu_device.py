"""The GPU-direct loader on a real CUDA device: torch's memory, streams and allocator.

tests/test_gpu_loader.py runs the same loader under numba's simulator with
torch's CUDA memory swapped out; these run ``TorchMemory`` itself, so they
need a GPU (``scripts/gpu-check.sh`` runs them there) and skip elsewhere.
Self-contained: small synthetic safetensors, sealed here with the local
keyring, no model package -- a GPU machine without network can run them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sealstore.errors import AuthenticationError
from sealstore.kms.envelope import seal_file
from sealstore.kms.local import LocalKeyring
from sealstore.loaders import load_file, safe_open
from tests.conftest import CS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CHACHA, AES = "CHACHA20-POLY1305", "AES-256-GCM"


def tensors() -> dict[str, torch.Tensor]:
    """A few dtypes, one tensor across several chunks, one sharing chunk 0 with the header."""
    g = torch.Generator().manual_seed(11)
    return {
        "a.small": torch.randn(7, generator=g),
        "b.bf16": torch.randn(3, 17, generator=g).bfloat16(),
        "c.big": torch.randn(CS // 2 + 123, generator=g),  # ~2 chunks of 64 KiB
        "d.ints": torch.randint(0, 1 << 30, (41,), generator=g, dtype=torch.int64),
        "e.empty": torch.zeros(0, dtype=torch.float16),
        "f.bytes": torch.randint(0, 255, (999,), generator=g, dtype=torch.uint8),
    }


def sealed(tmp_path: Path, suite: str = CHACHA) -> tuple[Path, bytes]:
    """The tensors as a safetensors file sealed to the local keyring; its plaintext."""
    plain = st_save(tensors(), metadata={"format": "pt"})
    src = tmp_path / "m.safetensors"
    src.write_bytes(plain)
    dst = tmp_path / "m.seal"
    seal_file(src, dst, ["local:"], suite=suite, chunk_size=CS)
    return dst, plain


def on_cuda(plain: bytes) -> dict[str, torch.Tensor]:
    """What safetensors' own CPU load gives, moved to the GPU: the reference."""
    return {k: v.to("cuda") for k, v in st_load(plain).items()}


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].device.type == "cuda", name
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


@pytest.mark.parametrize(("suite", "options"), [(CHACHA, {}), (AES, {"allow_table_aes": True})])
def test_load_file_on_the_gpu_equals_safetensors_cpu_load_moved_to_cuda(
    keyring: LocalKeyring, tmp_path: Path, suite: str, options: dict[str, bool]
) -> None:
    path, plain = sealed(tmp_path, suite)
    same(load_file(path, device="cuda", **options), on_cuda(plain))


def test_a_tampered_chunk_raises_authentication_error_and_returns_nothing(
    keyring: LocalKeyring, tmp_path: Path
) -> None:
    path, _ = sealed(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # inside a middle chunk's ciphertext
    path.write_bytes(bytes(data))
    got = None
    with pytest.raises(AuthenticationError):
        got = load_file(path, device="cuda")
    assert got is None


def test_lazy_safe_open_on_the_gpu_gets_several_tensors_right(
    keyring: LocalKeyring, tmp_path: Path
) -> None:
    path, plain = sealed(tmp_path)
    want = on_cuda(plain)
    with safe_open(path, device="cuda") as f:
        assert set(f.keys()) == set(want)
        for name in ["d.ints", "c.big", "a.small", "e.empty", "c.big"]:
            same({name: f.get_tensor(name)}, {name: want[name]})


def test_a_stream_switched_between_open_and_get_tensor_still_gets_the_right_bytes(
    keyring: LocalKeyring, tmp_path: Path
) -> None:
    path, plain = sealed(tmp_path)
    want = on_cuda(plain)
    other = torch.cuda.Stream()
    with safe_open(path, device="cuda") as f:
        with torch.cuda.stream(other):
            got = {name: f.get_tensor(name) for name in ["c.big", "b.bf16", "f.bytes"]}
            # Work queued on the new stream reads the tensors: it must see the plaintext.
            copies = {name: t.clone() for name, t in got.items()}
        other.synchronize()
    same(copies, {name: want[name] for name in copies})
    same(got, {name: want[name] for name in got})


@pytest.mark.parametrize("how", ["load_file", "safe_open"])
def test_table_aes_on_the_gpu_is_refused_without_allow_table_aes(
    keyring: LocalKeyring, tmp_path: Path, how: str
) -> None:
    path, _ = sealed(tmp_path, AES)
    with pytest.raises(ValueError, match="allow_table_aes=True"):
        load_file(path, device="cuda") if how == "load_file" else safe_open(path, device="cuda")
