"""The CUDA toolchain check: one line naming the missing piece (numba-cuda, driver, NVVM...)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from numba import cuda
from numba.cuda import cuda_paths

from sealstore.native import cuda_toolchain
from sealstore.native.cuda_toolchain import CudaToolchainError

ON_DEVICE = os.environ.get("SEALSTORE_CUDA") == "device"


def test_the_toolchain_check_outside_the_simulator_reports_one_line() -> None:
    """A fresh process, no simulator: on this machine (no GPU) one line says what is missing.

    Which line depends on the venv: without numba-cuda it names numba-cuda;
    with it, the driver. On a GPU machine (SEALSTORE_CUDA=device) it
    describes the device instead.
    """
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    run = subprocess.run(
        [sys.executable, "-m", "sealstore.native.cuda_toolchain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if ON_DEVICE:
        assert run.returncode == 0, run.stderr
        assert re.search(r"^device: .+", run.stdout, re.M)
        return
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr  # no traceback, no numba multi-line text
    assert re.fullmatch(
        r"sealstore: (numba-cuda is not installed .*sealstore\[gpu\].*|no CUDA driver: .+)",
        lines[0],
    )


def test_the_simulator_needs_nothing() -> None:
    if ON_DEVICE:
        pytest.skip("runs on a GPU, not the simulator")
    assert cuda_toolchain.problem() is None
    assert cuda_toolchain.require() is cuda
    assert cuda_toolchain.describe() == {"implementation": "simulator"}


def test_numbas_built_in_cuda_is_named_as_missing_numba_cuda() -> None:
    assert "numba-cuda is not installed" in str(
        cuda_toolchain._implementation(SimpleNamespace(implementation="Built-in"))
    )
    assert cuda_toolchain._implementation(SimpleNamespace()) is not None  # older numba
    assert cuda_toolchain._implementation(SimpleNamespace(implementation="NVIDIA")) is None


def _not_found(what: str) -> Any:
    def find() -> Any:
        # cuda.pathfinder's own text, first line of several
        raise RuntimeError(f'Failure finding "{what}": No such file: {what}\nsearched: a, b')

    return find


@pytest.mark.parametrize(
    ("getter", "what"),
    [
        ("_get_nvvm_path", "NVVM"),
        ("_get_libdevice_path", "libdevice"),
        ("_get_nvrtc_path", "NVRTC"),
    ],
)
def test_a_missing_nvvm_libdevice_or_nvrtc_is_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, getter: str, what: str
) -> None:
    """Simulated absence, each way numba-cuda reports it: an exception, no path, no getter."""
    found = SimpleNamespace(info="/opt/cuda/x", by="wheel")
    others = {g: (lambda: found) for g, _ in cuda_toolchain._LIBRARIES}
    monkeypatch.setattr(cuda_toolchain, "_simulator", lambda: False)
    monkeypatch.setattr(cuda_toolchain, "_implementation", lambda _cuda: None)
    monkeypatch.setattr(cuda_toolchain, "_driver", lambda: None)
    for g, f in others.items():
        monkeypatch.setattr(cuda_paths, g, f, raising=False)
    assert cuda_toolchain.problem() is None

    monkeypatch.setattr(cuda_paths, getter, _not_found("libnvvm.so"))
    with pytest.raises(CudaToolchainError) as err:
        cuda_toolchain.require()
    msg = str(err.value)
    assert msg.startswith(f"no {what}: Failure finding") and "\n" not in msg
    assert "sealstore[gpu]" in msg

    monkeypatch.setattr(cuda_paths, getter, lambda: SimpleNamespace(info=None, by="System"))
    assert cuda_toolchain.problem() == (
        f"no {what}: not in the CUDA wheels, CUDA_HOME or the system ({cuda_toolchain.INSTALL})"
    )
    monkeypatch.delattr(cuda_paths, getter)
    assert str(cuda_toolchain.problem()).startswith(f"no {what}: this numba.cuda cannot")


def test_the_first_missing_piece_is_named_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba-cuda, then the driver, then NVVM: what to install first is what is said."""
    monkeypatch.setattr(cuda_toolchain, "_simulator", lambda: False)
    monkeypatch.setattr(cuda_paths, "_get_nvvm_path", _not_found("libnvvm.so"), raising=False)
    monkeypatch.setattr(cuda_toolchain, "_driver", lambda: "no CUDA driver: x")
    monkeypatch.setattr(cuda_toolchain, "_implementation", lambda _cuda: None)
    assert cuda_toolchain.problem() == "no CUDA driver: x"
    monkeypatch.setattr(cuda_toolchain, "_implementation", lambda _cuda: "numba-cuda is not")
    assert cuda_toolchain.problem() == "numba-cuda is not"
