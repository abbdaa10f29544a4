"""Fail closed at the edges: the CLI's contexts, messages, terminal output and confirmations.

Each test runs the installed ``sealstore`` command (or the API it is a thin
layer over) the way a user would, and checks both the refusal and that
nothing was written or destroyed.
"""

from __future__ import annotations

import json
import os
import pty
import resource
import signal
import stat
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest

from sealstore.errors import AuthenticationError
from sealstore.format import parse_preamble
from sealstore.keys import KeySlot
from sealstore.kms.envelope import open_sealed, seal_file, unseal_file, verify_file
from sealstore.kms.local import LocalKeyring
from sealstore.kms.x25519 import X25519Identity
from tests.conftest import CS, make_keyring
from tests.test_cli import SEALSTORE, fails, ok, run
from tests.test_store import model_dir

ESC = "\x1b]0;owned\x07\x1b[2J"  # retitle the terminal, clear the screen


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    (d / "plain.bin").write_bytes(os.urandom(2 * CS + 99))
    return d


def _seal(work: Path, name: str, *args: str) -> Path:
    out = work / name
    ok(run("encrypt", "--chunk-size", "64K", *args, "-o", out, work / "plain.bin"))
    return out


def _edit(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))


def _with_slots(path: Path, slots: list[KeySlot]) -> None:
    data = path.read_bytes()
    pre = parse_preamble(data)
    path.write_bytes(pre.with_slots(slots) + data[pre.payload_offset :])


# -- a file can be required to carry a context --------------------------------------------


def test_item13_decrypt_context_refuses_a_copied_file(keyring: LocalKeyring, work: Path) -> None:
    a = _seal(work, "a.seal", "-k", "local:", "--context", "artifact=a")
    b = work / "b.seal"
    b.write_bytes(a.read_bytes())  # cp a.seal b.seal
    out = work / "out.bin"
    line = fails(run("decrypt", "--context", "artifact=b", "-o", out, b), 1)
    assert "context" in line and "artifact=b" in line and "artifact=a" in line
    assert not out.exists() and sorted(p.name for p in work.iterdir()) == [
        "a.seal",
        "b.seal",
        "plain.bin",
    ]
    fails(run("decrypt", "--context", "tenant=x", "-o", out, b), 1)  # a key it lacks
    fails(run("decrypt", "--context", "artifact=b", "-o", "-", b), 1)
    fails(run("verify", "--context", "artifact=b", b), 1)
    # The pairs it has pass, on stdout and to a file.
    got = ok(run("decrypt", "--context", "artifact=a", "-o", "-", b)).stdout
    assert got == (work / "plain.bin").read_bytes()
    ok(run("verify", "--context", "artifact=a", a))
    fails(run("decrypt", "--context", "artifact", "-o", out, a), 2)  # not KEY=VALUE


def test_item13_expect_context_in_the_api(keyring: LocalKeyring, work: Path) -> None:
    sealed = work / "s"
    seal_file(work / "plain.bin", sealed, [keyring], context={"artifact": "a", "path": "w"})
    out = work / "out"
    with pytest.raises(AuthenticationError, match="artifact=b"):
        unseal_file(sealed, out, expect_context={"artifact": "b"})
    assert not out.exists()
    with pytest.raises(AuthenticationError):
        verify_file(sealed, expect_context={"path": "x"})
    with pytest.raises(AuthenticationError):
        open_sealed(sealed, expect_context={"other": "a"})
    with open_sealed(sealed, expect_context={"artifact": "a"}) as f:
        assert f.size == (work / "plain.bin").stat().st_size
    assert unseal_file(sealed, out, expect_context={"artifact": "a", "path": "w"}) == f.size


# -- a context changed after sealing is tampering ------------------------------------------


def test_item14_edited_header_context_is_authentication_failure(
    keyring: LocalKeyring, identity: X25519Identity, identity_path: Path, work: Path
) -> None:
    for name, key, extra in (
        ("local.seal", "local:", []),
        ("x.seal", identity.recipient, ["-i", str(identity_path)]),
    ):
        sealed = _seal(work, name, "-k", key, "--context", "tenant=acme")
        _edit(sealed, b'"tenant":"acme"', b'"tenant":"evil"')
        out = work / "out.bin"
        line = fails(run("decrypt", *extra, "-o", out, sealed), 1)  # not 4, "no key"
        assert "context" in line and "changed after sealing" in line
        assert not out.exists()
        fails(run("verify", *extra, sealed), 1)
    # A keyring that is not the slot's still reads as "no key": it cannot tell.
    other = make_keyring(work.parent / "other.json")
    sealed = _seal(work, "o.seal", "-k", f"local:{other.path}")
    other.path.unlink()
    fails(run("decrypt", "-o", work / "o.out", sealed), 4)


# -- the table-driven AES never touches real data ----------------------------------------


def test_item15_native_engine_keeps_aes_on_openssl(
    keyring: LocalKeyring, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives.ciphers import aead as openssl

    from sealstore.chunks import new_aead

    monkeypatch.setenv("SEALSTORE_AEAD", "native")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aes = new_aead("AES-256-GCM", bytes(32))
        chacha = new_aead("CHACHA20-POLY1305", bytes(32))
    assert isinstance(aes, openssl.AESGCM)  # never sealstore.native.aead.AESGCM
    assert type(chacha).__module__ == "sealstore.native.aead"  # constant-time: allowed
    said = [str(w.message) for w in caught]
    assert any("stays on OpenSSL" in m for m in said)
    assert any("ChaCha20-Poly1305 runs on" in m for m in said)
    # Through the CLI: the file opens, and the switch is not silent.
    sealed = _seal(work, "s.seal", "-k", "local:")
    proc = ok(run("decrypt", "-o", "-", sealed, env={"SEALSTORE_AEAD": "native"}))
    assert proc.stdout == (work / "plain.bin").read_bytes()
    assert b"SEALSTORE_AEAD=native" in proc.stderr and b"not constant-time" in proc.stderr


# -- nothing from a file reaches the terminal raw ------------------------------------------


def test_item16_inspect_and_errors_escape_control_characters(
    keyring: LocalKeyring, work: Path
) -> None:
    sealed = work / "s.seal"
    seal_file(work / "plain.bin", sealed, [keyring], context={"note": f"hi{ESC}\x9b\x7f"})
    slot = parse_preamble(sealed.read_bytes()).slots[0]
    evil = KeySlot("x25519", f"x25519:{ESC}\u202egnp.exe", slot.blob)
    _with_slots(sealed, [evil])
    for args in (("inspect", sealed), ("decrypt", "-o", work / "o", sealed)):
        proc = run(*args)
        text = proc.stdout + proc.stderr
        for raw in (b"\x1b", b"\x07", "\u202e".encode(), "\x9b".encode(), b"\x7f"):
            assert raw not in text, (args, text)
    shown = ok(run("inspect", sealed)).stdout.decode()
    assert "\\x1b]0;owned\\x07" in shown and "\\u202e" in shown and "\\x9b" in shown
    line = fails(run("decrypt", "-o", work / "o", sealed), 4)
    assert "\\x1b]0;owned" in line
    # JSON output escapes by itself, and stays exact.
    info = json.loads(ok(run("inspect", "--json", sealed)).stdout)
    assert info["slots"][0]["key_id"] == evil.key_id


def test_item16_warnings_are_escaped(work: Path) -> None:
    # A slot's key id names the keyring file; its path reaches the warning line.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ring = make_keyring(work / "k\x1b[31m.json", insecure_no_passphrase=True)
    sealed = _seal(work, "s.seal", "-k", f"local:{ring.path}")
    proc = ok(run("decrypt", "-o", "-", sealed))
    assert b"\x1b" not in proc.stderr and b"k\\x1b[31m.json is not protected" in proc.stderr


def test_item16_store_listings_escape_what_they_print(store: Any, work: Path) -> None:
    """``show``, ``ls`` and ``verify`` print slot key ids and file names from manifests."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ring = make_keyring(work / f"k{ESC}.json", insecure_no_passphrase=True)
    tree = work / "tree"
    tree.mkdir()
    (tree / f"w{ESC}.bin").write_bytes(b"weights")
    store.push(tree, "m", keys=[f"local:{ring.path}"])
    env = {"SEALSTORE_STORE": store.url}
    for args in (("show", "m"), ("ls", "m"), ("ls",), ("verify", "m"), ("store", "info")):
        proc = run(*args, env=env)
        text = proc.stdout + proc.stderr
        for raw in (b"\x1b", b"\x07"):
            assert raw not in text, (args, text)
    shown = ok(run("show", "m", env=env)).stdout.decode()
    assert "k\\x1b]0;owned\\x07" in shown and "w\\x1b]0;owned" in shown


def test_item16_printable_keeps_text_and_spaces() -> None:
    from sealstore.cli.main import printable

    assert printable("plain text, ü and spaces") == "plain text, ü and spaces"
    assert printable("a\tb\nc\x00d\x85e\u2028") == "a\\x09b\\x0ac\\x00d\\x85e\\u2028"


# -- local: names a keyring, however it is spelt --------------------------------------------


def test_item17_rotate_local_shorthand_rewraps_in_place(
    keyring: LocalKeyring, identity: X25519Identity, identity_path: Path, work: Path
) -> None:
    sealed = _seal(work, "s.seal", "-k", "local:")
    before = parse_preamble(sealed.read_bytes()).slots
    assert [s.key_id for s in before] == [f"local:{keyring.path}"]
    ok(run("keys", "rotate", sealed, "--to", "local:"))
    after = parse_preamble(sealed.read_bytes()).slots
    assert len(after) == 1 and after[0].key_id == before[0].key_id  # re-wrapped, not added
    assert after[0].blob != before[0].blob
    ok(run("keys", "rotate", sealed, "--to", identity.recipient, "--remove", "local:"))
    slots = parse_preamble(sealed.read_bytes()).slots
    assert [s.key_id for s in slots] == [identity.recipient]
    got = ok(run("decrypt", "-i", identity_path, "-o", "-", sealed)).stdout
    assert got == (work / "plain.bin").read_bytes()
    # A path spelt another way names the same keyring too.
    other = _seal(work, "t.seal", "-k", f"local:{keyring.path}")
    spelt = os.path.relpath(keyring.path, work)
    proc = subprocess.run(
        [str(SEALSTORE), "keys", "rotate", "t.seal", "--to", f"local:{spelt}"],
        cwd=work,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(parse_preamble(other.read_bytes()).slots) == 1


# -- messages say what is true ------------------------------------------------------------


def test_item18_usage_error_says_sealstore_once() -> None:
    line = fails(run("encrypt", "x.bin"), 2)  # no -o: a usage error
    assert line.startswith("sealstore: error: encrypt: ") and line.count("sealstore:") == 1
    assert "sealstore encrypt --help" in line
    line = fails(run("keys", "init", "--nope"), 2)
    assert "sealstore: error: sealstore" not in line


def test_item18_inspect_reads_stdin(keyring: LocalKeyring, work: Path) -> None:
    sealed = _seal(work, "s.seal", "-k", "local:", "--context", "a=b")
    from_file = ok(run("inspect", sealed)).stdout
    from_pipe = ok(run("inspect", "-", stdin=sealed.read_bytes())).stdout
    assert from_pipe == from_file and b"a=b" in from_pipe


def test_item18_inspect_separates_a_long_slot_kind(keyring: LocalKeyring, work: Path) -> None:
    sealed = _seal(work, "s.seal", "-k", "local:")
    slot = parse_preamble(sealed.read_bytes()).slots[0]
    uri = "vault-transit://127.0.0.1:8200/transit/bert"
    _with_slots(sealed, [slot, KeySlot("vault-transit", uri, b"vault:v1:abc", {})])
    shown = ok(run("inspect", sealed)).stdout.decode()
    assert "vault-transitvault-transit" not in shown
    assert f"vault-transit  {uri}" in shown


def test_item18_restore_counts_one_version(tmp_path: Path, store: Any) -> None:
    store.push(model_dir(tmp_path, {"w.bin": 100}), "m", keys=["local:"])
    env = {"SEALSTORE_STORE": store.url, "SEALSTORE_BACKUP": f"file://{tmp_path}/bk"}
    made = ok(run("backup", "create", env=env)).stderr.decode()
    assert "1 version," in made and "1 versions" not in made
    listed = ok(run("backup", "list", env=env)).stdout.decode()
    assert "1 version " in listed and "1 versions" not in listed
    restored = ok(run("backup", "restore", env=env)).stderr.decode()
    assert "1 versions" not in restored


def test_item18_push_key_has_help() -> None:
    text = ok(run("push", "--help")).stdout.decode()
    block = text[text.index("-k URI, --key URI") :].split("--dek-from")[0]
    assert "local:" in block and "x25519:" in block


def _fsize_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_item18_full_output_names_the_path(keyring: LocalKeyring, work: Path) -> None:
    sealed = _seal(work, "s.seal", "-k", "local:")
    target = work / "out.bin"
    # The file-size limit stands in for a full disk where no tmpfs can be mounted.
    proc = subprocess.run(
        [str(SEALSTORE), "decrypt", "-o", str(target), str(sealed)],
        capture_output=True,
        preexec_fn=_fsize_limit,  # sets only the child's limit
        env=dict(os.environ),
        check=False,
    )
    line = fails(proc, 5)
    assert str(target) in line and "too large" in line.lower()
    assert not target.exists() and sorted(p.name for p in work.iterdir()) == [
        "plain.bin",
        "s.seal",
    ]


def test_item18_full_disk_names_the_path(keyring: LocalKeyring, work: Path) -> None:
    mnt = work.parent / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)]).returncode
    ):
        pytest.skip("mounting a tmpfs needs root")
    try:
        sealed = _seal(work, "s.seal", "-k", "local:")
        for out, args in (
            (mnt / "out.bin", ["decrypt", sealed]),
            (mnt / "x.seal", ["encrypt", "-k", "local:", work / "plain.bin"]),
        ):
            line = fails(run(*args, "-o", out), 5)
            assert f"{out}: No space left on device" in line, line
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_item18_missing_keyring_is_named(work: Path, tmp_path: Path) -> None:
    ring = make_keyring(tmp_path / "away" / "ring.json")
    sealed = _seal(work, "s.seal", "-k", f"local:{ring.path}")
    ring.path.unlink()
    line = fails(run("decrypt", "-o", work / "o", sealed), 4)
    assert f"keyring {ring.path}" in line and "does not exist" in line
    assert "no identity or key provider" not in line


def test_item18_wrong_identity_says_which_was_tried(
    identity: X25519Identity, tmp_path: Path, work: Path
) -> None:
    sealed = _seal(work, "s.seal", "-k", identity.recipient)
    wrong = tmp_path / "wrong.txt"
    ok(run("keys", "init", "--identity", wrong))
    line = fails(run("decrypt", "-i", wrong, "-o", work / "o", sealed), 4)
    assert "pass -i" not in line and str(wrong) in line
    assert "pass -i" in fails(run("decrypt", "-o", work / "o", sealed), 4)  # none given: ask


# -- irreversible things ask first ---------------------------------------------------------


@pytest.fixture
def pushed(store: Any, tmp_path: Path) -> dict[str, str]:
    store.push(model_dir(tmp_path, {"w.bin": 100}), "m", keys=["local:"])
    return {"SEALSTORE_STORE": store.url}


def _shredded(env: dict[str, str]) -> bool:
    return "SHREDDED" in ok(run("ls", "m", env=env)).stdout.decode()


def test_item19_rm_refuses_without_a_terminal_or_yes(pushed: dict[str, str]) -> None:
    assert "cannot be undone" in " ".join(ok(run("rm", "--help")).stdout.decode().split())
    assert "(irreversible)" in ok(run("--help")).stdout.decode()
    line = fails(run("rm", "m:1", env=pushed), 2)
    assert "--yes" in line and "m:1" in line
    assert not _shredded(pushed)
    ok(run("rm", "m:1", "--yes", env=pushed))
    assert _shredded(pushed)


def test_item19_rm_of_known_good_says_the_tag_goes(pushed: dict[str, str]) -> None:
    ok(run("tag", "m:1", "known-good", env=pushed))
    line = fails(run("rm", "m:1", env=pushed), 2)
    assert "known-good" in line
    said = ok(run("rm", "m:1", "--yes", env=pushed)).stderr.decode()
    assert "known-good" in said


def _rm_on_a_terminal(env: dict[str, str], answer: bytes) -> subprocess.CompletedProcess[bytes]:
    master, slave = pty.openpty()
    try:
        os.write(master, answer)
        return subprocess.run(
            [str(SEALSTORE), "rm", "m:1"],
            stdin=slave,
            capture_output=True,
            env=dict(os.environ, **env),
            timeout=60,
            check=False,
        )
    finally:
        os.close(slave)
        os.close(master)


def test_item19_rm_asks_on_a_terminal(pushed: dict[str, str]) -> None:
    proc = _rm_on_a_terminal(pushed, b"no\n")
    assert proc.returncode == 2 and b"cannot be undone" in proc.stderr
    assert not _shredded(pushed)
    proc = _rm_on_a_terminal(pushed, b"yes\n")
    assert proc.returncode == 0, proc.stderr
    assert _shredded(pushed)


def test_item19_keys_init_force_keeps_a_backup(sealstore_env: Path, tmp_path: Path) -> None:
    ring = sealstore_env / "keyring.json"
    ok(run("keys", "init", "--insecure-no-passphrase"))
    old = ring.read_bytes()
    said = ok(run("keys", "init", "--insecure-no-passphrase", "--force")).stderr.decode()
    [backup] = sealstore_env.glob("keyring.json.*.bak")
    assert backup.read_bytes() == old and ring.read_bytes() != old
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600 and str(backup) in said
    ok(run("keys", "init", "--insecure-no-passphrase", "--force"))
    assert len(list(sealstore_env.glob("keyring.json.*.bak"))) == 2  # never overwritten
    ident = tmp_path / "id.txt"
    ok(run("keys", "init", "--identity", ident))
    first = ident.read_bytes()
    ok(run("keys", "init", "--identity", ident, "--force"))
    [kept] = tmp_path.glob("id.txt.*.bak")
    assert kept.read_bytes() == first


# -- records of a stream that does not verify are marked ------------------------------------


def test_item20_audit_show_marks_records_of_a_broken_stream(store: Any, tmp_path: Path) -> None:
    env = {"SEALSTORE_STORE": store.url}
    src = model_dir(tmp_path, {"w.bin": 10})
    store.push(src, "a", keys=["local:"])
    store.push(src, "b", keys=["local:"])
    clean = ok(run("audit", "show", env=env))
    assert b"UNVERIFIED" not in clean.stdout and clean.stderr == b""
    [folder] = (Path(store.url.removeprefix("file://")) / "audit").iterdir()
    first = sorted(folder.glob("*.jsonl"))[0]
    rec, cp = first.read_bytes().splitlines()
    forged = dict(json.loads(rec), who=f"nobody{ESC}")
    first.write_bytes(json.dumps(forged).encode() + b"\n" + cp + b"\n")
    proc = ok(run("audit", "show", env=env))
    rows = proc.stdout.decode().splitlines()
    assert rows and all(r.startswith("UNVERIFIED ") for r in rows), rows
    assert b"\x1b" not in proc.stdout and "by nobody\\x1b" in rows[0]
    assert b"do not verify" in proc.stderr
