"""load_sentence_transformer: the real all-MiniLM-L6-v2, pushed sealed, embeds as the plaintext."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from sealstore.errors import AuthenticationError
from sealstore.kms.local import LocalKeyring
from sealstore.loaders import load_sentence_transformer
from sealstore.vault.store import Store

SENTENCES = [
    "Sealed weights never touch the disk in plaintext.",
    "A cat sat on the mat.",
    "Confidential computing keeps models secret on shared machines.",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def plain_embeddings(path: Path) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(SENTENCES, convert_to_tensor=True)


def watch_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file the process creates or opens for writing, by either open."""
    created: list[str] = []
    real_os_open, real_open = os.open, open

    def os_open(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            created.append(os.fspath(path))
        return real_os_open(path, flags, *a, **k)

    def py_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if any(c in mode for c in "wax+"):
            created.append(str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr("builtins.open", py_open)
    return created


def test_sealed_minilm_embeds_like_the_plaintext_model(
    ring: LocalKeyring, tmp_path: Path, minilm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.init(f"file://{tmp_path}/store")
    store.push(minilm, "minilm", keys=["local:"], tenant="search")
    scratch = tmp_path / "shm"
    scratch.mkdir()
    created = watch_writes(monkeypatch)
    model = load_sentence_transformer(
        f"sealstore+{store.url}#minilm@latest", tenant="search", device="cpu", scratch_dir=scratch
    )
    monkeypatch.undo()
    # Besides the store's own audit records, only the scratch folder's non-weight
    # files were written, and it is gone.
    created = [p for p in created if not p.startswith(str(tmp_path / "store" / "audit"))]
    assert created and all(p.startswith(str(scratch)) for p in created), created
    written = {Path(p).name for p in created}
    assert "modules.json" in written and "tokenizer.json" in written
    assert not any(n.endswith((".safetensors", ".bin")) for n in written)
    assert list(scratch.iterdir()) == []
    ours = model.encode(SENTENCES, convert_to_tensor=True)
    reference = plain_embeddings(minilm)
    assert torch.allclose(ours, reference, atol=1e-6)
    assert torch.nn.functional.cosine_similarity(ours, reference).min() >= 0.9999
    # By NAME with store=, in /dev/shm by default: nothing of ours left there.
    before = set(os.listdir("/dev/shm"))
    again = load_sentence_transformer("minilm:1", store=store, tenant="search", device="cpu")
    assert not [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("sealstore-st-")]
    assert torch.equal(again.encode(SENTENCES, convert_to_tensor=True), ours)


def test_loaded_model_saves_and_reloads_like_a_plain_one(
    ring: LocalKeyring, tmp_path: Path, minilm: Path
) -> None:
    """A Dense module's weights come from the artifact too; module classes are the real ones."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.dense import Dense

    base = SentenceTransformer(str(minilm), device="cpu")
    torch.manual_seed(0)
    dense = Dense(384, 32, activation_function=torch.nn.Tanh())
    plain = SentenceTransformer(modules=[*base, dense], device="cpu")
    plain.save(str(tmp_path / "with-dense"))
    store = Store.init(f"file://{tmp_path}/store")
    store.push(tmp_path / "with-dense", "dense", keys=["local:"])
    model = load_sentence_transformer(
        f"sealstore+{store.url}#dense", device="cpu", scratch_dir=tmp_path
    )
    got = model.encode(SENTENCES, convert_to_tensor=True)
    assert got.shape == (3, 32)
    assert torch.allclose(got, plain.encode(SENTENCES, convert_to_tensor=True), atol=1e-6)
    assert [type(m) for m in model] == [type(m) for m in plain]
    model.save(str(tmp_path / "resaved"))
    types = [e["type"] for e in json.loads((tmp_path / "resaved" / "modules.json").read_text())]
    assert all(t.startswith("sentence_transformers.") for t in types)
    reloaded = SentenceTransformer(str(tmp_path / "resaved"), device="cpu")
    assert torch.allclose(reloaded.encode(SENTENCES, convert_to_tensor=True), got, atol=1e-6)


def test_tampered_weights_fail_and_leave_nothing(
    ring: LocalKeyring, tmp_path: Path, minilm: Path
) -> None:
    store = Store.init(f"file://{tmp_path}/store")
    m = store.push(minilm, "minilm", keys=["local:"])
    weights = next(f for f in m.files if f.path == "model.safetensors")
    obj = tmp_path / "store" / "objects" / "default" / weights.object
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 1
    obj.write_bytes(bytes(data))
    scratch = tmp_path / "shm"
    scratch.mkdir()
    model = None
    with pytest.raises(AuthenticationError):
        model = load_sentence_transformer(
            f"sealstore+{store.url}#minilm", device="cpu", scratch_dir=scratch
        )
    assert model is None
    assert list(scratch.iterdir()) == []


def test_trust_remote_code_is_refused(ring: LocalKeyring, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trust_remote_code=True is refused"):
        load_sentence_transformer("minilm", store=f"file://{tmp_path}/none", trust_remote_code=True)


def test_a_killed_loads_scratch_folder_is_swept(
    ring: LocalKeyring, tmp_path: Path, minilm: Path
) -> None:
    store = Store.init(f"file://{tmp_path}/store")
    store.push(minilm, "minilm", keys=["local:"])
    scratch = tmp_path / "shm"
    stale = scratch / "sealstore-st-left-by-a-killed-load"
    stale.mkdir(parents=True)
    (stale / "tokenizer.json").write_text("{}")
    load_sentence_transformer("minilm", store=store, device="cpu", scratch_dir=scratch)
    assert list(scratch.iterdir()) == []


def test_cuda_without_a_gpu_fails_before_any_key(ring: LocalKeyring, tmp_path: Path) -> None:
    from sealstore.loaders import DeviceUnavailable

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(DeviceUnavailable):
        load_sentence_transformer("minilm", store=f"file://{tmp_path}/none", device="cuda")


def test_guard_is_put_on_the_loaded_model(ring: LocalKeyring, tmp_path: Path, minilm: Path) -> None:
    store = Store.init(f"file://{tmp_path}/store")
    store.push(minilm, "minilm", keys=["local:"])
    model = load_sentence_transformer("minilm", store=store, device="cpu", guard=True)
    g = model.sealstore_guard
    try:
        assert (g.target.name, g.target.artifact, g.target.version) == ("minilm:1", "minilm", "1")
        got = model.encode(SENTENCES, convert_to_tensor=True)
        assert torch.allclose(got, plain_embeddings(minilm), atol=1e-6)
    finally:
        g.remove()


def test_an_encoder_only_t5_model_loads_as_sentence_transformers_picks_it(
    ring: LocalKeyring, tmp_path: Path, minilm: Path
) -> None:
    """T5: sentence-transformers builds a T5EncoderModel, not the AutoModel (encoder-decoder)."""
    import shutil

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    hf = tmp_path / "t5"
    T5EncoderModel(config).save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm / name, hf / name)
    plain = SentenceTransformer(modules=[Transformer(str(hf)), Pooling(32, "mean")], device="cpu")
    plain.save(str(tmp_path / "t5-st"))
    store = Store.init(f"file://{tmp_path}/store")
    store.push(tmp_path / "t5-st", "t5", keys=["local:"])
    model = load_sentence_transformer("t5", store=store, device="cpu", scratch_dir=tmp_path)
    assert type(model[0].auto_model) is T5EncoderModel
    got = model.encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(got, plain.encode(SENTENCES, convert_to_tensor=True), atol=1e-6)


def test_a_loaded_model_fine_tunes(ring: LocalKeyring, tmp_path: Path, minilm: Path) -> None:
    """Its parameters are ordinary trainable ones: a step of training moves the embeddings."""
    store = Store.init(f"file://{tmp_path}/store")
    store.push(minilm, "minilm", keys=["local:"])
    model = load_sentence_transformer("minilm", store=store, device="cpu", scratch_dir=tmp_path)
    before = model.encode(SENTENCES, convert_to_tensor=True)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    features = model.preprocess(SENTENCES)
    embeddings = model(features)["sentence_embedding"]
    loss = -(embeddings[0] @ embeddings[1])  # pull the first two sentences together
    loss.backward()
    assert all(p.grad is not None for p in model[0].auto_model.encoder.parameters())
    optimizer.step()
    model.eval()
    after = model.encode(SENTENCES, convert_to_tensor=True)
    assert (after[0] @ after[1]) > (before[0] @ before[1])
