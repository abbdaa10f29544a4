"""Datasets in the store: ``pull --file`` with folders and globs, a dataset's BoM, and a
model's BoM naming the dataset version it was trained on."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from sealstore.errors import NotFound
from sealstore.kms.local import LocalKeyring
from sealstore.vault.bom import BomSpec, validate_bom
from sealstore.vault.store import Store

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import fails, ok
from tests.test_cli import in_process as run

FILES = {
    "README.md": 10,
    "train/part-0.parquet": 100,
    "train/part-1.parquet": 101,
    "train/index.json": 5,
    "train/extra/part-9.parquet": 7,
    "test/part-0.parquet": 50,
    "test/meta.json": 3,
    "odd/x[1].txt": 4,
}


@pytest.fixture
def dataset(ring: LocalKeyring, tmp_path: Path) -> tuple[Store, Path]:
    src = tmp_path / "ds"
    for rel, n in FILES.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(os.urandom(n))
    store = Store.init(f"file://{tmp_path}/store")
    store.push(src, "ds", keys=["local:"])
    return store, src


def pulled(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (["train/*.parquet"], {"train/part-0.parquet", "train/part-1.parquet"}),
        (["train/**"], {f for f in FILES if f.startswith("train/")}),
        (["**/*.json"], {"train/index.json", "test/meta.json"}),
        (["train", "README.md"], {"README.md"} | {f for f in FILES if f.startswith("train/")}),
        (["test/"], {"test/part-0.parquet", "test/meta.json"}),
        (["odd/x[1].txt"], {"odd/x[1].txt"}),  # a path with a glob character names itself
        (
            ["*/part-[0-1].parquet"],
            {"train/part-0.parquet", "train/part-1.parquet", "test/part-0.parquet"},
        ),
        (
            ["train/part-0.parquet", "train/*.parquet"],
            {"train/part-0.parquet", "train/part-1.parquet"},
        ),
    ],
)
def test_pull_selects_files_by_path_folder_and_glob(
    dataset: tuple[Store, Path], tmp_path: Path, patterns: list[str], expected: set[str]
) -> None:
    store, src = dataset
    out = tmp_path / "out"
    store.pull("ds", out, files=patterns)
    assert pulled(out) == expected
    for rel in expected:
        assert (out / rel).read_bytes() == (src / rel).read_bytes()


@pytest.mark.parametrize("pattern", ["train/*.csv", "trai", "train/part-0", "nothing/"])
def test_a_pattern_naming_nothing_fails_and_pulls_nothing(
    dataset: tuple[Store, Path], tmp_path: Path, pattern: str
) -> None:
    store, _ = dataset
    out = tmp_path / "out"
    with pytest.raises(NotFound, match=re.escape(f"ds:1 has no file {pattern}")):
        store.pull("ds", out, files=["README.md", pattern])
    assert not out.exists()


def test_cli_pull_glob_and_stdout(dataset: tuple[Store, Path], tmp_path: Path) -> None:
    store, src = dataset
    env = {"SEALSTORE_STORE": store.url}
    out = tmp_path / "out"
    ok(run("pull", "ds", "-o", out, "--file", "test/*", env=env))
    assert pulled(out) == {"test/part-0.parquet", "test/meta.json"}
    # A glob naming one file may go to stdout; one naming several may not.
    got = ok(run("pull", "ds", "-o", "-", "--file", "**/meta.json", env=env)).stdout
    assert got == (src / "test/meta.json").read_bytes()
    line = fails(run("pull", "ds", "-o", "-", "--file", "train/*.parquet", env=env), 2)
    assert "takes one file" in line and "names 2" in line
    line = fails(run("pull", "ds", "-o", tmp_path / "o2", "--file", "val/*", env=env), 5)
    assert "has no file val/*" in line
    assert not (tmp_path / "o2").exists()


def test_a_dataset_version_has_a_data_bom_and_a_model_names_it(
    dataset: tuple[Store, Path], tmp_path: Path
) -> None:
    store, src = dataset
    env = {"SEALSTORE_STORE": store.url}
    spec = tmp_path / "ds.yaml"
    spec.write_text("description: shards\nlicense: cc-by-4.0\ndatasets: [ds:1]\n")
    ok(run("push", src, "ds", "-k", "local:", "--dataset", "--bom", spec, "--no-progress", env=env))
    raw = store.bom("ds:2")
    assert validate_bom(raw) is None
    doc = json.loads(raw)
    comp = doc["metadata"]["component"]
    assert (comp["type"], comp["bom-ref"], comp["data"]) == (
        "data",
        "dataset:ds:2",
        [{"type": "dataset", "name": "ds"}],
    )
    assert "modelCard" not in comp
    files = {c["name"]: c["hashes"][0]["content"] for c in comp["components"]}
    assert set(files) == set(FILES)
    manifest = store.manifest("ds:2")
    assert files == {e.path: e.sha256 for e in manifest.files}
    assert {"name": "sealstore:license", "value": "cc-by-4.0"} in comp["properties"]
    assert ok(run("bom", "show", "ds:2", env=env)).stdout.decode().startswith("dataset   ds:2")
    # A model trained on it names that version (and its manifest's hash).
    model = tmp_path / "model"
    model.mkdir()
    (model / "w.bin").write_bytes(b"w")
    store.push(model, "m", keys=["local:"], bom=BomSpec(task="x", datasets=["ds:2"]))
    used = json.loads(store.bom("m:1"))["components"]
    assert [c["bom-ref"] for c in used] == ["dataset:ds:2"]
    assert used[0]["type"] == "data"


def test_a_dataset_spec_with_model_fields_is_refused(
    dataset: tuple[Store, Path], tmp_path: Path
) -> None:
    store, src = dataset
    env = {"SEALSTORE_STORE": store.url}
    spec = tmp_path / "bad.yaml"
    spec.write_text("kind: dataset\ntask: classification\ntraining: {epochs: 3}\n")
    line = fails(run("push", src, "ds", "-k", "local:", "--bom", spec, env=env), 2)
    assert "a dataset has no task, training" in line
    spec.write_text("kind: table\n")
    line = fails(run("push", src, "ds", "-k", "local:", "--bom", spec, env=env), 2)
    assert "kind must be model or dataset" in line
    assert store.versions("ds") == ["1"]
