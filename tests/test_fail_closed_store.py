"""The store fails closed: damage is reported (all of it), never hidden or served.

Tags that name missing versions, verify's exit code when some versions cannot
be opened here, listings with one bad manifest, and tag rollback and freeze
(the signed per-tenant sequence, ``sealstore.vault.freshness``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sealstore.kms.local import LocalKeyring
from sealstore.vault.store import Store
from tests.signed_docs import edited

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import fails, ok
from tests.test_cli import in_process as run
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
    doc = edited(doc, created="2000-01-01T00:00:00Z")  # the signature no longer holds
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


# -- tag rollback and freeze: the signed per-tenant sequence ------------------------------


def _seq_files(store: Store, tenant: str = "default") -> dict[str, bytes]:
    """The tenant's sequence documents as the storage holds them now."""
    root = _root(store) / "tenants" / tenant
    files = [root / "sequence.json", *sorted((root / "sequence").glob("*.json"))]
    return {str(f): f.read_bytes() for f in files}


def _put_back(store: Store, saved: dict[str, bytes], tenant: str = "default") -> None:
    """Roll the tenant's sequence back to *saved* (newer numbered documents deleted)."""
    for f in (_root(store) / "tenants" / tenant / "sequence").glob("*.json"):
        f.unlink()
    for path, data in saved.items():
        Path(path).write_bytes(data)


def _two_versions(store: Store, tmp_path: Path) -> tuple[Path, Path, bytes]:
    """m:1 and m:2 (different contents); the latest tag file as it was at m:1."""
    a = model_dir(tmp_path / "a", {"w.bin": 2000})
    b = model_dir(tmp_path / "b", {"w.bin": 2000})
    store.push(a, "m", keys=["local:"])
    old_tag = (_root(store) / "tenants/default/refs/m/latest").read_bytes()
    store.push(b, "m", keys=["local:"])
    return a, b, old_tag


def test_item09_a_tag_copied_back_is_not_served_and_is_reported(
    store: Store, env: dict[str, str], tmp_path: Path
) -> None:
    from sealstore.vault import backup
    from tests.test_store import same_tree

    _, b, old_tag = _two_versions(store, tmp_path)
    (_root(store) / "tenants/default/refs/m/latest").write_bytes(old_tag)  # validly signed
    # pull follows the signed sequence, not the tag file put back.
    assert Store.open(store.url).manifest("m").version == "2"
    ok(run("pull", "m", "-o", tmp_path / "out", env=env))
    assert same_tree(b, tmp_path / "out")
    # verify finds it, and so does a backup (which keeps the tag it had before).
    proc = run("verify", "--keyless", env=env)
    assert proc.returncode == 1, proc.stderr.decode()
    assert "m@latest names m:1, but the tenant's signed sequence says m:2" in proc.stderr.decode()
    snap, _ = backup.create(store, f"file://{tmp_path}/backup")
    assert any("tag default/m@latest" in d for d in snap.damaged)
    assert "default" in snap.sequences


def test_item09_a_sequence_rolled_back_is_refused(
    store: Store, env: dict[str, str], tmp_path: Path
) -> None:
    from sealstore.errors import AuthenticationError

    a = model_dir(tmp_path / "a", {"w.bin": 2000})
    store.push(a, "m", keys=["local:"])
    saved = _seq_files(store)
    old_tag = (_root(store) / "tenants/default/refs/m/latest").read_bytes()
    store.push(a, "m", keys=["local:"])
    # Everything put back as it was at m:1: the tag and the sequence.
    (_root(store) / "tenants/default/refs/m/latest").write_bytes(old_tag)
    _put_back(store, saved)
    with pytest.raises(AuthenticationError, match="refusing a rollback"):
        Store.open(store.url).pull("m", tmp_path / "out")
    line = fails(run("pull", "m", "-o", tmp_path / "out2", env=env), 1)
    assert "has serial 2, older than 4 seen here: refusing a rollback" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
    assert run("verify", "--keyless", env=env).returncode == 1
    # Deleting it outright is no way round either.
    for path in saved:
        Path(path).unlink()
    line = fails(run("pull", "m", "-o", tmp_path / "out", env=env), 1)
    assert "is gone, but this machine has seen serial 4" in line


def test_item09_an_old_document_copied_into_a_higher_slot_is_refused(
    store: Store, tmp_path: Path
) -> None:
    """A numbered document's slot is its serial: an older, validly signed one
    copied forward is neither served nor built on by the next writer."""
    from sealstore.errors import AuthenticationError

    a = model_dir(tmp_path / "a", {"w.bin": 2000})
    store.push(a, "m", keys=["local:"])
    folder = _root(store) / "tenants/default/sequence"
    old = max(folder.glob("*.json")).read_bytes()  # latest -> m:1
    store.push(a, "m", keys=["local:"])
    top = int(max(folder.glob("*.json")).stem)
    (folder / f"{top + 1:012d}.json").write_bytes(old)
    assert Store.open(store.url).manifest("m").version == "2"
    with pytest.raises(AuthenticationError, match="not its slot's"):
        Store.open(store.url).push(a, "m", keys=["local:"])
    assert Store.open(store.url).manifest("m").version == "2"


def test_item09_a_manifest_put_back_after_a_shred_is_refused(
    store: Store, env: dict[str, str], tmp_path: Path
) -> None:
    from sealstore.errors import AuthenticationError

    a = model_dir(tmp_path / "a", {"w.bin": 2000})
    store.push(a, "m", keys=["local:"])
    store.push(a, "m", keys=["local:"])
    before = _manifest(store, "m", "1").read_bytes()
    objects = {
        p: p.read_bytes() for p in (_root(store) / "objects/default").iterdir() if p.is_file()
    }
    store.shred("m:1")
    # The old manifest (with its key slots) and the objects put back.
    _manifest(store, "m", "1").write_bytes(before)
    for p, data in objects.items():
        p.write_bytes(data)
    with pytest.raises(AuthenticationError, match="not the one the signed sequence"):
        Store.open(store.url).pull("m:1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_item09_a_frozen_sequence_expires(
    store: Store, env: dict[str, str], tmp_path: Path
) -> None:
    import time

    from sealstore.errors import AuthenticationError
    from sealstore.vault import freshness

    a = model_dir(tmp_path / "a", {"w.bin": 2000})
    store.push(a, "m", keys=["local:"])
    freshness.refresh(store, "default", lifetime=1)
    saved = _seq_files(store)
    time.sleep(2.5)  # the store is frozen: nothing re-signs the document past its expiry
    assert _seq_files(store) == saved
    with pytest.raises(AuthenticationError, match="expired"):
        Store.open(store.url).manifest("m")
    line = fails(run("pull", "m", "-o", tmp_path / "out", env=env), 1)
    assert "expired at" in line and "sealstore store refresh --tenant default" in line
    # A publisher re-signs it; the lifetime is back to a day here.
    ok(run("store", "refresh", "--lifetime", "1", env=env))
    ok(run("pull", "m", "-o", tmp_path / "out", env=env))
    # Any write re-signs it too: a tag after the expiry is not refused.
    freshness.refresh(store, "default", lifetime=1)
    time.sleep(2.5)
    ok(run("tag", "m:1", "known-good", env=env))
    assert Store.open(store.url).manifest("m@known-good").version == "1"


def _race_tags(store: Store, keyring: LocalKeyring, tmp_path: Path, **opts: Any) -> None:
    """Three writers (each its own Store) tag one version six times each, all at once."""
    import threading

    store.push({"w.bin": b"x" * 500}, "m", keys=["local:"])
    start = store.sequence("default").serial
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def writer(k: int) -> None:
        mine = Store.open(store.url, signer=keyring, **opts)
        barrier.wait()
        try:
            for i in range(6):
                mine.tag("m:1", f"t{k}-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    fresh = Store.open(store.url, **opts)
    assert {f"t{k}-{i}" for k in range(3) for i in range(6)} <= set(fresh.tags("m"))
    assert fresh.sequence("default").serial == start + 18
    assert all(p is None for p in fresh.check_tags("m").values())


def test_item09_concurrent_writers_lose_no_tag(
    store: Store, keyring: LocalKeyring, tmp_path: Path
) -> None:
    _race_tags(store, keyring, tmp_path)


def test_item09_concurrent_writers_lose_no_tag_on_seaweedfs(
    services: dict[str, str], keyring: LocalKeyring, tmp_path: Path
) -> None:
    from tests.s3util import new_bucket, s3_options

    opts = s3_options(services["s3_url"], services["s3_key"], services["s3_secret"])
    s3 = Store.init(f"s3://{new_bucket(opts)}/models", signer=keyring, **opts)
    _race_tags(s3, keyring, tmp_path, **opts)


def test_item09_a_store_from_before_the_sequence_keeps_working(
    store: Store, keyring: LocalKeyring, tmp_path: Path, sealstore_env: Path
) -> None:
    from tests.test_store import same_tree

    a, b, _ = _two_versions(store, tmp_path)
    # As an older release left it: no sequence, and this machine never saw one.
    for path in _seq_files(store):
        Path(path).unlink()
    trust = json.loads((sealstore_env / "trust.json").read_text())
    trust.pop("counters", None)
    (sealstore_env / "trust.json").write_text(json.dumps(trust))
    old = Store.open(store.url)
    assert old.sequence("default") is None
    old.pull("m", tmp_path / "o2")
    assert same_tree(b, tmp_path / "o2")
    # The first write lists everything there is.
    old.tag("m:1", "known-good")
    seq = old.sequence("default")
    assert seq.serial == 1 and set(seq.versions("m")) == {"1", "2"}
    assert set(seq.tags("m")) == {"latest", "known-good"}
    old.pull("m@known-good", tmp_path / "o1")
    assert same_tree(a, tmp_path / "o1")


def test_item09_restore_writes_a_higher_sequence(
    store: Store, env: dict[str, str], tmp_path: Path
) -> None:
    from sealstore.vault import backup
    from tests.test_store import same_tree

    a = model_dir(tmp_path / "a", {"w.bin": 2000})
    store.push(a, "m", keys=["local:"])
    url = f"file://{tmp_path}/backup"
    snap, _ = backup.create(store, url)
    assert set(snap.sequences) == {"default"}
    assert backup.verify(url).ok
    store.push(model_dir(tmp_path / "b", {"w.bin": 2000}), "m", keys=["local:"])
    before = store.sequence("default").serial
    backup.restore(url, store=store)  # latest goes back to m:1, on purpose
    assert Store.open(store.url).sequence("default").serial > before
    ok(run("pull", "m", "-o", tmp_path / "out", env=env))
    assert same_tree(a, tmp_path / "out")
    ok(run("verify", "--keyless", env=env))


def test_item09_ways_out_of_a_rollback(store: Store, env: dict[str, str], tmp_path: Path) -> None:
    from sealstore.vault import backup
    from tests.test_store import same_tree

    a = model_dir(tmp_path / "a", {"w.bin": 2000})
    store.push(a, "m", keys=["local:"])
    saved = _seq_files(store)
    url = f"file://{tmp_path}/backup"
    backup.create(store, url)
    store.push(model_dir(tmp_path / "b", {"w.bin": 2000}), "m", keys=["local:"])
    _put_back(store, saved)
    fails(run("pull", "m", "-o", tmp_path / "out", env=env), 1)
    # A restore writes a sequence above anything seen: served again, as the snapshot had it.
    ok(run("backup", "restore", "--from", url, env=env))
    ok(run("pull", "m", "-o", tmp_path / "out", env=env))
    assert same_tree(a, tmp_path / "out")
    # Or, with no backup, an admin accepts what the storage holds now.
    _put_back(store, saved)
    fails(run("pull", "m", "-o", tmp_path / "out2", env=env), 1)
    ok(run("store", "refresh", "--rebuild", env=env))
    ok(run("pull", "m:2", "-o", tmp_path / "out2", env=env))
    ok(run("verify", "--keyless", env=env))


def test_item09_a_pull_reads_one_small_object_at_most_beyond_the_manifest(
    store: Store, tmp_path: Path
) -> None:
    store.push({"w.bin": b"x" * 500}, "m", keys=["local:"])
    reader = Store.open(store.url)
    seen: list[str] = []
    real_read, real_exists = reader.storage.read, reader.storage.exists

    def read(path: str) -> bytes:
        seen.append(path)
        return real_read(path)

    def exists(path: str) -> bool:
        seen.append(path)
        return real_exists(path)

    reader.storage.read = read  # type: ignore[method-assign]
    reader.storage.exists = exists  # type: ignore[method-assign]
    for ref in ("m", "m@latest", "m:1"):
        seen.clear()
        reader.manifest(ref)
        # The sequence (which also resolves the tag) and the manifest: nothing else.
        wanted = ["tenants/default/sequence.json", "tenants/default/artifacts/m/1/manifest.json"]
        assert seen == wanted, ref


def test_item09_the_rollback_floor_survives_concurrent_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commands on one machine raise the floor in trust.json at once: none may lose
    another's update (a floor that goes down lets a rollback through)."""
    import subprocess
    import sys

    from sealstore.vault.store import pinned_counter

    code = (
        "import sys\n"
        "from sealstore.vault.store import pin_counter\n"
        "w = sys.argv[1]\n"
        "for i in range(1, 31):\n"
        "    pin_counter('s', f'{w}-{i}', i)\n"
    )
    monkeypatch.setenv("SEALSTORE_HOME", str(tmp_path / "home"))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)]) for w in range(6)]
    assert all(p.wait(120) == 0 for p in procs)
    lost = [(w, i) for w in range(6) for i in range(1, 31) if pinned_counter("s", f"{w}-{i}") != i]
    assert lost == []
