"""mkdocs hook: lay out the import package ``sealstore`` where griffe can read it.

pyproject's package-dir maps each subpackage to a top-level folder
(``sealstore.loaders`` is ``loaders/``). An installed wheel has the usual
layout, but the editable install resolves the mapping with an import hook that
griffe, which reads source files without importing them, does not follow. So
before the build this writes ``build/api-src/sealstore/``: links to the files of
``sealstore/`` and, per package-dir entry, one to the subpackage's folder. The
mkdocstrings handler reads from there (``paths`` in mkdocs.yml); nothing is
imported, so the reference builds without torch, boto3 or the services.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "api-src"


def package_tree(root: Path = ROOT, tree: Path = TREE) -> Path:
    """Write the ``sealstore`` package as Python sees it under ``tree`` (links only).

    Links already right are kept and stale ones removed, so two builds at once
    (``make docs`` and tests/test_docs.py) do not pull the tree from under each other.

    Args:
        root: The repository root (its pyproject.toml names the package-dir).
        tree: The folder to write ``sealstore/`` into.

    Returns:
        ``tree``, for the handler's ``paths``.
    """
    with (root / "pyproject.toml").open("rb") as f:
        package_dir: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    links = {
        entry.name: entry
        for entry in (root / package_dir["sealstore"]).iterdir()
        if entry.name != "__pycache__"
    }
    for name, folder in package_dir.items():
        parent, _, child = name.rpartition(".")
        if parent == "sealstore":
            links[child] = root / folder
    package = tree / "sealstore"
    package.mkdir(parents=True, exist_ok=True)
    for link in package.iterdir():
        if link.name not in links or not link.is_symlink() or link.readlink() != links[link.name]:
            link.unlink()
    for name, target in links.items():
        if not (package / name).is_symlink():
            os.symlink(target, package / name)
    return tree


def on_startup(command: str, dirty: bool, **kwargs: Any) -> None:
    package_tree()


if __name__ == "__main__":
    # scripts/typecheck.sh: mypy reads the package from the same tree.
    print(package_tree())
