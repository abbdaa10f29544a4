"""Rank-partitioned loads: ``load_file`` / ``safe_open`` with ``plan=`` (loaders/partition.py).

Each rank's tensors must equal slicing the full load, and a rank must decrypt
only the chunks its slices cover (counted by wrapping ``SealedFile._decrypt_chunk``,
which every decrypted chunk goes through). The multi-process tests run real
torch.distributed (gloo) ranks, one spawn per world size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from benchmarks._tp_model import RULES, decrypted, synthetic
from sealstore.errors import AuthenticationError
from sealstore.kms.envelope import seal_file
from sealstore.kms.local import LocalKeyring
from sealstore.loaders import (
    TensorNotFound,
    TensorSlice,
    load_file,
    safe_open,
    tensor_parallel,
)
from sealstore.loaders.partition import as_plan
from sealstore.loaders.st_header import Layout
from sealstore.stream import SealedFile
from sealstore.vault.store import Store
from tests.conftest import CS

H, V, FF, LAYERS = 256, 2048, 1024, 2

# BERT's split (all-MiniLM-L6-v2): its vocabulary (30522) does not divide by 4,
# so the word embeddings are replicated here.
BERT_RULES = {
    "column": ("*.attention.self.*", "*.intermediate.dense.*"),
    "row": ("*.attention.output.dense.*", "*.output.dense.*"),
}


def sealed_synthetic(tmp_path: Path) -> tuple[Path, Path]:
    """(plaintext file, the same sealed with 64 KiB chunks): ~8.5 MiB, 136 chunks."""
    plain, sealed = tmp_path / "model.safetensors", tmp_path / "model.seal"
    st_save_file(synthetic(H, FF, V, LAYERS), plain)
    seal_file(plain, sealed, keys=["local:"], chunk_size=CS)
    return plain, sealed


def expected(full: dict[str, torch.Tensor], plan: Any) -> dict[str, torch.Tensor]:
    """What a rank should get: each tensor of the full load narrowed as the plan says."""
    out = {}
    for name, t in full.items():
        part = plan.slice_for(name)
        if part is None:
            continue
        got = part.resolve(name, list(t.shape))
        out[name] = t if got is None else t.narrow(got[0], got[1], got[2] - got[1])
    return out


def header_cost(sealed: Path) -> int:
    """Bytes decrypted to parse the safetensors header (read before any tensor)."""
    from sealstore.kms.envelope import open_sealed

    with open_sealed(sealed) as sf, decrypted() as n:
        Layout(sf)
    return n[0]


def bound(full: dict[str, torch.Tensor], plan: Any, header: int) -> tuple[int, int]:
    """(this rank's share of the data, the most it may decrypt).

    A dim-0 slice (or a whole tensor) covers its own bytes and at most one
    partial chunk at each end; a slice of dim > 0 touches every chunk of its
    tensor, so the tensor counts whole. Plus the header and the final chunk.
    """
    share = limit = 0
    slices = 0
    for name, t in full.items():
        part = plan.slice_for(name)
        if part is None:
            continue
        got = part.resolve(name, list(t.shape))
        nbytes = t.numel() * t.element_size()
        if got is None:
            share += nbytes
            limit += nbytes
        else:
            dim, lo, hi = got
            share += nbytes * (hi - lo) // t.shape[dim]
            limit += nbytes * (hi - lo) // t.shape[dim] if dim == 0 else nbytes
        slices += 1
    return share, limit + header + (2 * slices + 1) * CS


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_each_rank_gets_the_megatron_slices_of_the_full_load(
    ring: LocalKeyring, tmp_path: Path
) -> None:
    """World sizes 1, 2, 4: column, row, vocab and replicated tensors as slices of the full load."""
    plain, sealed = sealed_synthetic(tmp_path)
    full = st_load_file(plain)
    for world in (1, 2, 4):
        parts = []
        for rank in range(world):
            plan = tensor_parallel(rank, world, **RULES)
            got = load_file(sealed, plan=plan)
            assert same(dict(sorted(got.items())), dict(sorted(expected(full, plan).items())))
            assert all(t.is_contiguous() for t in got.values())
            parts.append(got)
        # The ranks' parts put back together are the model, each along Megatron's
        # dimension (worked out here from the name, not by the plan's code).
        for name, t in full.items():
            got = [p[name] for p in parts]
            split = name.endswith(("qkv.weight", "qkv.bias", "up.weight", "up.bias"))
            if name == "embed.weight" or split:
                assert [g.shape[0] for g in got] == [t.shape[0] // world] * world
                assert torch.equal(torch.cat(got, 0), t), name
            elif name.endswith(("proj.weight", "down.weight")):
                assert [g.shape[1] for g in got] == [t.shape[1] // world] * world
                assert torch.equal(torch.cat(got, 1), t), name
            else:  # norms and row-parallel biases: replicated
                assert all(torch.equal(g, t) for g in got), name


def test_a_dim0_rank_decrypts_its_share_plus_one_chunk_per_slice_boundary(
    ring: LocalKeyring, tmp_path: Path
) -> None:
    """Every tensor split along dim 0: each of 4 ranks decrypts about a quarter of the data."""
    plain, sealed = sealed_synthetic(tmp_path)
    full = st_load_file(plain)
    data = sum(t.numel() * t.element_size() for t in full.values())
    header = header_cost(sealed)
    for rank in range(4):
        plan = tensor_parallel(rank, 4, column=("*",))
        with decrypted() as n:
            load_file(sealed, plan=plan)
        share, limit = bound(full, plan, header)
        assert share == data // 4
        assert share <= n[0] <= limit
        assert n[0] < data // 2  # far from the whole file


def test_a_dim1_slice_decrypts_every_chunk_of_its_tensor_only(
    ring: LocalKeyring, tmp_path: Path
) -> None:
    """A row-parallel weight's columns lie in every row: its chunks, no others'."""
    plain, sealed = sealed_synthetic(tmp_path)
    full = st_load_file(plain)
    plan = {"layers.1.down.weight": TensorSlice.part(1, 1, 4)}
    with decrypted() as n:
        got = load_file(sealed, plan=plan)
    want = full["layers.1.down.weight"][:, FF // 4 : FF // 2]
    assert torch.equal(got["layers.1.down.weight"], want)
    nbytes = H * FF * 4
    assert nbytes <= n[0] <= bound(full, as_plan(plan), header_cost(sealed))[1]


def test_safe_open_with_a_plan_gives_this_ranks_slices(ring: LocalKeyring, tmp_path: Path) -> None:
    """keys are the plan's tensors; get_tensor / get_tensors slice; get_slice is unchanged."""
    plain, sealed = sealed_synthetic(tmp_path)
    full = st_load_file(plain)
    plan = tensor_parallel(1, 2, skip=("*.norm.*",), **RULES)
    with safe_open(sealed, plan=plan) as f:
        assert "layers.0.norm.weight" not in f.keys()  # noqa: SIM118 (keys() is the API tested)
        assert len(f.keys()) == len(full) - LAYERS
        assert torch.equal(
            f.get_tensor("layers.0.up.weight"), full["layers.0.up.weight"][FF // 2 :]
        )
        assert torch.equal(
            f.get_tensor("layers.0.proj.weight"), full["layers.0.proj.weight"][:, H // 2 :]
        )
        assert same(f.get_tensors(), expected(full, plan))
        assert torch.equal(f.get_slice("embed.weight")[3:5], full["embed.weight"][3:5])
        with pytest.raises(TensorNotFound, match="not in this rank's plan"):
            f.get_tensor("layers.0.norm.weight")


def test_a_plan_the_file_cannot_satisfy_is_refused_in_one_line(
    ring: LocalKeyring, tmp_path: Path
) -> None:
    """A missing tensor, a slice past the end, an uneven split, a bad rank: one clear error."""
    _plain, sealed = sealed_synthetic(tmp_path)
    with pytest.raises(TensorNotFound, match=r"plan names tensor lm_head\.weight") as e:
        load_file(sealed, plan={"lm_head.weight": TensorSlice()})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"slice \[0, 5000\) of dim 0 is outside embed.weight"):
        load_file(sealed, plan={"embed.weight": TensorSlice(0, 0, 5000)})
    with pytest.raises(ValueError, match="shape"):
        safe_open(sealed, plan={"embed.weight": TensorSlice(2, 0, 1)})
    with pytest.raises(ValueError, match=r"dim 0 of embed\.weight \(size 2048\) into 5 parts"):
        load_file(sealed, plan=tensor_parallel(0, 5, **RULES))
    with pytest.raises(ValueError, match="rank 4 is not in range"):
        tensor_parallel(4, 4)
    with pytest.raises(ValueError, match="rank 3 is not in range"):
        TensorSlice(0, rank=3, world=2)
    with pytest.raises(TypeError, match="TensorSlice"):
        load_file(sealed, plan={"embed.weight": (0, 0, 1)})


def test_a_tampered_chunk_under_a_slice_fails_and_one_outside_it_is_not_read(
    ring: LocalKeyring, tmp_path: Path
) -> None:
    """A flipped bit inside a row-parallel weight fails its rank's load; other tensors load."""
    from sealstore.kms.envelope import open_sealed

    plain, sealed = sealed_synthetic(tmp_path)
    with open_sealed(sealed) as sf:
        layout = Layout(sf)
        start = layout.data_start + layout.entries["layers.1.down.weight"][2]
        where = sf.layout.offset(start // CS + 1) + 10
    data = bytearray(sealed.read_bytes())
    data[where] ^= 1
    sealed.write_bytes(data)
    with pytest.raises(AuthenticationError):
        load_file(sealed, plan={"layers.1.down.weight": TensorSlice.part(1, 0, 2)})
    got = load_file(sealed, plan={"embed.weight": TensorSlice.part(0, 1, 2)})
    assert torch.equal(got["embed.weight"], st_load_file(plain)["embed.weight"][V // 2 :])


def sharded_minilm(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """all-MiniLM-L6-v2 as a Hugging Face folder of 2 shards and an index; its state dict."""
    import shutil

    full = st_load_file(src / "model.safetensors")
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    names = list(full)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:])):
        shard = f"model-{k + 1:05d}-of-00002.safetensors"
        st_save_file({n: full[n].contiguous() for n in part}, dst / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return full


def test_a_rank_of_a_sharded_store_model_opens_only_its_shards(
    ring: LocalKeyring, tmp_path: Path, minilm: Path
) -> None:
    """The real all-MiniLM-L6-v2, pushed as 2 shards: a plan of one shard's tensors opens one."""
    from sealstore.loaders.artifact import StoreArtifact

    full = sharded_minilm(minilm, tmp_path / "minilm")
    store = Store.init(f"file://{tmp_path}/store")
    store.push(tmp_path / "minilm", "minilm", keys=["local:"])
    ref = f"sealstore+{store.url}#minilm:1"
    layer5 = [n for n in full if n.startswith("encoder.layer.5.")]
    opened: list[str] = []
    real = StoreArtifact.open

    def counting(self: StoreArtifact, path: str) -> SealedFile:
        opened.append(path)
        return real(self, path)

    StoreArtifact.open = counting  # type: ignore[method-assign]
    try:
        plan = tensor_parallel(
            0, 2, skip=("embeddings.*", "encoder.layer.[0-4].*", "pooler.*"), **BERT_RULES
        )
        got = load_file(ref, plan=plan)
    finally:
        StoreArtifact.open = real  # type: ignore[method-assign]
    assert opened == ["model.safetensors.index.json", "model-00002-of-00002.safetensors"]
    assert sorted(got) == sorted(layer5)
    assert same(dict(sorted(got.items())), dict(sorted(expected(full, plan).items())))
    q = "encoder.layer.5.attention.self.query.weight"
    assert got[q].shape == (192, 384)
    with pytest.raises(TensorNotFound, match="plan names tensor nope"):
        load_file(ref, plan={"nope": TensorSlice()})


def test_a_rank_of_a_sealed_folder_loads_its_slices_from_the_shards_it_needs(
    ring: LocalKeyring, tmp_path: Path, minilm: Path
) -> None:
    """all-MiniLM-L6-v2 saved by save_pretrained as a sharded sealed folder, loaded by rank."""
    from transformers import AutoModel

    from sealstore.loaders import save_pretrained
    from sealstore.loaders.artifact import SealedFolder

    model = AutoModel.from_pretrained(minilm)
    out = save_pretrained(model, tmp_path / "ft", keys=["local:"], max_shard_size="30MB")
    full = {k: v.contiguous() for k, v in model.state_dict().items()}
    opened: list[str] = []
    real = SealedFolder.open

    def counting(self: SealedFolder, path: str) -> SealedFile:
        opened.append(path)
        return real(self, path)

    skip = ("embeddings.*", "encoder.layer.[0-4].*")
    plan = tensor_parallel(3, 4, skip=skip, **BERT_RULES)
    SealedFolder.open = counting  # type: ignore[method-assign]
    try:
        got = load_file(out, plan=plan)
    finally:
        SealedFolder.open = real  # type: ignore[method-assign]
    want = expected(full, plan)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    weight_map = SealedFolder(out).json("model.safetensors.index.json")["weight_map"]
    needed = {weight_map[k] for k in want}
    assert [p for p in opened if p.endswith(".safetensors")] == sorted(needed)
    assert len(needed) < len(set(weight_map.values()))  # a shard was never opened
    q = "encoder.layer.5.attention.self.query.weight"
    assert torch.equal(got[q], full[q][3 * 96 :])


def _rank(rank: int, world: int, workdir: str) -> None:
    """One gloo rank: load its plan of both models, check it against the full load and the bound."""
    import torch.distributed as dist

    work = Path(workdir)
    dist.init_process_group(
        "gloo", init_method=f"file://{work}/rendezvous", rank=rank, world_size=world
    )
    try:
        full = st_load_file(work / "model.safetensors")
        plan = tensor_parallel(rank, world, **RULES)
        got = load_file(work / "model.seal", plan=plan)
        assert same(dict(sorted(got.items())), dict(sorted(expected(full, plan).items())))
        # All-gather the column-parallel slices: together they are the full tensor.
        name = "layers.1.up.weight"
        parts = [torch.empty_like(got[name]) for _ in range(world)]
        dist.all_gather(parts, got[name].contiguous())
        assert torch.equal(torch.cat(parts, 0), full[name])
        # A dim-0 plan: this rank's share of the bytes, plus a chunk per slice boundary.
        plan0 = tensor_parallel(rank, world, column=("*",))
        with decrypted() as n:
            load_file(work / "model.seal", plan=plan0)
        share, limit = bound(full, plan0, int((work / "header").read_text()))
        assert share <= n[0] <= limit, (rank, n[0], limit)
        # The real all-MiniLM-L6-v2, from the store, with BERT's rules.
        mini = st_load_file(work / "minilm.safetensors")
        bert = tensor_parallel(rank, world, **BERT_RULES)
        got = load_file(f"sealstore+file://{work}/store#minilm:1/model.safetensors", plan=bert)
        assert same(dict(sorted(got.items())), dict(sorted(expected(mini, bert).items())))
        sizes = [None] * world
        dist.all_gather_object(sizes, n[0])
        if rank == 0:
            (work / "decrypted.json").write_text(json.dumps(sizes))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_ranks_load_their_slices(
    ring: LocalKeyring, tmp_path: Path, minilm: Path, world: int
) -> None:
    """torch.distributed (gloo), 2 and 4 processes: slices equal the full load, bytes bounded."""
    import shutil

    import torch.multiprocessing as mp

    plain, sealed = sealed_synthetic(tmp_path)
    (tmp_path / "header").write_text(str(header_cost(sealed)))
    shutil.copy(minilm / "model.safetensors", tmp_path / "minilm.safetensors")
    store = Store.init(f"file://{tmp_path}/store")
    store.push(minilm, "minilm", keys=["local:"])
    mp.spawn(_rank, args=(world, str(tmp_path)), nprocs=world, join=True)
    sizes = json.loads((tmp_path / "decrypted.json").read_text())
    data = sum(t.numel() * t.element_size() for t in st_load_file(plain).values())
    # Each rank decrypted its share plus a chunk per slice boundary (asserted in its
    # process): well under the whole file, which a load without a plan decrypts.
    assert len(sizes) == world
    assert max(sizes) < data * 3 // 4
