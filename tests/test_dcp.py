"""Sealed torch.distributed.checkpoint: multi-rank commit, async_save, resharding, retention."""

from __future__ import annotations

import datetime
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.api import CheckpointException

from sealstore.errors import AuthenticationError, NotFound
from sealstore.loaders.dcp import METADATA, SealedStorageReader, SealedStorageWriter
from sealstore.vault.lifecycle import gc
from sealstore.vault.store import Store
from tests.conftest import make_keyring

# DCP warns that it saves in one process when no process group is up: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture
def store(keyring_path: Path, tmp_path: Path) -> Store:
    make_keyring(keyring_path)
    return Store.init(f"file://{tmp_path}/store")


def full_state(step: int) -> dict[str, Any]:
    """The whole (unsharded) training state of *step*: the same on every rank."""
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(8, 6, generator=g),
        "b": torch.arange(10, dtype=torch.int64) * step,  # 10 rows: uneven over 4 ranks
        "step": step,
        "note": f"step {step}",
    }


def _writer(store: Store, name: str, step: int, **kwargs: Any) -> SealedStorageWriter:
    return SealedStorageWriter(store, name, step, keys=["local:"], **kwargs)


def _failures(exc: CheckpointException) -> list[BaseException]:
    return [f.exc if hasattr(f, "exc") else f[0] for f in exc.failures.values()]


class _FailingWriter(SealedStorageWriter):
    """A writer whose rank 1 fails while writing its shard."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        if self.rank == 1:
            raise OSError("disk full on rank 1")
        return super().write_data(plan, planner)


def _sharded(state: dict[str, Any], mesh: Any) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    return {
        k: distribute_tensor(v, mesh, [Shard(0)]) if isinstance(v, torch.Tensor) else v
        for k, v in state.items()
    }


def _rank_main(rank: int, world: int, rendezvous: str, store_url: str, task: str) -> None:
    """One rank of a gloo job: *task* 'save' (world 2) or 'load' (world 4)."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        store = Store.open(store_url)
        if task == "save":
            dcp.save(
                _sharded(full_state(1), mesh),
                storage_writer=SealedStorageWriter(store, "run", 1, keys=["local:"]),
            )
            pending = dcp.async_save(
                _sharded(full_state(2), mesh),
                storage_writer=SealedStorageWriter(store, "run", keys=["local:"]),
                checkpoint_id=2,
            )
            pending.result()
            try:
                dcp.save(
                    _sharded(full_state(3), mesh),
                    storage_writer=_FailingWriter(store, "run", 3, keys=["local:"]),
                )
            except CheckpointException as exc:
                assert any("disk full" in str(e) for e in _failures(exc)), exc
            else:
                raise AssertionError("a save whose rank 1 failed did not raise")
        else:
            for step in (1, 2):
                target = _sharded(_plain_target(step), mesh)
                dcp.load(target, storage_reader=SealedStorageReader(store, "run", step))
                want = full_state(step)
                for k in ("w", "b"):
                    # Each rank holds its own rows of the 4-way sharding.
                    assert target[k].to_local().shape[0] < want[k].shape[0]
                    assert torch.equal(target[k].full_tensor(), want[k]), (rank, step, k)
                assert target["step"] == step and target["note"] == f"step {step}"
        # Every rank done before any tears gloo down: a rank that destroys its
        # group while a peer still talks to it can abort in gloo's C++ teardown
        # ("terminate called without an active exception", seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp_path: Path, store: Store, task: str) -> None:
    rendezvous = tmp_path / f"rendezvous-{task}"
    mp.spawn(_rank_main, args=(world, str(rendezvous), store.url, task), nprocs=world)


def _plain_target(step: int) -> dict[str, Any]:
    """Zeros shaped like *step*'s state (and placeholders for its non-tensors)."""
    return {
        k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0
        for k, v in full_state(step).items()
    }


def test_two_ranks_save_and_async_save_then_load_on_four_and_on_one(
    store: Store, tmp_path: Path
) -> None:
    _spawn(2, tmp_path, store, "save")
    # Rank 1 failed at step 3: no version; the other rank's object waits for gc.
    assert store.versions("run") == ["1", "2"]
    m = store.manifest("run:2")
    assert sorted(f.path for f in m.files) == [METADATA, "__0.distcp", "__1.distcp"]
    assert store.tags("run")["latest"] == "2"
    orphans = gc(store, grace=0)
    assert len(orphans) == 1 and orphans[0].startswith("objects/default/")
    _spawn(4, tmp_path, store, "load")
    # World size 1, no process group: DCP reassembles the shards of both ranks.
    for step in (1, 2):
        target = _plain_target(step)
        dcp.load(target, storage_reader=SealedStorageReader(store, "run", step))
        want = full_state(step)
        assert torch.equal(target["w"], want["w"]) and torch.equal(target["b"], want["b"])
        assert target["step"] == step and target["note"] == f"step {step}"


def test_single_process_save_and_load_of_the_newest_step(store: Store) -> None:
    for step in (5, 6):
        dcp.save(full_state(step), storage_writer=_writer(store, "solo", step))
    target = _plain_target(6)
    dcp.load(target, storage_reader=SealedStorageReader(store, "solo"))  # the newest
    assert torch.equal(target["w"], full_state(6)["w"]) and target["step"] == 6
    with pytest.raises(CheckpointException) as err:
        dcp.save(full_state(6), storage_writer=_writer(store, "solo", 6))
    assert any(isinstance(e, FileExistsError) for e in _failures(err.value))


def test_a_tampered_shard_fails_authentication_and_loads_nothing(store: Store) -> None:
    dcp.save(full_state(1), storage_writer=_writer(store, "run", 1))
    m = store.manifest("run:1")
    entry = next(f for f in m.files if f.path.endswith(".distcp"))
    obj = Path(store.url[len("file://") :]) / "objects" / "default" / entry.object
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 1
    obj.write_bytes(bytes(data))
    target = _plain_target(1)
    with pytest.raises(CheckpointException) as err:
        dcp.load(target, storage_reader=SealedStorageReader(store, "run", 1))
    assert any(isinstance(e, AuthenticationError) for e in _failures(err.value))
    assert not target["w"].any()  # no plaintext of the bad shard reached the state


def test_the_reader_unpickles_metadata_weights_only(store: Store) -> None:
    dcp.save(full_state(1), storage_writer=_writer(store, "run", 1))
    metadata = SealedStorageReader(store, "run", 1).read_metadata()
    assert {"w", "b", "step", "note"} <= set(metadata.state_dict_metadata)
    assert all(isinstance(v, tuple) for v in metadata.storage_data.values())
    with pytest.raises(NotFound):
        SealedStorageReader(store, "run", 9).read_metadata()


def test_non_tensor_values_must_unpickle_weights_only(store: Store) -> None:
    state = {"w": torch.ones(3), "when": datetime.date(2026, 12, 2)}
    dcp.save(state, storage_writer=_writer(store, "run", 1))
    target = {"w": torch.zeros(3), "when": None}
    with pytest.raises(CheckpointException) as err:
        dcp.load(target, storage_reader=SealedStorageReader(store, "run", 1))
    assert any(isinstance(e, pickle.UnpicklingError) for e in _failures(err.value))
    assert target["when"] is None
    reader = SealedStorageReader(store, "run", 1, safe_globals=[datetime.date])
    dcp.load(target, storage_reader=reader)
    assert target["when"] == datetime.date(2026, 12, 2) and torch.equal(target["w"], state["w"])


def test_keep_last_shreds_older_steps_but_never_a_tagged_one(store: Store) -> None:
    for step in (1, 2, 3):
        dcp.save(full_state(step), storage_writer=_writer(store, "run", step))
    store.tag("run:1", "known-good")
    for step in (4, 5):
        writer = SealedStorageWriter(store, "run", step, keys=["local:"], keep_last=2)
        dcp.save(full_state(step), storage_writer=writer)
    shredded = {v for v in store.versions("run") if store.manifest(f"run:{v}").shredded}
    assert shredded == {"2", "3"}
    for step in (1, 4, 5):
        target = _plain_target(step)
        dcp.load(target, storage_reader=SealedStorageReader(store, "run", step))
        assert torch.equal(target["w"], full_state(step)["w"])
    # The newest step that is not shredded is what a reader without a step takes.
    assert SealedStorageReader(store, "run")._newest() == "5"
    with pytest.raises(ValueError):
        _writer(store, "run", 6, keep_last=0)


def test_only_wrapped_slots_travel_to_the_other_ranks(store: Store) -> None:
    from torch.distributed.checkpoint.planner import SavePlan

    writer = _writer(store, "run", 1)
    writer.set_up_storage_writer(True, rank=0, use_collectives=True)
    plans = writer.prepare_global_plan([SavePlan([]), SavePlan([])])
    key = bytes(writer._dek._buf)
    assert key not in pickle.dumps(plans)  # what DCP scatters over gloo
    assert {p.storage_data.path for p in plans} == {"__0.distcp", "__1.distcp"}
    with pytest.raises(TypeError):
        pickle.dumps(writer._dek)
    writer.reset()
    assert writer._dek is None


def test_save_and_load_on_a_seaweedfs_s3_store(
    services: dict[str, str], keyring_path: Path
) -> None:
    from tests.s3util import new_bucket, s3_options

    make_keyring(keyring_path)
    options = s3_options(services["s3_url"], services["s3_key"], services["s3_secret"])
    s3 = Store.init(f"s3://{new_bucket(options)}/checkpoints", **options)
    dcp.save(full_state(1), storage_writer=_writer(s3, "run", 1))
    target = _plain_target(1)
    dcp.load(target, storage_reader=SealedStorageReader(s3, "run", 1))
    assert torch.equal(target["w"], full_state(1)["w"]) and target["note"] == "step 1"
    assert sorted(f.path for f in s3.manifest("run:1").files) == [METADATA, "__0.distcp"]


def test_a_failure_after_the_commit_keeps_every_file_of_the_version(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealstore.errors import BackendError
    from sealstore.vault import auditing

    def audit_down(*args: Any, **kwargs: Any) -> None:
        raise BackendError("audit log unreachable")

    monkeypatch.setattr(auditing, "record", audit_down)
    with pytest.raises(CheckpointException):
        dcp.save(full_state(1), storage_writer=_writer(store, "run", 1))
    monkeypatch.undo()
    # The manifest was written before the audit record failed: the version is
    # committed, and its metadata object was not discarded under it.
    assert store.versions("run") == ["1"]
    target = _plain_target(1)
    dcp.load(target, storage_reader=SealedStorageReader(store, "run", 1))
    assert torch.equal(target["w"], full_state(1)["w"])


def test_keep_last_shreds_nothing_when_a_tag_cannot_be_read(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sealstore.errors import BackendError

    for step in (1, 2):
        dcp.save(full_state(step), storage_writer=_writer(store, "run", step))
    store.tag("run:1", "known-good")
    tags = Store.tags

    def blip(self: Store, name: str, **kwargs: Any) -> dict[str, str]:
        # The read of known-good fails (an S3 blip): a listing may skip it,
        # a destructive caller must not.
        if kwargs.get("skip_damaged"):
            return {t: v for t, v in tags(self, name, **kwargs).items() if t != "known-good"}
        raise BackendError("cannot read refs/run/known-good: connection reset")

    monkeypatch.setattr(Store, "tags", blip)
    writer = SealedStorageWriter(store, "run", 3, keys=["local:"], keep_last=1)
    dcp.save(full_state(3), storage_writer=writer)  # committed; retention only warns
    monkeypatch.undo()
    assert not any(store.manifest(f"run:{v}").shredded for v in store.versions("run"))
    assert "older steps not removed" in caplog.text
    with pytest.raises(ValueError, match="whole number"):
        _writer(store, "run", 4, keep_last=True)


def test_a_load_that_fails_midway_leaves_no_tensor_half_loaded(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {"a": torch.randn(64, 64), "b": torch.randn(64, 64), "c": torch.randn(64, 64)}
    dcp.save(state, storage_writer=_writer(store, "run", 1))
    calls = [0]
    read = SealedStorageReader._read_tensor

    def fails_third(self: Any, *args: Any) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise AuthenticationError("chunk 7 failed authentication")
        read(self, *args)

    monkeypatch.setattr(SealedStorageReader, "_read_tensor", fails_third)
    target = {k: torch.full_like(v, 5.0) for k, v in state.items()}
    with pytest.raises(CheckpointException):
        dcp.load(target, storage_reader=SealedStorageReader(store, "run", 1))
    assert calls[0] == 3  # two tensors were loaded before the failure
    # The two tensors loaded before the failure are zeroed, and so is the one it
    # failed in (which a failing read may have half written).
    assert not [k for k in target if torch.any(target[k])]
