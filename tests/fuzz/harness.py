"""What a fuzz target is, and how one input is judged.

A target is a module in ``tests/fuzz/targets/`` with:

- ``NAME``: its name (the module's, by convention);
- ``EXPECTED``: the exception classes its parser documents (sealstore's own
  errors); any other exception is a bug in the parser;
- ``seeds()``: real inputs to start from (public samples, the test vectors);
- ``one_input(data)``: hand *data* to the parser.

Nothing here imports atheris: the pytest replay and the seed checks run
without it, and ``run.py`` imports the targets under atheris' instrumentation.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Protocol

ROOT = Path(__file__).resolve().parent
CRASHES = ROOT / "crashes"


class Target(Protocol):
    NAME: str
    EXPECTED: tuple[type[BaseException], ...]

    def seeds(self) -> Iterator[bytes]: ...

    def one_input(self, data: bytes) -> None: ...


def target_names() -> list[str]:
    """Every target module in ``targets/``, sorted (a new file is a new target)."""
    from tests.fuzz import targets

    return sorted(m.name for m in pkgutil.iter_modules(targets.__path__) if not m.ispkg)


def load(name: str) -> ModuleType:
    """The target module *name* (ValueError if there is none)."""
    if name not in target_names():
        raise ValueError(f"no fuzz target {name!r}; there are: {', '.join(target_names())}")
    return importlib.import_module(f"tests.fuzz.targets.{name}")


def judge(target: ModuleType, data: bytes) -> None:
    """Run one input: a documented error is a pass; anything else propagates (a bug)."""
    with contextlib.suppress(target.EXPECTED):
        target.one_input(data)


def shared_data() -> Path:
    """The public samples beside the checkout (../shared/data), or $SEALSTORE_SHARED_DATA.

    The same place ``tests/conftest.py`` reads them from; duplicated here so
    the fuzz runner does not import pytest's conftest.

    Raises:
        FileNotFoundError: they are missing (a fuzz run without seeds is refused, not weakened).
    """
    default = ROOT.parents[2] / "shared" / "data"
    path = Path(os.environ.get("SEALSTORE_SHARED_DATA", default))
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing (set SEALSTORE_SHARED_DATA)")
    return path


def vectors() -> Path:
    """docs/vectors: the sealed-file known-answer files."""
    return ROOT.parents[1] / "docs" / "vectors"


def crash_inputs(name: str) -> list[Path]:
    """The kept inputs that once crashed target *name* (replayed as regression tests)."""
    folder = CRASHES / name
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
