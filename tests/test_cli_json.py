"""The CLI's ``--json`` reports and errors, options after the subcommand, completion, progress.

Every command runs as the installed console script against real files and a
real ``file://`` store (with its audit log and a ``file://`` backup location).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sealstore.kms.local import LocalKeyring
from tests.test_broker import (  # noqa: F401 (fixtures)
    pki,
    setup,
)

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import DATA, fails, ok
from tests.test_cli import in_process as run
from tests.test_store import model_dir, same_tree


def report(proc: subprocess.CompletedProcess[bytes], *, warnings: bool = False) -> dict[str, Any]:
    """The JSON object a successful --json run printed on stdout.

    Stderr is empty, or with *warnings* holds only JSON warning lines (the
    broker's commands log some).
    """
    ok(proc)
    if not warnings:
        assert proc.stderr == b"", proc.stderr.decode()
    for line in proc.stderr.decode().splitlines():
        assert set(json.loads(line)) == {"warning"}, line
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict)
    return doc


def error(proc: subprocess.CompletedProcess[bytes], code: int) -> dict[str, Any]:
    """The one JSON error object a failed --json run wrote on stderr, with its exit *code*."""
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    assert proc.returncode == code, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    doc = json.loads(lines[0])["error"]
    assert doc["exit_code"] == code and doc["message"] and doc["type"]
    return doc


@pytest.fixture
def store_env(ring: LocalKeyring, tmp_path: Path) -> dict[str, str]:
    url = f"file://{tmp_path}/store"
    created = report(run("store", "init", url, "--json"))
    assert created["url"] == url and created["root"].startswith("ed25519:")
    return {"SEALSTORE_STORE": url}


def _secrets(ring: LocalKeyring) -> list[str]:
    """The keyring file's encrypted fields: none may reach any output."""
    doc = json.loads(Path(ring.path).read_text())
    found: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if k in ("ct", "ciphertext", "wrapped", "blob", "nonce", "key", "secret"):
                    found.append(json.dumps(x))
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(doc)
    return [s.strip('"') for s in found if len(s) > 12]


def test_files_commands_report_json(ring: LocalKeyring, tmp_path: Path) -> None:
    plain = tmp_path / "plain.bin"
    plain.write_bytes(DATA)
    sealed = tmp_path / "s"
    enc = report(run("encrypt", "-k", "local:", "-o", sealed, plain, "--json"))
    assert enc["bytes"] == len(DATA) and enc["output"] == str(sealed)
    assert enc["suite"] == "AES-256-GCM" and enc["slots"] == ["local:"]
    assert isinstance(enc["seconds"], float)
    dec = report(run("--json", "decrypt", "-o", tmp_path / "out", sealed))
    assert dec == {
        "authenticated": True,
        "bytes": len(DATA),
        "output": str(tmp_path / "out"),
        "seconds": dec["seconds"],
    }
    assert (tmp_path / "out").read_bytes() == DATA
    ver = report(run("verify", sealed, "--json"))
    assert ver["ok"] is True and ver["file"] == str(sealed) and ver["bytes"] == len(DATA)
    info = report(run("inspect", sealed, "--json"))
    assert info["suite"] == "AES-256-GCM" and info["slots"][0]["kind"]
    # Where stdout carries the data, the report goes to stderr.
    proc = ok(run("decrypt", "-o", "-", sealed, "--json"))
    assert proc.stdout == DATA
    assert json.loads(proc.stderr)["bytes"] == len(DATA)
    for out in (enc, dec, ver, info):
        text = json.dumps(out)
        assert not any(secret in text for secret in _secrets(ring))


def test_json_errors_keep_the_exit_codes(ring: LocalKeyring, tmp_path: Path) -> None:
    plain = tmp_path / "plain.bin"
    plain.write_bytes(DATA)
    # 3: not a sealed file; 5: missing; 2: usage (found before the command runs).
    assert error(run("verify", plain, "--json"), 3)["type"] == "FormatError"
    missing = error(run("--json", "decrypt", "-o", tmp_path / "o", tmp_path / "nope"), 5)
    assert "nope" in missing["message"]
    usage = error(run("encrypt", "--json", "--chunk-size", "lots", "-o", "x", plain), 2)
    assert usage["type"] == "UsageError" and "not a size" in usage["message"]
    assert error(run("--json", "nosuchcommand"), 2)["type"] == "UsageError"
    # A tampered file: 1, and nothing written.
    sealed = tmp_path / "s"
    ok(run("encrypt", "-k", "local:", "-o", sealed, plain))
    data = bytearray(sealed.read_bytes())
    data[-20] ^= 1
    sealed.write_bytes(bytes(data))
    assert error(run("decrypt", "-o", tmp_path / "o", sealed, "--json"), 1)["type"] == (
        "AuthenticationError"
    )
    assert not (tmp_path / "o").exists()
    # No key: 4, and the message names no key material.
    other = tmp_path / "other.json"
    ok(run("keys", "init", "--keyring", other))
    ok(run("encrypt", "-k", f"local:{other}", "-o", tmp_path / "s2", plain))
    other.unlink()
    denied = error(run("decrypt", "-o", tmp_path / "o", tmp_path / "s2", "--json"), 4)
    assert denied["type"] == "KeyUnavailable"
    # --json on a command that writes no report is a usage error, as JSON.
    assert "writes no report" in error(run("--json", "broker", "token"), 2)["message"]
    assert "--json" in error(run("broker", "token", "--json"), 2)["message"]
    # Without --json, errors stay one plain line.
    assert "not a sealed file" in fails(run("verify", plain), 3)
    # "--json" after "--" is a file name, not the option.
    assert fails(run("verify", "--", "--json"), 5)


def test_quiet_after_the_subcommand(ring: LocalKeyring, tmp_path: Path) -> None:
    plain = tmp_path / "plain.bin"
    plain.write_bytes(DATA)
    loud = ok(run("encrypt", "-k", "local:", "-o", tmp_path / "a", plain))
    assert b"sealed (AES-256-GCM" in loud.stderr
    for args in (("-q", "encrypt"), ("encrypt", "-q"), ("encrypt", "--quiet")):
        proc = ok(run(*args, "-k", "local:", "-o", tmp_path / "b", plain, "--no-progress"))
        assert proc.stderr == b""
    after = ok(run("verify", tmp_path / "b", "-q"))
    assert after.stderr == b"" and after.stdout == b""
    # -q after an action of a group too.
    assert ok(run("keys", "list", "-q")).stderr == b""


def test_store_commands_report_json(store_env: dict[str, str], tmp_path: Path) -> None:
    e = store_env
    src = model_dir(tmp_path)
    pushed = report(run("push", src, "bert", "-k", "local:", "--json", env=e))
    assert pushed["ref"] == "bert:1" and pushed["name"] == "bert" and pushed["version"] == "1"
    assert pushed["tenant"] == "default" and pushed["files"] >= 2 and pushed["bytes"] > 0
    report(run("push", src, "bert", "-k", "local:", "--json", env=e))
    tagged = report(run("tag", "bert:1", "known-good", "--json", env=e))
    assert tagged == {"name": "bert", "tag": "known-good", "version": "1"}
    pulled = report(run("pull", "bert@known-good", "-o", tmp_path / "out", "--json", env=e))
    assert pulled["ref"] == "bert:1" and pulled["verified"] is True
    assert len(pulled["files"]) == pushed["files"]
    one = ("bert:2", "--file", "tokenizer/*", "-o", tmp_path / "one", "--json")
    part = report(run("pull", *one, env=e))
    assert part["files"] == ["tokenizer/vocab.txt"] and part["bytes"] == 5000
    assert same_tree(src, tmp_path / "out")
    shown = report(run("show", "bert:1", "--json", env=e))
    assert "blob" not in json.dumps(shown) and shown["signer"].startswith("ed25519:")
    bom = report(run("bom", "show", "bert:1", "--json", env=e))
    assert bom["model"] == "bert:1" and all(set(f) == {"path", "sha256"} for f in bom["files"])
    info = report(run("store", "info", "--json", env=e))
    assert info["url"] == e["SEALSTORE_STORE"]
    checked = report(run("verify", "bert", "--json", env=e))
    assert checked["ok"] is True and checked["damaged"] == [] and checked["tags"] >= 1
    assert [v["ref"] for v in checked["versions"]] == ["bert:2"]
    everything = report(run("verify", "--keyless", "--json", env=e))
    assert {v["ref"] for v in everything["versions"]} == {"bert:1", "bert:2"}
    assert everything["keyless"] is True
    # rm: --json never prompts; it wants --yes.
    refused = error(run("rm", "bert:1", "--json", env=e), 2)
    assert "--yes" in refused["message"]
    gone = report(run("rm", "bert:1", "--yes", "--json", env=e))
    assert gone["ref"] == "bert:1" and gone["tags_removed"] == ["known-good"]
    assert gone["objects_deleted"] == pushed["files"] and gone["shredded"]
    swept = report(run("store", "gc", "--grace", "0", "--json", env=e))
    assert swept["count"] == len(swept["deleted"])
    status = report(run("safe-mode", "status", "--json", env=e))
    assert status["enabled"] is False
    # Not found: 5, as JSON.
    assert error(run("show", "nothere", "--json", env=e), 5)["type"] == "NotFound"


def test_store_verify_json_reports_damage(store_env: dict[str, str], tmp_path: Path) -> None:
    e = store_env
    src = model_dir(tmp_path, {"w.bin": 200_000})
    report(run("push", src, "m", "-k", "local:", "--json", env=e))
    root = Path(e["SEALSTORE_STORE"].removeprefix("file://"))
    (obj,) = (p for p in (root / "objects").rglob("*") if p.is_file())
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 1
    obj.write_bytes(bytes(data))
    proc = run("verify", "m:1", "--json", env=e)
    # The report on stdout names the damage; the error object on stderr gives exit 1.
    err = error(proc, 1)
    assert err["type"] == "AuthenticationError"
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["damaged"] and doc["damaged"][0]["ref"] == "m:1"
    assert doc["versions"][0]["problems"]


def test_audit_and_backup_report_json(store_env: dict[str, str], tmp_path: Path) -> None:
    e = store_env
    src = model_dir(tmp_path, {"w.bin": 5000})
    report(run("push", src, "m", "-k", "local:", "--json", env=e))
    key = report(run("audit", "key", "--json", env=e))
    assert key["key_id"].startswith("ed25519:")
    checked = report(run("audit", "verify", "--json", env=e))
    assert checked["ok"] is True and checked["problems"] == 0
    assert sum(s["records"] for s in checked["streams"]) >= 1
    shown = report(run("audit", "show", "--action", "push", "--json", env=e))
    assert shown["records"] and all(r["verified"] for r in shown["records"])
    assert {r["action"] for r in shown["records"]} == {"push"}
    # The exports write data, not a report: --json is refused there.
    assert error(run("audit", "export", "--json", env=e), 2)["type"] == "UsageError"

    where = f"file://{tmp_path}/backups"
    made = report(run("backup", "create", "--to", where, "--json", env=e))
    assert made["snapshot"] and made["damaged"] == [] and made["objects"] >= 1
    listed = json.loads(ok(run("backup", "list", "--from", where, "--json", env=e)).stdout)
    assert [r["id"] for r in listed] == [made["snapshot"]]
    verified = report(run("backup", "verify", "--from", where, "--json", env=e))
    assert verified["ok"] is True and verified["snapshot"] == made["snapshot"]
    restored = report(run("backup", "restore", "--from", where, "--json", env=e))
    assert restored["snapshot"] == made["snapshot"] and restored["problems"] == []
    assert restored["changed"] is False
    # A corrupt object in the backup: the report, then exit 1 as JSON.
    blob = next(
        p for p in (tmp_path / "backups").rglob("*") if p.is_file() and "objects" in p.parts
    )
    blob.write_bytes(b"x" + blob.read_bytes()[1:])
    proc = run("backup", "verify", "--from", where, "--json", env=e)
    assert error(proc, 1)["type"] == "AuthenticationError"
    assert json.loads(proc.stdout)["ok"] is False


def test_keys_report_json(sealstore_env: Path, tmp_path: Path) -> None:
    made = report(run("keys", "init", "--json"))
    assert made["key_uri"] == f"local:{made['keyring']}" and made["signing_key"].startswith(
        "ed25519:"
    )
    listed = report(run("keys", "list", "--json"))
    assert listed["id"] == made["id"]
    ring = LocalKeyring.open(made["keyring"])
    for out in (made, listed):
        assert not any(secret in json.dumps(out) for secret in _secrets(ring))
    ident = report(run("keys", "init", "--identity", tmp_path / "id", "--json"))
    assert ident["recipient"].startswith("hpke:x25519:")
    again = report(run("keys", "recipient", tmp_path / "id", "--json"))
    assert again["recipient"] == ident["recipient"]
    # The identity's secret is in its file only.
    secret = (tmp_path / "id").read_text().split()[-1]
    assert secret not in json.dumps(ident) + json.dumps(again)


def test_completion_scripts(tmp_path: Path) -> None:
    script = ok(run("completion", "bash")).stdout.decode()
    path = tmp_path / "sealstore.bash"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)

    def complete(*words: str) -> set[str]:
        line = " ".join(("sealstore", *words))
        before = words[-2] if len(words) > 1 else "sealstore"
        probe = (
            f"source {path}; COMP_WORDS=(sealstore {' '.join(words)}); "
            f"COMP_CWORD={len(words)}; COMP_LINE='{line}'; COMP_POINT={len(line)}; "
            f"_shtab_sealstore sealstore {words[-1]} {before}; "
            'printf "%s\\n" "${COMPREPLY[@]}"'
        )
        out = subprocess.run(["bash", "-c", probe], capture_output=True, timeout=30, check=True)
        return set(out.stdout.decode().split())

    assert complete("pu") == {"push", "pull"}
    assert {"gc", "grant"} <= complete("store", "g")
    assert "--no-progress" in complete("push", "--no")
    assert "completion" in complete("comp")
    for shell in ("zsh", "fish"):
        text = ok(run("completion", shell)).stdout.decode()
        assert "push" in text and "safe-mode" in text
    if shutil.which("zsh"):
        zsh = tmp_path / "_sealstore"
        zsh.write_text(ok(run("completion", "zsh")).stdout.decode())
        subprocess.run(["zsh", "-n", str(zsh)], check=True, timeout=30)
    assert "invalid choice" in fails(run("completion", "tcsh"), 2)


def test_terminal_bar_shows_an_eta() -> None:
    from sealstore.progress import Progress, eta

    assert eta(0, 100, 1.0) == ""
    assert eta(50, 100, 10.0) == "ETA 0:10"
    assert eta(1, 1000, 10.0) == "ETA 2:46:30"
    assert eta(100, 100, 10.0) == ""
    out = io.StringIO()
    bar = Progress("push", 1000, stream=out, force=True)
    bar(250)
    bar.close()
    drawn = out.getvalue()
    assert "push [" in drawn and "25%" in drawn and "ETA" in drawn and drawn.endswith("\n")
    quiet = io.StringIO()  # not a terminal, not forced: nothing
    with Progress("push", 1000, stream=quiet) as b:
        b(1000)
    assert quiet.getvalue() == ""


def test_library_bar_uses_tqdm_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from sealstore.progress import library_bar

    pytest.importorskip("tqdm")
    with library_bar("load", 1000) as bar:
        assert bar.uses_tqdm
        bar(600)
        bar(400)
        assert bar._tqdm.n == 1000
    # Without tqdm the library falls back to the terminal bar (and still counts).
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with library_bar("load", 1000) as bar:
        assert not bar.uses_tqdm
        bar(10)
        assert bar._plain is not None and bar._plain.done == 10


def test_library_bar_draws_off_a_terminal(tmp_path: Path) -> None:
    """progress=True in a process whose stderr is a file (a job log) shows tqdm's bar."""
    pytest.importorskip("tqdm")
    code = (
        "import time\n"
        "from sealstore.progress import library_bar\n"
        "with library_bar('load', 100) as bar:\n"
        "    time.sleep(0.6)\n"
        "    bar(100)\n"
    )
    log = tmp_path / "log"
    with log.open("wb") as fp:
        subprocess.run(
            [sys.executable, "-c", code], stderr=fp, check=True, timeout=60, env=dict(os.environ)
        )
    assert "load" in log.read_text()


def test_store_verify_bar_has_a_total(store: Any, ring: LocalKeyring, tmp_path: Path) -> None:
    from sealstore.cli.store import _verify_total

    src = model_dir(tmp_path, {"a.bin": 1000, "b.bin": 3000})
    store.push(src, "m", keys=["local:"])
    store.push(src, "n", keys=["local:"])
    assert _verify_total(store, "m", "default") == 4000
    assert _verify_total(store, None, "default") == 8000
    assert _verify_total(store, "nothere", "default") == 0


def test_lockdown_reports_json(tmp_path: Path, redis_url: str, request: Any) -> None:
    """lockdown, status and lift through the replicas' shared Redis (--config), as JSON."""
    import uuid

    broker_setup = request.getfixturevalue("setup")  # the broker tests' config (TPM)

    from tests.test_broker_incident import _config

    prefix = f"t-{uuid.uuid4().hex}:"
    cfg = _config(broker_setup, tmp_path, state={"url": redis_url, "prefix": prefix})
    try:
        args = ("--tenant", "acme", "--reason", "drill", "--config", cfg, "--json")
        down = report(run("lockdown", *args), warnings=True)
        assert down["action"] == "lockdown" and down["lockdowns"] == {"acme": "drill"}
        status = report(run("--json", "lockdown", "status", "--config", cfg), warnings=True)
        assert status == {"action": "status", "lockdowns": {"acme": "drill"}, "lockouts": {}}
        lift = ("lift", "--tenant", "acme", "--config", cfg, "--json")
        lifted = report(run("lockdown", *lift), warnings=True)
        assert lifted["lockdowns"] == {}
        # The replicas' state URL never appears in a report (it may hold a password).
        checked = report(run("broker", "check", "--config", cfg, "--json"), warnings=True)
        assert checked["state"] == "shared" and redis_url not in json.dumps(checked)
        assert {"tenant": "acme", "artifact": "minilm"}.items() <= checked["releases"][0].items()
    finally:
        import redis

        r = redis.Redis.from_url(redis_url)
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)


def test_load_file_progress_true_draws_with_tqdm(
    ring: LocalKeyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_file(progress=True) counts every decrypted byte on tqdm's bar, then closes it."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("tqdm")
    import sealstore.loaders.safetensors as st
    from sealstore.loaders import load_file, save_file
    from sealstore.progress import LibraryBar, library_bar

    tensors = {"a": torch.arange(300_000, dtype=torch.float32), "b": torch.ones(7, 5)}
    save_file(tensors, tmp_path / "m.seal", keys=["local:"])
    made: list[LibraryBar] = []

    def keep(label: str, total: int | None) -> LibraryBar:
        made.append(library_bar(label, total))
        return made[-1]

    monkeypatch.setattr(st, "library_bar", keep)
    loaded = load_file(tmp_path / "m.seal", progress=True)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    (bar,) = made
    assert bar.uses_tqdm
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    assert bar._tqdm.n == bar._tqdm.total == data
    assert bar._tqdm.disable  # closed: tqdm disables a bar once it is closed


def test_rotation_roles_and_refresh_report_json(store_env: dict[str, str], tmp_path: Path) -> None:
    e = store_env
    ident = report(run("keys", "init", "--identity", tmp_path / "id", "--json"))
    plain = tmp_path / "plain.bin"
    plain.write_bytes(DATA)
    ok(run("encrypt", "-k", "local:", "-o", tmp_path / "s", plain))
    rotated = report(run("keys", "rotate", tmp_path / "s", "--to", ident["recipient"], "--json"))
    (entry,) = rotated["files"]
    assert entry["file"] == str(tmp_path / "s")
    assert [s["kind"] for s in entry["slots"]] == ["local", "hpke"]
    assert "blob" not in json.dumps(rotated)
    ok(run("push", model_dir(tmp_path, {"w.bin": 100}), "m", "-k", "local:", env=e))
    moved = report(run("store", "rotate", "m:1", "--to", ident["recipient"], "--json", env=e))
    assert moved["ref"] == "m:1" and {s["kind"] for s in moved["slots"]} == {"local", "hpke"}
    other = report(run("keys", "init", "--keyring", tmp_path / "other.json", "--json"))
    granted = report(
        run("store", "grant", other["signing_key"], "reader", "--tenant", "acme", "--json", env=e)
    )
    assert granted == {"key": other["signing_key"], "role": "reader", "tenant": "acme"}
    revoked = report(
        run("store", "revoke", other["signing_key"], "--tenant", "acme", "--json", env=e)
    )
    assert revoked["role"] is None
    fresh = report(run("store", "refresh", "--lifetime", "2", "--json", env=e))
    assert fresh["tenant"] == "default" and fresh["serial"] >= 1 and fresh["expires"]


def test_cli_bar_on_a_terminal_shows_the_time_left(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    """A pull into a FIFO read slowly, stderr on a pseudo-terminal: the bar has an ETA."""
    import pty
    import threading
    import time

    size = 6 << 20
    ok(run("push", model_dir(tmp_path, {"w.bin": size}), "m", "-k", "local:", env=store_env))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    master, slave = pty.openpty()
    cmd = [str(Path(sys.executable).parent / "sealstore"), "pull", "m", "--file", "w.bin"]
    proc = subprocess.Popen(
        [*cmd, "-o", str(fifo)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env=dict(os.environ, **store_env),
    )
    os.close(slave)
    drawn = bytearray()

    def drain() -> None:
        while True:
            try:
                got = os.read(master, 4096)
            except OSError:  # the pty closed with the process
                return
            if not got:
                return
            drawn.extend(got)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    got = 0
    with fifo.open("rb") as fp:
        while block := fp.read(1 << 20):
            got += len(block)
            time.sleep(0.25)  # a slow consumer: the pull takes over a second
    assert proc.wait(60) == 0
    reader.join(10)
    os.close(master)
    assert got == size
    text = drawn.decode(errors="replace")
    assert "pull [" in text and "ETA" in text and "%" in text, text
