"""sealstore.loaders.from_pretrained against transformers' own AutoModel.from_pretrained.

The real all-MiniLM-L6-v2, pushed sealed to a file:// store: sharded
checkpoints, one unwrap per version, dtype / device_map / attn_implementation
/ revision, refusals, head classes, and the peak memory of a load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from sealstore.errors import FormatError
from sealstore.kms.local import LocalKeyring
from sealstore.loaders import from_pretrained
from sealstore.vault.store import Store

IDS = torch.tensor([[101, 7592, 2088, 1010, 2129, 2024, 2017, 102]])


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def pushed(store: Store, minilm: Path) -> str:
    """MiniLM as pushed, one model.safetensors: its reference."""
    store.push(minilm, "minilm", keys=["local:"])
    return f"sealstore+{store.url}#minilm"


def sharded_copy(minilm: Path, dest: Path) -> Path:
    """MiniLM as ``save_pretrained(max_shard_size=...)`` writes it: an index and shards."""
    AutoModel.from_pretrained(minilm).save_pretrained(dest, max_shard_size="20MB")
    assert (dest / "model.safetensors.index.json").exists()
    return dest


def hidden(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def count_unwraps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = LocalKeyring.unwrap

    def counting(self: LocalKeyring, *a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(LocalKeyring, "unwrap", counting)
    return calls


def test_sharded_checkpoint_loads_like_plaintext_with_one_unwrap(
    store: Store, minilm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain_dir = sharded_copy(minilm, tmp_path / "sharded")
    shards = sorted(p.name for p in plain_dir.glob("*.safetensors"))
    assert len(shards) > 2
    store.push(plain_dir, "minilm-sharded", keys=["local:"])
    unwraps = count_unwraps(monkeypatch)
    model = from_pretrained(f"sealstore+{store.url}#minilm-sharded")
    assert len(unwraps) == 1  # config, index and every shard share the version's DEK
    plain = AutoModel.from_pretrained(plain_dir)
    assert torch.equal(hidden(model), hidden(plain))
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_index_that_misplaces_a_tensor_is_a_format_error(
    store: Store, minilm: Path, tmp_path: Path
) -> None:
    plain_dir = sharded_copy(minilm, tmp_path / "sharded")
    index_path = plain_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    index_path.write_text(json.dumps(index))
    store.push(plain_dir, "bad-index", keys=["local:"])
    with pytest.raises(FormatError, match="index"):
        from_pretrained(f"sealstore+{store.url}#bad-index")


@pytest.mark.parametrize("option", ["dtype", "torch_dtype"])
def test_dtype_matches_transformers(pushed: str, minilm: Path, option: str) -> None:
    model = from_pretrained(pushed, **{option: torch.float16})
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    plain = AutoModel.from_pretrained(minilm, dtype=torch.float16)
    assert torch.equal(hidden(model.float()), hidden(plain.float()))


ONE_DEVICE_MAPS = [
    "cpu",
    torch.device("cpu"),
    {"": "cpu"},
    {"embeddings": "cpu", "encoder": "cpu", "pooler": "cpu"},
]


@pytest.mark.parametrize("device_map", ONE_DEVICE_MAPS)
def test_device_map_onto_one_device_without_accelerate(pushed: str, device_map: Any) -> None:
    model = from_pretrained(pushed, device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("device_map", ["cuda:0", 0, {"": "cuda:0"}])
def test_device_map_onto_one_gpu_matches_plaintext(
    pushed: str, minilm: Path, device_map: Any
) -> None:
    model = from_pretrained(pushed, device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    with torch.no_grad():
        got = model(input_ids=IDS.cuda()).last_hidden_state.cpu()
    assert torch.allclose(got, hidden(AutoModel.from_pretrained(minilm)), atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_map_onto_a_missing_gpu_is_refused_before_any_key(
    pushed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealstore.loaders import DeviceUnavailable

    unwraps = count_unwraps(monkeypatch)
    with pytest.raises(DeviceUnavailable, match="sees no CUDA"):
        from_pretrained(pushed, device_map="cuda:0")
    assert unwraps == []


def test_device_map_that_leaves_a_module_out_is_refused(pushed: str) -> None:
    with pytest.raises(ValueError, match="does not place pooler"):
        from_pretrained(pushed, device_map={"embeddings": "cpu", "encoder": "cpu"})


def test_device_map_auto_without_accelerate_is_refused_as_transformers_does(
    pushed: str, minilm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("transformers")
    from transformers.utils import is_accelerate_available

    if is_accelerate_available():
        pytest.skip("accelerate is installed: 'auto' is planned by it")
    with pytest.raises(ValueError, match="accelerate"):
        AutoModel.from_pretrained(minilm, device_map="auto")
    unwraps = count_unwraps(monkeypatch)
    with pytest.raises(ValueError, match="needs accelerate"):
        from_pretrained(pushed, device_map="auto")
    with pytest.raises(ValueError, match="several devices needs accelerate"):
        from_pretrained(pushed, device_map={"embeddings": "cpu", "encoder": "meta"})
    assert unwraps == []  # refused before any key was asked for


def test_disk_offload_is_refused(pushed: str) -> None:
    with pytest.raises(ValueError, match="plaintext weights to disk"):
        from_pretrained(pushed, device_map={"": "disk"})
    with pytest.raises(ValueError, match="plaintext weights to disk"):
        from_pretrained(pushed, offload_folder="/tmp/offload")


def test_trust_remote_code_is_refused_before_any_key(
    pushed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    unwraps = count_unwraps(monkeypatch)
    with pytest.raises(ValueError, match="trust_remote_code=True is refused"):
        from_pretrained(pushed, trust_remote_code=True)
    assert unwraps == []


def test_unknown_arguments_are_refused_known_ones_pass(pushed: str) -> None:
    with pytest.raises(ValueError, match="unknown argument 'foo_bar'"):
        from_pretrained(pushed, foo_bar=1)
    with pytest.raises(ValueError, match="unknown argument 'to_dict'"):
        from_pretrained(pushed, to_dict=1)  # a config method is not an attribute to set
    with pytest.raises(ValueError, match="nothing is downloaded"):
        from_pretrained(pushed, cache_dir="/tmp/hf")
    model = from_pretrained(
        pushed,
        output_attentions=True,  # a config attribute, as transformers sets it
        add_pooling_layer=False,  # a BertModel argument
        attn_implementation="eager",
        low_cpu_mem_usage=True,
    )
    assert model.config.output_attentions is True
    assert model.pooler is None
    assert model.config._attn_implementation == "eager"
    assert not hasattr(model.config, "foo_bar")


def test_revision_selects_the_version(store: Store, minilm: Path, tmp_path: Path) -> None:
    store.push(minilm, "minilm", keys=["local:"])
    store.push(sharded_copy(minilm, tmp_path / "sharded"), "minilm", keys=["local:"])
    ref = f"sealstore+{store.url}#minilm"
    _m, info = from_pretrained(ref, revision="1", output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert hidden(from_pretrained(ref, revision="2")).shape == hidden(_m).shape
    with pytest.raises(ValueError, match="conflicts"):
        from_pretrained(f"{ref}:2", revision="1")
    from sealstore.errors import NotFound
    from sealstore.loaders import load_tokenizer

    assert load_tokenizer(ref, revision="1")("a cat")["input_ids"][0] == 101
    with pytest.raises(NotFound, match=r"minilm:2 has no tokenizer files"):
        load_tokenizer(ref, revision="2")  # the sharded copy has weights only


def test_head_class_initialises_the_missing_head_and_warns(
    pushed: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="transformers"):
        model = from_pretrained(pushed, AutoModelForSequenceClassification, num_labels=3)
    report = caplog.text  # transformers' own load report
    assert "classifier.weight" in report and "MISSING" in report
    assert model.classifier.weight.shape == (3, 384)
    assert torch.isfinite(model.classifier.weight).all()
    with torch.no_grad():
        assert model(input_ids=IDS).logits.shape == (1, 3)
    with pytest.raises(ValueError, match=r"missing parameter\(s\).*strict=True"):
        from_pretrained(pushed, AutoModelForSequenceClassification, strict=True)


def test_generative_model_gets_the_artifacts_generation_config(
    store: Store, tmp_path: Path
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=101))
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(tmp_path / "gpt2")
    assert (tmp_path / "gpt2" / "generation_config.json").exists()
    store.push(tmp_path / "gpt2", "tiny-gpt2", keys=["local:"])
    loaded = from_pretrained(f"sealstore+{store.url}#tiny-gpt2", AutoModelForCausalLM, strict=True)
    assert loaded.generation_config.max_new_tokens == 7
    ids = torch.tensor([[1, 5, 9]])
    assert torch.equal(
        loaded.generate(ids, do_sample=False), model.eval().generate(ids, do_sample=False)
    )


def test_base_model_loads_strictly(pushed: str, minilm: Path) -> None:
    model = from_pretrained(pushed, strict=True)
    assert torch.equal(hidden(model), hidden(AutoModel.from_pretrained(minilm)))


_PEAK = textwrap.dedent(
    """
    import os, sys, json
    import torch, transformers
    from transformers import AutoModel, BertModel
    import sealstore.loaders
    from sealstore.vault.store import Store

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024

    mode, src = sys.argv[1], sys.argv[2]
    store = Store.open(src.split("#")[0].removeprefix("sealstore+")) if mode == "sealed" else None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts here, after every import
    base = hwm()
    if mode == "plain":
        model = AutoModel.from_pretrained(src)
    else:
        model = sealstore.loaders.from_pretrained(src)
    with torch.no_grad():  # one forward pass: every weight resident in both cases
        model(input_ids=torch.tensor([[101, 2023, 102]]))
    print(json.dumps({"base": base, "peak": hwm()}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_close_to_plaintext_from_pretrained(pushed: str, minilm: Path) -> None:
    """Sealed: the weights once (built on meta, decrypted into the tensors kept)."""

    def run(mode: str, src: str) -> dict[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _PEAK, mode, src],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    plain = run("plain", str(minilm))
    sealed = run("sealed", pushed)
    grew_plain = plain["peak"] - plain["base"]
    grew_sealed = sealed["peak"] - sealed["base"]
    # Random init then a copy (the old loader) grew by three times the weights.
    assert grew_sealed <= 1.5 * grew_plain + (50 << 20), (grew_sealed >> 20, grew_plain >> 20)


def test_missing_shard_is_not_found(store: Store, minilm: Path, tmp_path: Path) -> None:
    from sealstore.errors import NotFound

    plain_dir = sharded_copy(minilm, tmp_path / "sharded")
    victim = sorted(plain_dir.glob("*.safetensors"))[0]
    shutil.move(victim, tmp_path / victim.name)
    store.push(plain_dir, "holey", keys=["local:"])
    with pytest.raises(NotFound, match="lacks the shard"):
        from_pretrained(f"sealstore+{store.url}#holey")
