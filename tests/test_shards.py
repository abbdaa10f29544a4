"""The torch dataset over sealed shards: sharding over ranks and DataLoader workers,
the seeded per-epoch shuffle, mid-epoch resume, and failures inside a worker."""

from __future__ import annotations

import io
import json
import types
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torch.utils.data import DataLoader, DistributedSampler

from sealstore.errors import AuthenticationError
from sealstore.loaders import SealedShards, ShardSamples
from sealstore.loaders import shards as shards_module
from sealstore.vault.store import Store
from tests import test_datasets_io as dio
from tests.test_datasets_io import ROWS, seal, store_url

# The sealed Parquet/tar store of the dataset I/O tests.
plain, data_store = dio.plain, dio.data_store

SHARDS = 7
BATCH = 4


def _count(s: int) -> int:
    return 5 + 3 * s  # shards of different sizes: 98 samples in all


ALL = sorted(s * 1000 + i for s in range(SHARDS) for i in range(_count(s)))


@pytest.fixture
def jsonl_shards(tmp_path: Path, keyring: Any) -> list[str]:
    """Seven sealed JSON-lines shards; record ``id`` is ``shard * 1000 + row``."""
    d = tmp_path / "jsonl"
    d.mkdir()
    out = []
    for s in range(SHARDS):
        p = d / f"shard-{s}.jsonl"
        p.write_text("".join(json.dumps({"id": s * 1000 + i}) + "\n" for i in range(_count(s))))
        out.append(str(seal(p)))
        p.unlink()  # only the sealed shards remain
    return out


def ids(loader: Any) -> list[int]:
    return [int(i) for batch in loader for i in batch["id"]]


def make(shards: list[str], **kw: Any) -> SealedShards:
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("shuffle_window", 3)
    return SealedShards(shards, decode="jsonl", seed=7, **kw)


# -- order ---------------------------------------------------------------------------


def test_each_epoch_is_every_sample_once_in_a_seeded_order_that_changes_per_epoch(
    jsonl_shards: list[str],
) -> None:
    ds = make(jsonl_shards)
    assert len(ds) == len(ALL) and ds.counts == [_count(s) for s in range(SHARDS)]
    first = [r["id"] for r in ds]
    assert sorted(first) == ALL and first != ALL
    assert [r["id"] for r in make(jsonl_shards)] == first  # same seed, same order
    ds.set_epoch(1)
    second = [r["id"] for r in ds]
    assert sorted(second) == ALL and second != first
    ds.set_epoch(0)
    assert [r["id"] for r in ds] == first
    other_seed = SealedShards(jsonl_shards, decode="jsonl", seed=8, batch_size=BATCH)
    assert [r["id"] for r in other_seed] != first
    assert [r["id"] for r in make(jsonl_shards, shuffle=False)] == ALL


def test_samples_are_shuffled_across_a_window_of_shards(jsonl_shards: list[str]) -> None:
    one = [r["id"] // 1000 for r in make(jsonl_shards, shuffle_window=1)]
    assert set(one[: _count(one[0])]) == {one[0]}  # a window of one shard: shard by shard
    three = [r["id"] // 1000 for r in make(jsonl_shards, shuffle_window=3)]
    assert len(set(three[:10])) > 1  # a window of three: the first samples mix shards


def worker_runs(ds: SealedShards, workers: int, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Each worker's samples, computed in this process (as the worker would)."""
    runs = []
    for worker in range(workers):
        info = types.SimpleNamespace(id=worker, num_workers=workers)
        monkeypatch.setattr(shards_module, "get_worker_info", lambda info=info: info)
        runs.append([r["id"] for r in ds])
    monkeypatch.undo()
    return runs


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_two_dataloader_workers_hand_over_their_runs_batch_by_batch(
    jsonl_shards: list[str], context: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make(jsonl_shards)
    loader = DataLoader(ds, batch_size=BATCH, num_workers=2, multiprocessing_context=context)
    got = ids(loader)
    assert sorted(got) == ALL
    # What the consumer sees is fixed: batch i is worker i % 2's next batch
    # (the order resuming relies on).
    runs = worker_runs(ds, 2, monkeypatch)
    batches = [[r[i : i + BATCH] for i in range(0, len(r), BATCH)] for r in runs]
    want: list[int] = []
    for k in range(max(len(b) for b in batches)):
        for b in batches:
            want += b[k] if k < len(b) else []
    assert got == want
    assert len(DataLoader(ds, batch_size=BATCH)) == -(-len(ALL) // BATCH)


def test_a_worker_opens_only_the_shards_of_its_run(
    jsonl_shards: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[int] = []
    real = SealedShards.read_shard

    def spy(self: SealedShards, i: int) -> Any:
        opened.append(i)
        return real(self, i)

    monkeypatch.setattr(SealedShards, "read_shard", spy)
    seen: dict[tuple[int, int], list[int]] = {}
    for rank in (0, 1):
        for worker in (0, 1):
            info = types.SimpleNamespace(id=worker, num_workers=2)
            monkeypatch.setattr(shards_module, "get_worker_info", lambda info=info: info)
            opened.clear()
            ds = make(jsonl_shards, shuffle=False, rank=rank, world_size=2)
            seen[rank, worker] = [r["id"] for r in ds]
            # Its run's shards, each once: never every shard.
            assert sorted(opened) == sorted({i // 1000 for i in seen[rank, worker]})
            assert len(opened) < SHARDS
    everything = sorted(i for run in seen.values() for i in run)
    # 98 samples over 2 ranks: 49 each, none twice.
    assert everything == ALL


# -- resume --------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2])
def test_resume_at_step_k_sees_exactly_what_an_uninterrupted_run_sees(
    jsonl_shards: list[str], tmp_path: Path, world: int
) -> None:
    def loader(ds: SealedShards) -> DataLoader[Any]:
        return DataLoader(ds, batch_size=BATCH, num_workers=2, multiprocessing_context="fork")

    for rank in range(world):
        full = make(jsonl_shards, rank=rank, world_size=world)
        full.set_epoch(2)
        want = [[int(i) for i in b["id"]] for b in loader(full)]
        for k in (1, 3, len(want) - 1):
            stopped = make(jsonl_shards, rank=rank, world_size=world)
            stopped.set_epoch(2)
            taken = []
            for step, batch in enumerate(loader(stopped)):
                if step == k:
                    break
                taken.append([int(i) for i in batch["id"]])
            torch.save(stopped.state_dict(consumed=k * BATCH), tmp_path / "state.pt")
            assert taken == want[:k]
            resumed = make(jsonl_shards, rank=rank, world_size=world)
            resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
            rest = [[int(i) for i in b["id"]] for b in loader(resumed)]
            assert rest == want[k:], (rank, k)
            # A second save in the resumed epoch counts from the epoch's start.
            more = len(rest[0])
            assert resumed.state_dict(consumed=more)["samples"] == (k * BATCH + more) * world
            resumed.set_epoch(3)  # the next epoch starts from its beginning
            assert len(ids(loader(resumed))) == len(full)


def test_a_state_of_another_world_or_batch_size_is_refused(jsonl_shards: list[str]) -> None:
    state = make(jsonl_shards).state_dict(consumed=2 * BATCH)
    with pytest.raises(ValueError, match="world_size"):
        make(jsonl_shards, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        make(jsonl_shards, batch_size=8).load_state_dict(state)
    with pytest.raises(ValueError, match="whole batches"):
        make(jsonl_shards).state_dict(consumed=3)


# -- torch.distributed ---------------------------------------------------------------


def _ddp_rank(rank: int, shards: list[str], init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ds = make(shards)  # rank and world size from torch.distributed
        assert (ds.rank, ds.world_size) == (rank, 2)
        loader = DataLoader(ds, batch_size=BATCH, num_workers=2, multiprocessing_context="fork")
        mine = ids(loader)
        gathered: list[Any] = [None, None]
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_split_the_epoch_between_them(
    jsonl_shards: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "ranks.json"
    init = f"file://{tmp_path / 'rendezvous'}"
    tmp.spawn(_ddp_rank, args=(jsonl_shards, init, str(out)), nprocs=2, join=True)
    first, second = json.loads(out.read_text())
    assert len(first) == len(second) == len(ALL) // 2
    assert not set(first) & set(second) and sorted(first + second) == ALL


# -- store shards, other formats, map-style ------------------------------------------


def test_store_shards_share_one_key_unwrap_and_decode_parquet_and_tar(
    data_store: Store, plain: Path
) -> None:
    urls = [store_url(data_store, f"data:1/train/part-{i}.parquet") for i in (0, 1)]
    fs, _ = fsspec.url_to_fs(urls[0])
    before = fs.keys.misses
    ds = SealedShards(urls, decode="parquet", batch_size=1000, shuffle_window=2)
    assert ds.counts == [ROWS, ROWS]  # from the footers
    texts = [r["text"] for r in ds]
    assert sorted(texts) == sorted(f"row {i} of shard {s}" for s in (0, 1) for i in range(ROWS))
    assert fs.keys.misses - before == 1  # both shards: one unwrap of the version's key
    tar = SealedShards([store_url(data_store, "data:1/train/shard-0.tar")], decode="tar")
    samples = {s["__key__"]: s for s in tar}
    assert len(samples) == 50 and samples["000042"]["bin"] == bytes([42]) * 3000
    assert samples["000007"]["txt"] == b"sample 7"


def test_map_style_view_indexes_samples_across_shards(jsonl_shards: list[str]) -> None:
    ds = make(jsonl_shards).map_style()
    assert isinstance(ds, ShardSamples) and len(ds) == len(ALL)
    assert [ds[i]["id"] for i in (0, 4, 5, 97, -1)] == [0, 4, 1000, 6000 + 22, 6022]
    with pytest.raises(IndexError):
        ds[len(ALL)]
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3)
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=2)
    got = ids(loader)
    assert len(got) == len(ALL) // 2 and set(got) <= set(ALL)


def test_a_decoder_that_miscounts_is_an_error(jsonl_shards: list[str]) -> None:
    ds = SealedShards(jsonl_shards[:1], decode="jsonl", counts=[3])
    with pytest.raises(ValueError, match=r"shard-0\.jsonl\.seal: decoded 5 samples, counted 3"):
        list(ds)


# -- failures ------------------------------------------------------------------------


def test_a_tampered_shard_fails_inside_a_worker_naming_the_file(
    jsonl_shards: list[str],
) -> None:
    ds = make(jsonl_shards, shuffle=False)  # counted while intact
    bad = Path(jsonl_shards[5])
    data = bytearray(bad.read_bytes())
    data[-20] ^= 1
    bad.write_bytes(bytes(data))
    loader = DataLoader(ds, batch_size=BATCH, num_workers=2, multiprocessing_context="fork")
    with pytest.raises(AuthenticationError, match=r"shard-5\.jsonl\.seal"):
        ids(loader)
    with pytest.raises(AuthenticationError, match=r"shard-5\.jsonl\.seal"):
        make(jsonl_shards)  # counting reads it too


def test_a_custom_decoder_reads_a_path_and_a_chained_url(jsonl_shards: list[str]) -> None:
    shards = [jsonl_shards[0], f"sealstore::file://{jsonl_shards[1]}"]
    ds = SealedShards(shards, decode=_lines, shuffle=False)
    assert ds.counts == [5, 8] and next(iter(ds)) == b'{"id": 0}'
    assert list(ds)[-1] == b'{"id": 1007}'


def _lines(f: io.BufferedIOBase) -> list[bytes]:
    return f.read().splitlines()
