"""Encrypted training checkpoints: save, resume, fall back past a bad newest one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sealstore.errors import NotFound
from sealstore.loaders import load_latest_checkpoint, save_checkpoint
from sealstore.loaders.checkpoint import CheckpointWarning
from sealstore.vault.store import Store
from tests.conftest import make_keyring

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(keyring_path: Path, tmp_path: Path) -> Store:
    make_keyring(keyring_path)
    return Store.init(f"file://{tmp_path}/store")


def train_state(step: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 4)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(step):
        opt.zero_grad()
        net(torch.randn(8, 16)).pow(2).sum().backward()
        opt.step()
    return net, opt, {"model": net.state_dict(), "optim": opt.state_dict(), "step": step}


def test_resume_from_the_newest(store: Store) -> None:
    for step in (10, 20, 30):
        save_checkpoint(train_state(step)[2], store, "run", step, keys=["local:"])
    step, state = load_latest_checkpoint(store, "run")
    assert step == 30 and state["step"] == 30
    net, opt, _ = train_state(0)
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    ref, _, _ = train_state(30)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters(), strict=True))
    with pytest.raises(FileExistsError):
        save_checkpoint(state, store, "run", 30, keys=["local:"])


def test_tampered_newest_falls_back_with_a_warning(store: Store) -> None:
    for step in (1, 2):
        save_checkpoint(train_state(step)[2], store, "run", step, keys=["local:"])
    m = store.manifest("run:2")
    obj = Path(store.url[len("file://") :]) / "objects" / "default" / m.files[0].object
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 1
    obj.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match="run:2 failed verification"):
        step, state = load_latest_checkpoint(store, "run")
    assert step == 1 and state["step"] == 1


def test_no_good_checkpoint(store: Store) -> None:
    with pytest.raises(NotFound):
        load_latest_checkpoint(store, "nothing")


def test_save_killed_midway(store: Store, tmp_path: Path) -> None:
    """A save killed while it seals: no version appears, resume uses the one before."""
    save_checkpoint(train_state(5)[2], store, "run", 5, keys=["local:"])
    script = (
        "import sys, time, torch\n"
        "from sealstore.stream import SealWriter\n"
        "from sealstore.vault.store import Store\n"
        "from sealstore.loaders import save_checkpoint\n"
        "real = SealWriter.write\n"
        "def slow(self, data):\n"
        "    n = real(self, data)\n"
        "    print('sealing', flush=True); time.sleep(30)\n"
        "    return n\n"
        "SealWriter.write = slow\n"
        "state = {'w': torch.zeros(4 << 20), 'step': 6}\n"
        "save_checkpoint(state, Store.open(sys.argv[1]), 'run', 6, keys=['local:'])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, store.url],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "sealing"  # mid-way through the object
    proc.kill()
    proc.wait(timeout=30)
    assert store.versions("run") == ["5"]
    step, state = load_latest_checkpoint(store, "run")
    assert step == 5 and state["step"] == 5
    save_checkpoint({"step": 6}, store, "run", 6, keys=["local:"])  # the retry lands
    assert load_latest_checkpoint(store, "run")[0] == 6


class _NotWeights:
    pass


def test_a_refused_pickle_is_not_a_reason_to_fall_back(store: Store) -> None:
    """Every byte authenticated, but more than weights: an error, never a silent rollback."""
    import pickle

    save_checkpoint({"step": 1}, store, "run", 1, keys=["local:"])
    save_checkpoint({"step": 2, "extra": _NotWeights()}, store, "run", 2, keys=["local:"])
    with pytest.raises(pickle.UnpicklingError):
        load_latest_checkpoint(store, "run")
