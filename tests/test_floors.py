"""The floors of the house (DESIGN, docs/index.md): each folder imports
only from the floors below it, read from the source (every ``import``, lazy ones
inside functions included), so an upward import fails here and not in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# folder -> (package, floor). sealstore/ is the ground; native/ stands beside it (the
# stream dispatches to the kernels, the kernels raise the ground's errors). enclave/
# and loaders/ share a floor and import neither each other.
FLOORS = {
    "sealstore": ("sealstore", 0),
    "native": ("sealstore.native", 0),
    "kms": ("sealstore.kms", 1),
    "vault": ("sealstore.vault", 2),
    "enclave": ("sealstore.enclave", 3),
    "loaders": ("sealstore.loaders", 3),
    "bench": ("sealstore.bench", 4),
    "cli": ("sealstore.cli", 5),
}
UPPER = {
    package: (folder, floor) for folder, (package, floor) in FLOORS.items() if folder != "sealstore"
}


def _target_floor(module: str) -> tuple[str, int] | None:
    """The folder and floor a ``sealstore.…`` module lives on (None: not sealstore's)."""
    if module != "sealstore" and not module.startswith("sealstore."):
        return None
    for package, (folder, floor) in UPPER.items():
        if module == package or module.startswith(package + "."):
            return folder, floor
    return "sealstore", 0


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module *path* imports, absolute (relative imports resolved against *package*)."""
    tree = ast.parse(path.read_text(), str(path))
    here = package.split(".")
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here[: len(here) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from sealstore import vault` names a module: count the module itself.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            found.append((node.lineno, base))
    return found


def _package_of(path: Path, folder: str) -> str:
    package = FLOORS[folder][0]
    rel = path.relative_to(ROOT / folder).with_suffix("")
    # a module's package is its folder's, an __init__'s is its own: both the parent folder
    return ".".join([package, *rel.parts[:-1]])


GROUND = {"sealstore", "native"}
# The public facade re-exports the floors above lazily (PEP 562 ``__getattr__``, and
# ``if TYPE_CHECKING`` imports for the type checker): importing it imports none of
# them (tests/test_public_api.py checks that at run time).
FACADE = ROOT / "sealstore" / "__init__.py"


def _violations(folder: str) -> list[str]:
    floor = FLOORS[folder][1]
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path == FACADE:
            continue
        for line, module in _imports(path, _package_of(path, folder)):
            target = _target_floor(module)
            if target is None or target[0] == folder:
                continue
            if target[1] > floor or (target[1] == floor and {folder, target[0]} != GROUND):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({target[0]}/)")
    return bad


@pytest.mark.parametrize("folder", sorted(FLOORS))
def test_each_floor_imports_only_from_the_floors_below(folder: str) -> None:
    assert _violations(folder) == []


def test_attestation_never_imports_the_broker() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "enclave" / "attestation").rglob("*.py"))
        for line, module in _imports(path, "sealstore.enclave.attestation")
        if module.startswith("sealstore.enclave.broker")
    ]
    assert bad == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The reader itself: lazy, relative and ``from sealstore import`` forms are all seen."""
    src = tmp_path / "m.py"
    src.write_text(
        "def f():\n    from sealstore.loaders import load_file\n"
        "from ..vault import store\nfrom sealstore import cli\n"
    )
    modules = {m for _, m in _imports(src, "sealstore.kms")}
    assert "sealstore.loaders" in modules
    assert "sealstore.vault.store" in modules
    assert "sealstore.cli" in modules
    assert _target_floor("sealstore.vault.store") == ("vault", 2)
    assert _target_floor("sealstore.errors") == ("sealstore", 0)
    assert _target_floor("numpy") is None
