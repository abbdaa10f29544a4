"""Checkpoints and ``.pt`` payloads streamed through the sealing writer; RNG state on resume."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sealstore.errors import AuthenticationError, NotFound
from sealstore.loaders import load_latest_checkpoint, save_checkpoint, torch_load, torch_save
from sealstore.loaders.checkpoint import RNG_STATE_GLOBALS, CheckpointWarning, _rng_state_globals
from sealstore.vault.store import Store

ROOT = Path(__file__).resolve().parent.parent

# Peak RSS of one save, in a fresh process: the high-water mark after a
# small warm-up save (imports, keyring, thread pools) against the one after
# the big save. The payload tensor exists before either is read.
_PEAK_SCRIPT = """
import resource, sys, torch
from sealstore.loaders import save_checkpoint, torch_save
from sealstore.vault.store import Store

how, where, size = sys.argv[1], sys.argv[2], int(sys.argv[3])

def save(obj, step):
    if how == "store":
        save_checkpoint(obj, Store.open(where), "run", step, keys=["local:"])
    else:
        torch_save(obj, f"{where}/{step}.pt.seal", keys=["local:"])

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

state = {"w": torch.ones(size // 4), "step": 1}
save({"w": torch.ones(1 << 18), "step": 0}, 0)
before = peak()
save(state, 1)
print(peak() - before)
"""


def _objects(store: Store) -> Path:
    return Path(store.url[len("file://") :]) / "objects" / "default"


@pytest.mark.parametrize("how", ["store", "file"])
def test_a_save_peaks_near_the_tensor_size_not_twice_it(
    store: Store, tmp_path: Path, how: str
) -> None:
    """A 256 MiB state saved in a fresh process adds well under half its size to peak RSS."""
    size = 256 << 20
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _PEAK_SCRIPT,
            how,
            store.url if how == "store" else str(tmp_path),
            str(size),
        ],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    extra = int(out.stdout.split()[-1])
    assert extra < size // 2, f"the save added {extra >> 20} MiB to peak RSS for {size >> 20} MiB"


def _rng_state(gens: dict[str, np.random.Generator]) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generators": {k: g.bit_generator.state for k, g in gens.items()},
    }


def _draws(gens: dict[str, np.random.Generator]) -> list[Any]:
    return [
        torch.rand(4).tolist(),
        [random.random() for _ in range(4)],
        np.random.rand(4).tolist(),
        np.random.randn(3).tolist(),  # the legacy generator's cached gaussian too
        {k: g.random(4).tolist() for k, g in gens.items()},
    ]


def test_resume_restores_torch_python_and_numpy_rng_states(store: Store) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.randn()  # leaves a cached gaussian in the legacy state
    gens = {
        "pcg64": np.random.default_rng(4),
        "mt19937": np.random.Generator(np.random.MT19937(5)),
        "philox": np.random.Generator(np.random.Philox(6)),
        "sfc64": np.random.Generator(np.random.SFC64(7)),
    }
    weights = torch.randn(64, 64)
    save_checkpoint(
        {"model": {"w": weights}, "rng": _rng_state(gens), "step": 7},
        store,
        "run",
        7,
        keys=["local:"],
    )
    expected = _draws(gens)

    step, state = load_latest_checkpoint(store, "run")
    assert step == 7 and torch.equal(state["model"]["w"], weights)
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    for k, g in gens.items():
        g.bit_generator.state = rng["generators"][k]
    assert _draws(gens) == expected


def test_a_streamed_checkpoint_records_its_true_size_and_digest(
    store: Store, tmp_path: Path
) -> None:
    """No size is known before torch.save ends: the manifest still has the exact size and hash."""
    m = save_checkpoint(
        {"w": torch.arange(300_000, dtype=torch.float32), "step": 1},
        store,
        "run",
        1,
        keys=["local:"],
    )
    store.pull("run:1", tmp_path / "out")
    data = (tmp_path / "out" / "checkpoint.pt").read_bytes()
    (entry,) = m.files
    assert entry.size == len(data) > 1_200_000
    assert entry.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (np.float64(0.5), "numpy._core.multiarray.scalar"),
        (np.zeros(3, dtype=np.float32), "numpy.dtypes.Float32DType"),
        (os.getcwd, "posix.getcwd"),
    ],
    ids=["numpy-scalar", "float-array", "function"],
)
def test_a_type_outside_the_allowlist_is_refused_by_name(
    store: Store, payload: Any, named: str
) -> None:
    before = set(torch.serialization.get_safe_globals())
    save_checkpoint({"step": 1, "extra": payload}, store, "run", 1, keys=["local:"])
    with pytest.raises(pickle.UnpicklingError) as info:
        load_latest_checkpoint(store, "run")
    message = str(info.value)
    assert named in message and "\n" not in message
    # The allowlist was lent for the load only: torch's own set is as before.
    assert set(torch.serialization.get_safe_globals()) == before


def test_a_plain_torch_load_allows_no_numpy(ring: Any, tmp_path: Path) -> None:
    """Only checkpoints widen the allowlist; torch_load stays weights-only."""
    torch_save({"numpy": np.random.get_state()}, tmp_path / "rng.pt.seal", keys=["local:"])
    with pytest.raises(pickle.UnpicklingError, match=r"numpy\._core\.multiarray\._reconstruct"):
        torch_load(tmp_path / "rng.pt.seal")
    got = torch_load(tmp_path / "rng.pt.seal", safe_globals=_rng_state_globals())
    assert np.array_equal(got["numpy"][1], np.random.get_state()[1])


def test_the_documented_allowlist_is_the_one_in_force() -> None:
    names = {
        g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
        for g in _rng_state_globals()
    }
    assert names == set(RNG_STATE_GLOBALS)


def test_a_tampered_pt_raises_authentication_error_not_a_torch_error(
    ring: Any, tmp_path: Path
) -> None:
    """A chunk in the middle of the tensor data fails while torch reads it: nothing is returned."""
    path = tmp_path / "w.pt.seal"
    torch_save({"w": torch.randn(1 << 20), "step": 3}, path, keys=["local:"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(AuthenticationError, match="failed authentication"):
        torch_load(path)


def test_a_tampered_only_checkpoint_gives_no_state(store: Store) -> None:
    save_checkpoint({"w": torch.randn(1 << 18), "step": 1}, store, "run", 1, keys=["local:"])
    obj = _objects(store) / store.manifest("run:1").files[0].object
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 1
    obj.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning), pytest.raises(NotFound, match="no checkpoint of run"):
        load_latest_checkpoint(store, "run")


def test_small_and_large_reads_across_chunk_boundaries(ring: Any, tmp_path: Path) -> None:
    """Many small tensors and one spanning chunks: every record read back exact."""
    state = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(200)}
    state["big"] = torch.randn(3 * (1 << 18) + 17)  # ~3 MiB: spans several 1 MiB chunks
    torch_save(state, tmp_path / "many.pt.seal", keys=["local:"])
    got = torch_load(tmp_path / "many.pt.seal", threads=3)
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_the_plaintext_buffers_left_are_wiped(ring: Any, tmp_path: Path) -> None:
    """The reader's cached chunk and the sealing writer's partial batch are zeroed on close."""
    from sealstore.keys import DataKey
    from sealstore.kms.envelope import open_sealed
    from sealstore.loaders.torch_io import _PlainReader
    from sealstore.stream import SealWriter

    torch_save({"w": torch.full((1000,), 7.0)}, tmp_path / "w.pt.seal", keys=["local:"])
    with open_sealed(tmp_path / "w.pt.seal", ()) as sf:
        reader = _PlainReader(sf)
        assert reader.read(4) == b"PK\x03\x04"
        cache = reader._cache
        assert any(cache)
        reader.close()
        assert not any(cache)

    writer = SealWriter(io.BytesIO(), DataKey(bytes(32)))
    writer.write(b"secret" * 100)
    batch = writer._inbuf
    assert any(batch)
    writer.close()
    assert not any(batch)
