"""The store commands as a user runs them: init, push, pull, ls, show, tag, rm, bom, verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sealstore.kms.local import LocalKeyring
from sealstore.vault.bom import validate_bom

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import fails, ok
from tests.test_cli import in_process as run
from tests.test_store import model_dir, same_tree


@pytest.fixture
def store_env(keyring: LocalKeyring, tmp_path: Path) -> dict[str, str]:
    url = f"file://{tmp_path}/store"
    out = ok(run("store", "init", url)).stdout.decode()
    assert out.startswith("root key ed25519:")
    return {"SEALSTORE_STORE": url}


def test_push_pull_ls_show_tag_rm(store_env: dict[str, str], tmp_path: Path) -> None:
    src = model_dir(tmp_path)
    e = store_env
    assert ok(run("push", src, "bert", "-k", "local:", env=e)).stdout == b"bert:1\n"
    assert ok(run("push", src, "bert", "-k", "local:", "--no-parent", env=e)).stdout == b"bert:2\n"
    listing = ok(run("ls", env=e)).stdout.decode()
    assert listing.startswith("bert\t2 version(s)\tlatest=2")
    rows = json.loads(ok(run("ls", "bert", "--json", env=e)).stdout)
    assert [r["version"] for r in rows] == ["1", "2"]
    shown = ok(run("show", "bert:1", env=e)).stdout.decode()
    assert "(verified)" in shown and "model.safetensors" in shown
    assert "blob" not in ok(run("show", "bert:1", "--json", env=e)).stdout.decode()
    ok(run("tag", "bert:1", "known-good", env=e))
    ok(run("pull", "bert@known-good", "-o", tmp_path / "out", env=e))
    assert same_tree(src, tmp_path / "out")
    err = ok(run("verify", "bert:1", env=e)).stderr.decode()
    assert "bert:1: OK" in err
    ok(run("verify", "--keyless", env=e))
    rm = ok(run("rm", "bert:1", "--yes", env=e)).stderr.decode()
    assert "key slots destroyed" in rm
    line = fails(run("pull", "bert:1", "-o", tmp_path / "again", env=e), 4)
    assert "crypto-shredded" in line
    assert not (tmp_path / "again").exists()
    assert "SHREDDED" in ok(run("ls", "bert", env=e)).stdout.decode()


def test_tenants_from_the_cli(store_env: dict[str, str], tmp_path: Path) -> None:
    src = model_dir(tmp_path, {"w.bin": 1000})
    ok(run("push", src, "m", "--tenant", "alpha", "-k", "local:", env=store_env))
    assert ok(run("ls", "--tenant", "beta", env=store_env)).stdout == b""
    assert ok(run("ls", "--tenant", "alpha", env=store_env)).stdout.startswith(b"m\t")
    fails(run("pull", "m", "-o", tmp_path / "o", "--tenant", "beta", env=store_env), 5)
    env = dict(store_env, SEALSTORE_TENANT="alpha")
    ok(run("pull", "m", "-o", tmp_path / "o", env=env))


def test_bom_commands(store_env: dict[str, str], tmp_path: Path) -> None:
    src = model_dir(tmp_path, {"w.bin": 1000})
    spec = tmp_path / "bom.yaml"
    spec.write_text("task: fill-mask\ntraining:\n  epochs: 2\n")
    ok(run("push", src, "m", "-k", "local:", "--bom", spec, env=store_env))
    shown = ok(run("bom", "show", "m", env=store_env)).stdout.decode()
    assert "fill-mask" in shown and "epochs = 2" in shown
    ok(run("bom", "export", "m", "-o", tmp_path / "bom.json", env=store_env))
    assert validate_bom((tmp_path / "bom.json").read_bytes()) is None
    validated = ok(run("bom", "export", "m", "--validate", env=store_env)).stdout
    assert validated == (tmp_path / "bom.json").read_bytes()
    spec.write_text("epochs: 2\n")
    line = fails(run("push", src, "m", "-k", "local:", "--bom", spec, env=store_env), 2)
    assert "unknown field" in line


def test_store_errors_are_one_line(store_env: dict[str, str], tmp_path: Path) -> None:
    src = model_dir(tmp_path, {"w.bin": 10})
    assert "-k URI" in fails(run("push", src, "m", env=store_env), 2)
    assert "bad artifact name" in fails(run("push", src, "../m", "-k", "local:", env=store_env), 2)
    fails(run("pull", "nothere", "-o", tmp_path / "x", env=store_env), 5)
    fails(run("show", "m:9", env=store_env), 5)
    other = {"SEALSTORE_STORE": f"file://{tmp_path}/nostore"}
    assert "store init" in fails(run("ls", env=other), 5)
    ok(run("push", src, "m", "-k", "local:", env=store_env))
    assert "already exists" in fails(run("push", src, "m:1", "-k", "local:", env=store_env), 5)
    line = fails(run("store", "init", store_env["SEALSTORE_STORE"]), 5)
    assert "already exists" in line


def test_untrusted_store_needs_trust(
    store_env: dict[str, str], tmp_path: Path, keyring: LocalKeyring
) -> None:
    # Another user (another home and keyring) meets the store.
    home = tmp_path / "home2"
    home.mkdir()
    env = dict(store_env, SEALSTORE_HOME=str(home))
    ok(run("keys", "init", env=env))
    line = fails(run("ls", env=env), 1)
    assert "store trust" in line
    ok(
        run(
            "store",
            "trust",
            store_env["SEALSTORE_STORE"],
            "--root",
            str(keyring.signing_key_id),
            env=env,
        )
    )
    ok(run("ls", env=env))
    # Reading is allowed; pushing needs the root to add this user's signing key.
    src = model_dir(tmp_path, {"w.bin": 10})
    line = fails(run("push", src, "m", "-k", "local:", env=env), 1)
    assert "not a signer" in line
    key2 = json.loads(ok(run("keys", "list", "--json", env=env)).stdout)["signing_key"]
    ok(run("store", "add-signer", key2, env=store_env))
    ok(run("push", src, "m", "-k", "local:", env=env))
    assert ok(run("verify", "m", env=env))


def test_store_rotate_and_gc(
    store_env: dict[str, str], tmp_path: Path, keyring: LocalKeyring
) -> None:
    src = model_dir(tmp_path, {"w.bin": 5000})
    ok(run("push", src, "m", "-k", "local:", env=store_env))
    ok(run("keys", "init", "--identity", tmp_path / "id.txt"))
    recipient = ok(run("keys", "recipient", tmp_path / "id.txt")).stdout.decode().strip()
    err = ok(run("store", "rotate", "m:1", "--to", recipient, env=store_env)).stderr.decode()
    assert "2 slot(s)" in err
    err = ok(
        run("store", "rotate", "m:1", "--remove", f"local:{keyring.path}", env=store_env)
    ).stderr.decode()
    assert "1 slot(s)" in err
    ok(run("pull", "m", "-o", tmp_path / "o", "-i", tmp_path / "id.txt", env=store_env))
    assert "0 unreferenced" in ok(run("store", "gc", env=store_env)).stderr.decode()


def test_verify_without_the_key_is_exit_4(
    store_env: dict[str, str], tmp_path: Path, keyring: LocalKeyring
) -> None:
    src = model_dir(tmp_path, {"w.bin": 100})
    ok(run("push", src, "m", "-k", "local:", env=store_env))
    (tmp_path / "m").mkdir()  # a folder named like the artifact does not make it a file
    env = dict(store_env, SEALSTORE_PASSPHRASE="wrong")
    proc = run("verify", "m", env=env)
    assert proc.returncode == 4, proc.stderr.decode()
