"""The docs site builds with ``mkdocs build --strict``: user docs and the API reference.

Strict mode turns every warning into a failure: a link to a missing page or
anchor, a cross-reference mkdocstrings cannot resolve, an object an API page
names that does not exist, a docstring griffe cannot parse. Skipped where the
``docs`` extra is not installed (``make test`` installs it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")


def _build(site: Path, config: Path = ROOT / "mkdocs.yml") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_site_builds_strict(tmp_path: Path) -> None:
    result = _build(tmp_path / "site")
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert result.returncode == 0 and not warnings, "\n".join(warnings) or result.stderr[-2000:]
    api = tmp_path / "site" / "api"
    # The reference is generated from the code, not empty pages: the objects are there.
    assert 'id="sealstore.vault.store.Store"' in (api / "store.html").read_text()
    assert 'id="sealstore.loaders.safetensors.load_file"' in (api / "loaders.html").read_text()
    assert 'id="sealstore.errors.AuthenticationError"' in (api / "errors.html").read_text()


def test_strict_build_fails_on_a_broken_reference(tmp_path: Path) -> None:
    # The same config with one API page naming an object that does not exist:
    # the check can fail.
    docs = tmp_path / "docs"
    (docs / "api").mkdir(parents=True)
    (docs / "index.md").write_text("# x\n\nSee [the missing page](NOPE.md).\n")
    (docs / "api" / "gone.md").write_text("# gone\n\n::: sealstore.errors.NoSuchError\n")
    config = tmp_path / "mkdocs.yml"
    text = (ROOT / "mkdocs.yml").read_text()
    text = text.replace("docs_dir: docs", f"docs_dir: {docs}")
    text = text.replace("- scripts/mkdocs_hooks.py", f"- {ROOT / 'scripts' / 'mkdocs_hooks.py'}")
    text = text.replace("paths: [build/api-src]", f"paths: [{ROOT / 'build' / 'api-src'}]")
    text = text.replace("not_in_nav: |\n  vectors/README.md\n", "")
    nav_start, hooks = text.index("\nnav:"), text.index("\nhooks:")
    text = text[:nav_start] + "\nnav:\n  - index.md\n  - api/gone.md\n" + text[hooks:]
    config.write_text(text)
    result = _build(tmp_path / "site", config)
    assert result.returncode != 0
    assert "NOPE.md" in result.stderr
    assert "sealstore.errors.NoSuchError" in result.stderr
