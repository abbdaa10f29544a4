"""The store fails closed: damage is reported (all of it), never hidden or served.

Tags that name missing versions, verify's exit code when some versions cannot
be opened here, listings with one bad manifest, and tag rollback and freeze
(the signed per-tenant sequence, ``sealstore.vault.freshness``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sealstore.kms.local import LocalKeyring
from sealstore.vault.store import Store
from tests.test_cli import fails, ok, run
from tests.test_store import model_dir


@pytest.fixture
def store(keyring: LocalKeyring, tmp_path: Path) -> Store:
    return Store.init(f"file://{tmp_path}/store", signer=keyring)


@pytest.fixture
def env(store: Store) -> dict[str, str]:
    return {"SEALSTORE_STORE": store.url}


def _root(store: Store) -> Path:
    return Path(store.url[len("file://") :])


def _manifest(store: Store, name: str, version: str, tenant: str = "default") -> Path:
    return _root(store) / store.version_dir(tenant, name, version) / "manifest.json"


def _corrupt_object(store: Store, ref: str, tenant: str = "default") -> None:
    m = store.manifest(ref, tenant=tenant)
    path = _root(store) / store.object_path(tenant, m.files[0].object)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


# -- a tag naming a missing version is damage ---------------------------------------------


def test_item10_verify_reports_a_tag_whose_manifest_is_gone(
    store: Store, env: dict[str, str], tmp_path: Path
) -> None:
    src = model_dir(tmp_path, {"w.bin": 3000})
    store.push(src, "m", keys=["local:"])
    store.push(src, "m", keys=["local:"])
    store.tag("m:1", "known-good")
    _manifest(store, "m", "1").unlink()
    proc = run("verify", env=env)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "m@known-good names m:1, whose manifest is missing" in err
    assert "Traceback" not in err
    # Asked about the artifact alone, the same.
    assert run("verify", "m", env=env).returncode == 1


def test_item10_every_kind_of_damage_is_reported(
    store: Store, env: dict[str, str], tmp_path: Path
) -> None:
    src = model_dir(tmp_path, {"w.bin": 3000})
    for _ in range(3):
        store.push(src, "m", keys=["local:"])
    store.push(src, "other", keys=["local:"])
    store.tag("m:1", "known-good")
    _manifest(store, "m", "1").unlink()  # a tag names nothing
    _corrupt_object(store, "m:2")  # an object is damaged
    _manifest(store, "other", "1").write_text("{not json")  # a manifest is unreadable
    # Every manifest of an artifact gone: only its tag is left to tell.
    store.push(src, "lost", keys=["local:"])
    _manifest(store, "lost", "1").unlink()
    err = run("verify", "--keyless", env=env).stderr.decode()
    assert "m@known-good names m:1, whose manifest is missing" in err
    assert "m:2/w.bin: object hash does not match" in err
    assert "other:1" in err and "not valid JSON" in err
    assert "lost@latest names lost:1, whose manifest is missing" in err
    assert "m:3: OK" in err


# -- damage wins over "no key" ------------------------------------------------------------


@pytest.fixture
def recipient(tmp_path: Path) -> str:
    ok(run("keys", "init", "--identity", tmp_path / "id.txt"))
    return ok(run("keys", "recipient", tmp_path / "id.txt")).stdout.decode().strip()


def test_item11_damage_wins_over_no_key(
    store: Store, env: dict[str, str], tmp_path: Path, recipient: str
) -> None:
    src = model_dir(tmp_path, {"w.bin": 3000})
    store.push(src, "m", keys=["local:"])
    store.push(src, "m", keys=[recipient])  # m:2 opens only with id.txt, not given here
    _corrupt_object(store, "m:1")
    proc = run("verify", env=env)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "m:1/w.bin" in err
    assert "sealstore: not checked: m:2:" in err
    assert "1 damaged, 1 not checked" in err


def test_item11_damage_in_a_version_no_key_opens_is_found(
    store: Store, env: dict[str, str], tmp_path: Path, recipient: str
) -> None:
    src = model_dir(tmp_path, {"w.bin": 3000})
    store.push(src, "m", keys=[recipient])
    _corrupt_object(store, "m:1")
    proc = run("verify", env=env)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "m:1/w.bin: object hash does not match" in err


def test_item11_only_no_key_is_still_exit_4(
    store: Store, env: dict[str, str], tmp_path: Path, recipient: str
) -> None:
    src = model_dir(tmp_path, {"w.bin": 3000})
    store.push(src, "m", keys=["local:"])
    store.push(src, "m", keys=[recipient])
    proc = run("verify", env=env)
    assert proc.returncode == 4, proc.stderr.decode()
    assert "sealstore: not checked: m:2:" in proc.stderr.decode()
    ok(run("verify", "-i", tmp_path / "id.txt", env=env))


# -- ls lists what it can and marks the rest ----------------------------------------------


def test_item12_ls_lists_good_versions_and_marks_the_bad_one(
    store: Store, env: dict[str, str], tmp_path: Path
) -> None:
    src = model_dir(tmp_path, {"w.bin": 3000})
    for _ in range(3):
        store.push(src, "m", keys=["local:"])
    path = _manifest(store, "m", "2")
    doc = json.loads(path.read_text())
    doc["created"] = "2000-01-01T00:00:00Z"  # an edit: the signature no longer holds
    path.write_text(json.dumps(doc))
    proc = run("ls", "m", env=env)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 1, err
    lines = out.splitlines()
    assert lines[0].startswith("m:1\t") and "file(s)" in lines[0]
    assert lines[1].startswith("m:2\tDAMAGED\t")
    assert lines[2].startswith("m:3\t") and lines[2].endswith("latest")
    assert err.startswith("sealstore: error: m: 1 damaged entry")
    rows = json.loads(run("ls", "m", "--json", env=env).stdout)
    assert [r["version"] for r in rows] == ["1", "2", "3"]
    assert "damaged" in rows[1] and "damaged" not in rows[0]
    # The tenant listing still lists the artifact.
    assert ok(run("ls", env=env)).stdout.decode().startswith("m\t3 version(s)\tlatest=3")


def test_item12_ls_of_a_missing_artifact_is_exit_5(
    store: Store, env: dict[str, str], tmp_path: Path
) -> None:
    line = fails(run("ls", "nonexistent", env=env), 5)
    assert "nonexistent not found" in line
    fails(run("show", "nonexistent", env=env), 5)
