"""``verify_signature=True`` on safe_open, torch_load, the fsspec file system and the vLLM loader.

The model directory is signed by the real ``model_signing`` command (OMS:
a Sigstore bundle whose in-toto statement lists every file's SHA-256) and
pushed with ``require_signature``. The tampered case is the one only the
signature catches: whoever holds the store's own signing key re-signs a
manifest that claims the signed digests for changed files, so the manifest,
the object digests and every chunk tag pass.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from safetensors.torch import save_file

from sealstore.errors import AuthenticationError
from sealstore.loaders.safetensors import safe_open
from sealstore.loaders.torch_io import torch_load
from sealstore.stream import SealedFile
from tests.test_oms import ec_pair, ms

MISMATCH = "does not match the model signature"
CS = 1 << 16  # small chunks: the files below span many of them


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "embed.weight": torch.randn(512, 256, generator=g),  # 512 KiB: 8 chunks
        "head.bias": torch.randn(300, generator=g),
        "layer.0.weight": torch.randn(64, 64, generator=g).to(torch.float16),
    }


@pytest.fixture
def signed(store: Any, tmp_path: Path) -> dict[str, Any]:
    """A model folder signed by ``model_signing``, pushed as mini:1; a forged mini:2."""
    priv, pub = ec_pair(tmp_path, "publisher", ec.SECP256R1())
    _other, other = ec_pair(tmp_path, "other", ec.SECP384R1())
    folder = tmp_path / "model"
    folder.mkdir()
    tensors = _tensors()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    state = {"w": torch.arange(200_000, dtype=torch.float32), "b": torch.ones(3)}
    torch.save(state, folder / "weights.pt")
    (folder / "config.json").write_text(json.dumps({"hidden_size": 256}))
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # left out of signatures
    done = ms("sign", "key", "--signature", folder / "model.sig", "--private_key", priv, folder)
    assert done.returncode == 0, done.stderr
    v1 = store.push(
        folder, "mini", keys=["local:"], chunk_size=CS, require_signature=True, public_key=pub
    )
    assert v1.oms is not None
    # The forgery: other bytes, re-signed by the store's key as if they were the signed ones.
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "model.sig"}
    changed = dict(tensors, **{"head.bias": tensors["head.bias"] + 1})
    save_file(changed, tmp_path / "changed.safetensors", metadata={"format": "pt"})
    files["model.safetensors"] = (tmp_path / "changed.safetensors").read_bytes()
    torch.save(dict(state, b=torch.zeros(3)), tmp_path / "changed.pt")
    files["weights.pt"] = (tmp_path / "changed.pt").read_bytes()
    files["config.json"] = json.dumps({"hidden_size": 257}).encode()
    v2 = store.push(files, "mini", keys=["local:"], chunk_size=CS)
    digests = {f.path: f.sha256 for f in v1.files}
    forged = dataclasses.replace(
        v2,
        files=tuple(dataclasses.replace(f, sha256=digests[f.path]) for f in v2.files),
        oms=v1.oms,
        signer=None,
    )
    before = store.manifest_bytes("mini", "2", tenant=v2.tenant)
    store.replace_manifest(v2, before, forged.sign(store.signer))
    return {"pub": pub, "other": other, "tensors": tensors, "state": state, "url": store.url}


class _Counting:
    """Counts the chunks SealedFile decrypts (the real method, wrapped)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real = SealedFile._decrypt_chunk

        def counted(sf: SealedFile, *args: Any) -> Any:
            self.n += 1
            return real(sf, *args)

        monkeypatch.setattr(SealedFile, "_decrypt_chunk", counted)


def test_safe_open_verifies_at_open(store: Any, signed: dict[str, Any]) -> None:
    pub, want = signed["pub"], signed["tensors"]
    with safe_open("mini:1", store=store, verify_signature=True, public_key=pub) as f:
        assert sorted(f.keys()) == sorted(want)
        assert all(torch.equal(f.get_tensor(k), want[k]) for k in want)
    ref = f"sealstore+{signed['url']}#mini:1/model.safetensors"
    with safe_open(ref, verify_signature=True, public_key=pub) as f:
        assert torch.equal(f.get_slice("embed.weight")[:4], want["embed.weight"][:4])
    with pytest.raises(AuthenticationError, match=MISMATCH):
        safe_open("mini:2", store=store, verify_signature=True, public_key=pub)
    # Without the check the forgery opens: the store vouches for it.
    with safe_open("mini:2", store=store) as f:
        assert not torch.equal(f.get_tensor("head.bias"), want["head.bias"])
    with pytest.raises(AuthenticationError, match="another key"):
        safe_open("mini:1", store=store, verify_signature=True, public_key=signed["other"])
    with pytest.raises(ValueError, match="public key"):
        safe_open("mini:1", store=store, verify_signature=True)
    with pytest.raises(ValueError, match="store version"):
        safe_open(Path("x.safetensors"), verify_signature=True, public_key=pub)


def test_safe_open_check_costs_one_streaming_pass(
    store: Any, signed: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    count = _Counting(monkeypatch)
    with safe_open("mini:1", store=store, verify_signature=True, public_key=signed["pub"]) as f:
        at_open = count.n
        chunks = f._sf.chunk_count
        f.get_tensor("head.bias")
    # The pass, plus a constant: the final chunk authenticated first, the header parsed.
    assert chunks > 8 and chunks <= at_open <= chunks + 4


def test_torch_load_hashes_as_torch_reads(
    store: Any, signed: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pub, want = signed["pub"], signed["state"]
    count = _Counting(monkeypatch)
    torch_load("mini:1/weights.pt", store=store)
    unchecked, count.n = count.n, 0
    got = torch_load("mini:1/weights.pt", store=store, verify_signature=True, public_key=pub)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # No second pass: the check decrypts at most the few chunks holding bytes
    # torch skipped, not the file again.
    size = next(f.size for f in store.manifest("mini:1").files if f.path == "weights.pt")
    chunks = -(-size // CS)
    assert chunks > 8 and count.n <= unchecked + 3, (count.n, unchecked, chunks)
    with pytest.raises(AuthenticationError, match=MISMATCH):
        torch_load("mini:2/weights.pt", store=store, verify_signature=True, public_key=pub)
    assert torch.equal(torch_load("mini:2/weights.pt", store=store)["b"], torch.zeros(3))
    with pytest.raises(AuthenticationError, match="another key"):
        torch_load(
            "mini:1/weights.pt", store=store, verify_signature=True, public_key=signed["other"]
        )
    with pytest.raises(ValueError, match="store version"):
        torch_load("weights.pt.seal", verify_signature=True, public_key=pub)


def test_fsspec_verify_signature(
    store: Any, signed: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fsspec

    pub, url = str(signed["pub"]), signed["url"]
    fs = fsspec.filesystem("sealstore+file", verify_signature=True, public_key=pub)
    base = f"sealstore+{url}#mini"
    config = fs.cat_file(f"{base}:1/config.json")
    assert json.loads(config) == {"hidden_size": 256}
    assert fs.cat_file(f"{base}:1/config.json", start=2, end=8) == config[2:8]
    with fs.open(f"{base}:1/model.safetensors") as fp:
        fp.seek(8)  # random access after the check at open
        head = fp.read(100)
    plain = fsspec.filesystem("sealstore+file")
    assert head == plain.cat_file(f"{base}:1/model.safetensors")[8:108]
    # A worker reopens a pickled file with the same options: checked again there.
    with fs.open(f"{base}:1/config.json") as fp:
        blob = pickle.dumps(fp)
    with pickle.loads(blob) as again:  # noqa: S301 -- our own pickle
        assert again.raw._reopener.fs.signature_key is not None
        assert json.loads(again.read()) == {"hidden_size": 256}
    for path in ("config.json", "model.safetensors"):
        with pytest.raises(AuthenticationError, match=MISMATCH):
            fs.cat_file(f"{base}:2/{path}")
        with pytest.raises(AuthenticationError, match=MISMATCH):
            fs.open(f"{base}:2/{path}")
    # cat_file: one decryption of the whole file, hashed beside it.
    count = _Counting(monkeypatch)
    assert len(fs.cat_file(f"{base}:1/model.safetensors")) > 8 * CS
    size = next(f.size for f in store.manifest("mini:1").files if f.path == "model.safetensors")
    assert count.n == -(-size // CS)
    with pytest.raises(ValueError, match="public key"):
        fsspec.filesystem("sealstore+file", verify_signature=True, skip_instance_cache=True)


def test_vllm_loader_verify_signature(store: Any, signed: dict[str, Any], tmp_path: Path) -> None:
    """The API-server side (prepare) and the worker's weight stream, without starting vLLM."""
    from sealstore.loaders.artifact import iter_weight_shards
    from sealstore.loaders.vllm_plugin import Options, open_version, prepare

    pub, base = str(signed["pub"]), f"sealstore+{signed['url']}#mini"
    opts = Options.parse(
        {"verify_signature": True, "public_key": pub, "scratch_dir": str(tmp_path)}
    )
    assert opts.verify_signature and opts.public_key == pub
    folder, pinned = prepare(base + ":1", opts)
    assert pinned == base + ":1"
    assert json.loads((Path(folder) / "config.json").read_text()) == {"hidden_size": 256}
    assert not (Path(folder) / ".gitattributes").exists()  # not covered: not decrypted
    with open_version(pinned, opts) as art:
        got = {k: v for _p, part in iter_weight_shards(art, None) for k, v in part.items()}
    want = signed["tensors"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # The forged version: its config is refused in the API server...
    with pytest.raises(AuthenticationError, match=MISMATCH):
        prepare(base + ":2", opts)
    # ... and its weights in the worker, before vLLM gets a tensor.
    with open_version(base + ":2", opts) as art, pytest.raises(AuthenticationError, match=MISMATCH):
        next(iter(iter_weight_shards(art, None)))
    other = dataclasses.replace(opts, public_key=str(signed["other"]))
    with pytest.raises(AuthenticationError, match="another key"):
        prepare(base + ":1", other)
    with pytest.raises(ValueError, match="verify_signature must be true or false"):
        Options.parse({"verify_signature": "yes"})
