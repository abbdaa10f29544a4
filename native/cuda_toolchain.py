"""Whether this process can compile and run the CUDA kernels, and if not, what is missing.

The CUDA kernels need, beyond a GPU: the NVIDIA-maintained ``numba-cuda``
(numba's own built-in ``numba.cuda`` is deprecated, and installing
``numba-cuda`` makes ``import numba.cuda`` resolve to it), a CUDA driver
that answers with at least one device, NVVM (``libnvvm.so``, which turns
numba's IR into PTX), libdevice (``libdevice.10.bc``, the math library
NVVM links) and NVRTC (``libnvrtc.so``, which numba-cuda asks for the
architectures it may compile for on every compile). A pip-only image gets
the last three only from the ``gpu`` extra
(``numba-cuda[cu13]`` and its CUDA wheels; ``gpu-cu12`` for drivers older
than CUDA 13). Without this check the first kernel launch fails deep inside
numba with a multi-line trace; :func:`require` says in one line which piece
is missing and how to install it.

``python -m sealstore.native.cuda_toolchain`` prints the toolchain it found
(exit 0) or the one line (exit 1).
"""

from __future__ import annotations

import sys
from typing import Any

from sealstore.errors import DeviceUnavailable

__all__ = ["CudaToolchainError", "describe", "problem", "require"]

# numba-cuda's getter and the name said when it is missing, in the order checked.
_LIBRARIES = (
    ("_get_nvvm_path", "NVVM"),
    ("_get_libdevice_path", "libdevice"),
    ("_get_nvrtc_path", "NVRTC"),
)

INSTALL = "pip install 'sealstore[gpu]' (CUDA 13 drivers, >= 580) or 'sealstore[gpu-cu12]'"


class CudaToolchainError(DeviceUnavailable):
    """The CUDA kernels cannot run here: a driver, device, NVVM, libdevice or NVRTC is missing."""


def _simulator() -> bool:
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)


def _implementation(cuda: Any) -> str | None:
    """None when *cuda* (the imported ``numba.cuda``) is numba-cuda's, else what is wrong."""
    if getattr(cuda, "implementation", "Built-in") != "NVIDIA":
        return f"numba-cuda is not installed (numba's built-in numba.cuda is deprecated): {INSTALL}"
    return None


def _driver() -> str | None:
    """None when the CUDA driver loads and sees a device, else what is wrong."""
    from numba.cuda.cudadrv.driver import driver
    from numba.cuda.cudadrv.error import CudaSupportError

    try:
        available = driver.is_available
        detail = driver.initialization_error
    except CudaSupportError as exc:  # raised where libcuda loads but cuInit fails
        available, detail = False, str(exc)
    if not available:
        # numba's text spans lines ("CUDA driver library cannot be found.\nEnsure..."):
        # its first line names the cause, and the error must stay one line.
        first = next((s.strip() for s in str(detail or "").splitlines() if s.strip()), "")
        return f"no CUDA driver: {first or 'cuInit failed'} (install the NVIDIA driver)"
    if driver.get_device_count() < 1:
        return "no CUDA device: the driver loads but sees no GPU (check CUDA_VISIBLE_DEVICES)"
    return None


def _located(paths: Any, getter: str, what: str) -> tuple[str | None, str | None]:
    """(path, None) where numba-cuda finds *what*, else (None, the one-line problem).

    *paths* is ``numba.cuda.cuda_paths``; its per-component getters are
    private but the only way to ask for one piece and name it when it is
    missing (``get_cuda_paths()`` raises on the first one, with a
    multi-line text). numba-cuda is pinned in the ``gpu`` extra.
    """
    find = getattr(paths, getter, None)
    if find is None:
        return None, f"no {what}: this numba.cuda cannot locate it ({INSTALL})"
    try:
        info = find().info
    except Exception as exc:  # cuda.pathfinder's not-found errors have no common base
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"no {what}: {reason} ({INSTALL})"
    if not info:
        return None, f"no {what}: not in the CUDA wheels, CUDA_HOME or the system ({INSTALL})"
    return str(info), None


def problem() -> str | None:
    """What keeps the CUDA kernels from running on a device here, in one line; None if nothing.

    Checked in order, stopping at the first missing piece: numba-cuda, the
    driver and a device, NVVM, libdevice, NVRTC. Under numba's CUDA simulator
    (``NUMBA_ENABLE_CUDASIM=1``) nothing is needed and this is None.

    Returns:
        The problem as one line naming the missing piece and the install
        that brings it, or None.
    """
    if _simulator():
        return None
    from numba import cuda
    from numba.cuda import cuda_paths

    for check in (lambda: _implementation(cuda), _driver):
        found = check()
        if found:
            return found
    for getter, what in _LIBRARIES:
        found = _located(cuda_paths, getter, what)[1]
        if found:
            return found
    return None


def require() -> Any:
    """``numba.cuda``, once :func:`problem` finds nothing missing.

    Returns:
        The ``numba.cuda`` module (the simulator's under ``NUMBA_ENABLE_CUDASIM=1``).

    Raises:
        CudaToolchainError: one line naming what is missing (numba-cuda, the
            driver, a device, NVVM, libdevice or NVRTC).
    """
    found = problem()
    if found:
        raise CudaToolchainError(found)
    from numba import cuda

    return cuda


def describe() -> dict[str, str]:
    """The toolchain :func:`require` found: device, driver version, NVVM, libdevice and NVRTC paths.

    Returns:
        A dict of strings, for logs and benchmark reports (no key material here).

    Raises:
        CudaToolchainError: as :func:`require`.
    """
    cuda = require()
    if _simulator():
        return {"implementation": "simulator"}
    from numba.cuda import cuda_paths
    from numba.cuda.cudadrv.driver import driver

    major, minor = driver.get_version()
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    return {
        "implementation": f"numba-cuda {_version('numba-cuda')}",
        "device": name,
        "compute_capability": ".".join(str(v) for v in dev.compute_capability),
        "driver_cuda": f"{major}.{minor}",
        **{
            what.lower(): _located(cuda_paths, getter, what)[0] or "" for getter, what in _LIBRARIES
        },
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def main() -> int:
    """Print the toolchain (exit 0) or the one-line problem (exit 1)."""
    try:
        found = describe()
    except CudaToolchainError as exc:
        print(f"sealstore: {exc}", file=sys.stderr)
        return 1
    for k, v in found.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
