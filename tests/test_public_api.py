"""The public API: what ``sealstore`` re-exports, that it stays lazy and typed, and
that public functions take keyword-only parameters, not ``**kwargs: Any``.

The types themselves are checked by mypy (``make typecheck``, over
tests/typing/usage.py and the modules [tool.mypy] names); the last test here runs
mypy on a misuse to show that the check sees through the lazy facade.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import shutil
import subprocess
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest

import sealstore
import sealstore.errors

ROOT = Path(__file__).resolve().parent.parent
INIT = ROOT / "sealstore" / "__init__.py"


def _type_checking_imports() -> dict[str, str]:
    """``name -> module`` of the imports under ``if TYPE_CHECKING:`` in sealstore/__init__.py."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module, ast.unparse(imp)
                for alias in imp.names:
                    found[alias.asname or alias.name] = imp.module
    return found


def test_every_lazy_name_is_imported_for_the_type_checker_from_its_module() -> None:
    assert _type_checking_imports() == sealstore._LAZY


def test_all_is_the_errors_the_key_types_and_the_lazy_names() -> None:
    eager = set(sealstore.errors.__all__) | {"DataKey", "KeySlot", "Unwrapper", "Wrapper"}
    assert set(sealstore.__all__) == eager | (set(sealstore._LAZY) - {"open"})
    assert len(sealstore.__all__) == len(set(sealstore.__all__))


def test_every_public_error_is_the_one_in_sealstore_errors() -> None:
    for name in sealstore.errors.__all__:
        assert getattr(sealstore, name) is getattr(sealstore.errors, name), name
    assert issubclass(sealstore.InferenceRefused, sealstore.Refused)
    assert issubclass(sealstore.Refused, sealstore.SealstoreError)
    assert issubclass(sealstore.Terminated, KeyboardInterrupt)


def test_each_lazy_name_resolves_to_its_module_attribute() -> None:
    for name, module in sealstore._LAZY.items():
        assert getattr(sealstore, name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sealstore.nope  # noqa: B018


def test_import_sealstore_imports_none_of_the_floors_above() -> None:
    """The TYPE_CHECKING imports never run: ``import sealstore`` stays on the ground floor."""
    code = (
        "import sys, sealstore\n"
        "up = ('sealstore.kms', 'sealstore.vault', 'sealstore.loaders', 'sealstore.native',\n"
        "      'sealstore.stream', 'torch', 'numba', 'fsspec', 'boto3', 'hvac', 'numpy')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(up))\n"
        "assert not bad, bad\n"
        "from sealstore import load_file, Store\n"
        "assert load_file.__module__ == 'sealstore.loaders.safetensors'\n"
        "assert Store.__module__ == 'sealstore.vault.store'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- no **kwargs: Any ------------------------------------------------------------------

# Public callables that keep a **kwargs, and why: what they forward is open-ended by
# the library underneath, not a fixed set sealstore could list.
KWARGS_ALLOWED = {
    # fsspec's storage options: whatever the backend's file system takes (s3fs: key,
    # secret, endpoint_url, client_kwargs...), as fsspec.filesystem(protocol, **options).
    "sealstore.vault.store.Store.init",
    "sealstore.vault.store.Store.open",
    "sealstore.vault.store.trust_store",
    # transformers' from_pretrained options, then config attributes (num_labels=3).
    "sealstore.loaders.hf.from_pretrained",
}

PUBLIC_MODULES = [
    "sealstore",
    "sealstore.loaders",
    "sealstore.vault.store",
    "sealstore.kms.envelope",
    "sealstore.kms.registry",
    "sealstore.kms.aws_kms",
    "sealstore.kms.vault_transit",
]


def _functions(obj: Any, name: str) -> list[tuple[str, Callable[..., Any]]]:
    if inspect.isclass(obj):
        found = []
        for attr, member in vars(obj).items():
            if attr.startswith("_") and attr != "__init__":
                continue
            func = getattr(member, "__func__", member)  # classmethod, staticmethod
            if inspect.isfunction(func) and func.__module__ == obj.__module__:
                found.append((f"{obj.__module__}.{obj.__qualname__}.{attr}", func))
        return found
    if inspect.isfunction(obj):
        return [(f"{obj.__module__}.{obj.__qualname__}", obj)]
    return []


def test_public_functions_take_no_open_ended_keyword_arguments() -> None:
    pytest.importorskip("boto3")
    pytest.importorskip("hvac")
    offenders = set()
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None) or [n for n in vars(module) if n[0] != "_"]
        for name in names:
            for qualname, func in _functions(getattr(module, name), name):
                params = inspect.signature(func).parameters.values()
                if any(p.kind is p.VAR_KEYWORD for p in params):
                    offenders.add(qualname)
    assert offenders == KWARGS_ALLOWED


def _keywords(func: Callable[..., Any], drop: Collection[str] = ()) -> dict[str, Any]:
    return {
        p.name: (p.default, p.annotation)
        for p in inspect.signature(func).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in drop
    }


def test_forwarding_functions_take_the_options_of_what_they_forward_to() -> None:
    """Explicit parameters are copies: these keep them equal to the original's."""
    from sealstore.kms.envelope import seal_file, seal_stream
    from sealstore.loaders import safetensors as st
    from sealstore.vault import lifecycle, pull, push, rekey
    from sealstore.vault.store import Store

    assert _keywords(Store.push) == _keywords(push.push)
    assert _keywords(Store.pull) == _keywords(pull.pull)
    assert _keywords(Store.verify) == _keywords(pull.verify)
    assert _keywords(Store.shred) == _keywords(lifecycle.shred)
    assert _keywords(Store.rotate) == _keywords(lifecycle.rotate)
    assert _keywords(Store.rekey) == _keywords(rekey.rekey_version)
    assert _keywords(seal_file) == _keywords(seal_stream)
    assert _keywords(st.safe_open) == _keywords(st.SafeOpen.__init__)
    load_file = _keywords(st.load_file, {"guard", "module"})
    assert _keywords(st.load_model, {"strict", "device"}) == load_file
    assert _keywords(st.load_state_dict, {"strict", "guard", "device"}) == load_file
    assert _keywords(st.save_model, {"force_contiguous"}) == _keywords(st.save_file)


# -- the type checker sees through the lazy facade ---------------------------------------


def test_mypy_sees_the_lazy_names_typed(tmp_path: Path) -> None:
    """A misuse of a lazily re-exported name is a type error, not an unchecked ``Any``."""
    pytest.importorskip("mypy")
    subprocess.run([sys.executable, "scripts/mkdocs_hooks.py"], cwd=ROOT, check=True)
    misuse = tmp_path / "misuse.py"
    misuse.write_text(
        "from sealstore import Store, load_file, seal_file\n"
        "load_file('m.seal', thread=2)\n"
        "seal_file('a', 'b', ['local:'], chunk_sise=1)\n"
        "Store.open('file:///s').push('x', 'bert', key=['local:'])\n"
        "reveal_type(load_file)\n",
        encoding="utf-8",
    )
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or "mypy"
    run = subprocess.run(
        [mypy, "--config-file", str(ROOT / "pyproject.toml"), str(misuse)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    assert 'Unexpected keyword argument "thread" for "load_file"' in out, out
    assert 'Unexpected keyword argument "chunk_sise" for "seal_file"' in out, out
    assert 'Unexpected keyword argument "key" for "push" of "Store"' in out, out
    assert 'Revealed type is "def (src: Any, device: str | int =, *, threads: int' in out, out
