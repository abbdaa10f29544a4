"""The installed ``sealstore`` command as a subprocess: outputs, exit codes, one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
import traceback
import warnings
from pathlib import Path

import pytest

from sealstore.format import MAGIC, canonical_json, parse_preamble
from sealstore.kms.local import LocalKeyring
from tests.conftest import CS, PASSPHRASE, listing, make_keyring


def _find_command() -> Path:
    beside = Path(sys.executable).parent / "sealstore"
    if beside.exists():
        return beside
    found = shutil.which("sealstore")
    return Path(found) if found else beside


SEALSTORE = _find_command()
DATA = os.urandom(3 * CS + 1234)


def run(
    *args: str | os.PathLike[str],
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[bytes]:
    """Run the console script with this test's environment (its SEALSTORE_HOME)."""
    environ = dict(os.environ, **(env or {}))
    for name in drop:
        environ.pop(name, None)
    return subprocess.run(
        [str(SEALSTORE), *map(str, args)],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        env=environ,
        timeout=60,
        check=False,
    )


class _Pipe(io.BytesIO):
    """What a command writes, kept when its text stream is closed or collected."""

    def close(self) -> None:
        pass


def in_process(
    *args: str | os.PathLike[str],
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[bytes]:
    """:func:`run`'s answer from ``cli.main.main`` in this process (no interpreter start-up).

    For tests of what a command does, not of the process boundary: each call
    gets the environment, standard streams (bytes, as a pipe gives them),
    root logger and keyring cache a fresh process would, all put back after.
    Exit codes are main's return value, argparse's ``SystemExit``, or 1 and a
    traceback for an exception that escapes (as the interpreter would do).
    Signals, a closed pipe or a terminal are what :func:`run` is for.
    """
    from cli.main import main

    # One process-wide set of streams, environment and signal handlers: main thread only.
    assert threading.current_thread() is threading.main_thread(), "in_process off the main thread"
    argv = [str(a) for a in args]
    out, err = _Pipe(), _Pipe()
    streams = (sys.stdin, sys.stdout, sys.stderr)
    saved_env = dict(os.environ)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    os.environ.update(env or {})
    for name in drop:
        os.environ.pop(name, None)
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin or b""), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    sys.stderr = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    root.handlers = []  # pytest's capture would keep logging.basicConfig from installing main's
    LocalKeyring._cache.clear()  # a new process starts with none
    try:
        try:
            with warnings.catch_warnings():  # main's filters are its process's, not the suite's
                code = main(argv)
        except SystemExit as exc:
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            code = 1 if isinstance(exc.code, str) else int(exc.code or 0)
        except BaseException:  # what the interpreter would print, and exit 1
            traceback.print_exc()
            code = 1
        with contextlib.suppress(ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        for h in root.handlers:
            h.close()
        root.handlers, root.level = handlers, level
        logging.captureWarnings(False)
        sys.stdin, sys.stdout, sys.stderr = streams
        os.environ.clear()
        os.environ.update(saved_env)
        LocalKeyring._cache.clear()
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def ok(proc: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr
    return proc


def fails(proc: subprocess.CompletedProcess[bytes], code: int) -> str:
    """Assert exit *code* and exactly one ``sealstore: error:`` line on stderr; return it."""
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    assert proc.returncode == code, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sealstore: error: "), err
    return lines[0]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    (d / "plain.bin").write_bytes(DATA)
    return d


@pytest.fixture
def ring(keyring_path: Path) -> LocalKeyring:
    """The default keyring of this test's SEALSTORE_HOME, with cheap Argon2id."""
    return make_keyring(keyring_path)


@pytest.fixture
def sealed(ring: LocalKeyring, work: Path) -> Path:
    ok(
        run(
            "encrypt", "-k", "local:", "--chunk-size", "64KiB", "-o", work / "s", work / "plain.bin"
        )
    )
    return work / "s"


def tamper(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


# -- the command ----------------------------------------------------------------------


def test_console_script_is_installed() -> None:
    assert SEALSTORE.exists(), "the sealstore console script is not installed"
    assert os.access(SEALSTORE, os.X_OK)
    proc = ok(run("--version"))
    assert proc.stdout.decode().startswith("sealstore ")


def test_help_lists_exit_codes() -> None:
    out = ok(run("--help")).stdout.decode()
    assert "Exit codes" in out
    for command in ("encrypt", "decrypt", "inspect", "verify", "keys"):
        assert command in out


# -- keys -----------------------------------------------------------------------------


def test_keys_init_list(sealstore_env: Path) -> None:
    proc = ok(run("keys", "init"))
    path = sealstore_env / "keyring.json"
    assert proc.stdout.decode().strip() == f"local:{path}"
    assert "created keyring" in proc.stderr.decode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PASSPHRASE not in path.read_text()

    listed = ok(run("keys", "list", drop=("SEALSTORE_PASSPHRASE",))).stdout.decode()
    ring_id = json.loads(path.read_text())["id"]
    assert ring_id in listed and "argon2id" in listed and "k1" in listed
    info = json.loads(ok(run("keys", "list", "--json", drop=("SEALSTORE_PASSPHRASE",))).stdout)
    assert info["id"] == ring_id and info["protected"] is True and info["current"] == "k1"

    fails(run("keys", "init"), 5)  # exists
    ok(run("keys", "init", "--force"))
    assert json.loads(path.read_text())["id"] != ring_id


def test_keys_init_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ring.json"
    assert ok(run("keys", "init", "--keyring", path)).stdout.decode().strip() == f"local:{path}"
    info = json.loads(ok(run("keys", "list", "--keyring", path, "--json")).stdout)
    assert info["path"] == str(path)
    env_ring = tmp_path / "env.json"
    ok(run("keys", "init", env={"SEALSTORE_KEYRING": str(env_ring)}))
    assert env_ring.exists()


def test_keys_init_needs_a_passphrase(sealstore_env: Path) -> None:
    line = fails(run("keys", "init", drop=("SEALSTORE_PASSPHRASE",)), 4)
    assert "SEALSTORE_PASSPHRASE" in line
    assert not (sealstore_env / "keyring.json").exists()


def test_keys_init_insecure(sealstore_env: Path, work: Path) -> None:
    proc = ok(run("keys", "init", "--insecure-no-passphrase", drop=("SEALSTORE_PASSPHRASE",)))
    warnings = [line for line in proc.stderr.decode().splitlines() if "warning" in line]
    assert len(warnings) == 1 and "not protected" in warnings[0]
    assert "NO" in ok(run("keys", "list")).stdout.decode()
    ok(
        run(
            "encrypt",
            "-k",
            "local:",
            "-o",
            work / "s",
            work / "plain.bin",
            drop=("SEALSTORE_PASSPHRASE",),
        )
    )
    proc = ok(run("decrypt", "-o", work / "out", work / "s", drop=("SEALSTORE_PASSPHRASE",)))
    assert "not protected" in proc.stderr.decode()
    assert (work / "out").read_bytes() == DATA


def test_keys_list_missing(sealstore_env: Path) -> None:
    line = fails(run("keys", "list"), 5)
    assert "keys init" in line


def test_keys_init_identity(tmp_path: Path, ring: LocalKeyring) -> None:
    ident = tmp_path / "backup.key"
    proc = ok(run("keys", "init", "--identity", ident))
    recipient = proc.stdout.decode().strip()
    assert recipient.startswith("hpke:x25519:")  # new identities are HPKE
    assert stat.S_IMODE(ident.stat().st_mode) == 0o600
    assert ok(run("keys", "recipient", ident)).stdout.decode().strip() == recipient
    fails(run("keys", "init", "--identity", ident), 5)
    second = ok(run("keys", "init", "--identity", ident, "--force")).stdout.decode().strip()
    assert second != recipient
    fails(run("keys", "recipient", ring.path), 2)  # a keyring, not an identity
    fails(run("keys", "recipient", tmp_path / "missing.key"), 5)
    (tmp_path / "junk.key").write_text("hello\n")
    fails(run("keys", "recipient", tmp_path / "junk.key"), 3)


# -- encrypt / decrypt ----------------------------------------------------------------


def test_encrypt_decrypt_local(ring: LocalKeyring, work: Path) -> None:
    proc = ok(run("encrypt", "-k", "local:", "-o", work / "s", work / "plain.bin"))
    assert proc.stdout == b""
    assert "sealed" in proc.stderr.decode()
    pre = parse_preamble((work / "s").read_bytes())
    assert [s.key_id for s in pre.slots] == [ring.key_id]
    assert pre.header.plaintext_size == len(DATA)
    assert pre.header.chunk_size == 1024 * 1024  # the default

    ok(run("decrypt", "-o", work / "out1", work / "s"))
    assert (work / "out1").read_bytes() == DATA
    ok(run("decrypt", "-i", ring.path, "-o", work / "out2", work / "s", "-t", "1"))
    assert (work / "out2").read_bytes() == DATA
    assert stat.S_IMODE((work / "out1").stat().st_mode) == 0o600
    assert listing(work) == ["out1", "out2", "plain.bin", "s"]


def test_encrypt_with_named_keyring(tmp_path: Path, work: Path) -> None:
    ring = make_keyring(tmp_path / "named.json")
    ok(run("encrypt", "-k", f"local:{ring.path}", "-o", work / "s", work / "plain.bin"))
    ok(run("decrypt", "-o", work / "out", work / "s"))  # the slot names the keyring
    assert (work / "out").read_bytes() == DATA


def test_encrypt_decrypt_x25519(tmp_path: Path, work: Path) -> None:
    ident = tmp_path / "id.key"
    recipient = ok(run("keys", "init", "--identity", ident)).stdout.decode().strip()
    # Wrapping to a recipient needs no passphrase and no keyring.
    ok(
        run(
            "encrypt",
            "-k",
            recipient,
            "-o",
            work / "s",
            work / "plain.bin",
            drop=("SEALSTORE_PASSPHRASE",),
        )
    )
    line = fails(run("decrypt", "-o", work / "out", work / "s"), 4)
    assert recipient in line and "identity" in line
    assert not (work / "out").exists()
    ok(run("decrypt", "-i", ident, "-o", work / "out", work / "s", drop=("SEALSTORE_PASSPHRASE",)))
    assert (work / "out").read_bytes() == DATA
    other = tmp_path / "other.key"
    ok(run("keys", "init", "--identity", other))
    fails(run("decrypt", "-i", other, "-o", work / "out2", work / "s"), 4)
    fails(run("decrypt", "-i", tmp_path / "missing.key", "-o", work / "out2", work / "s"), 5)
    assert not (work / "out2").exists()


def test_two_slots(ring: LocalKeyring, tmp_path: Path, work: Path) -> None:
    ident = tmp_path / "id.key"
    recipient = ok(run("keys", "init", "--identity", ident)).stdout.decode().strip()
    ok(run("encrypt", "-k", "local:", "-k", recipient, "-o", work / "s", work / "plain.bin"))
    info = json.loads(ok(run("inspect", "--json", work / "s")).stdout)
    assert [(s["kind"], s["key_id"]) for s in info["slots"]] == [
        ("local", ring.key_id),
        ("hpke", recipient),
    ]
    # Either key opens it: the identity alone, with the keyring gone.
    ring.path.unlink()
    ok(run("decrypt", "-i", ident, "-o", work / "out", work / "s"))
    assert (work / "out").read_bytes() == DATA
    line = fails(run("decrypt", "-o", work / "out2", work / "s"), 4)
    assert "slot 0" in line and "slot 1" in line


def test_context_suite_and_chunk_size(ring: LocalKeyring, work: Path) -> None:
    ok(
        run(
            "encrypt",
            "-k",
            "local:",
            "--context",
            "tenant=acme",
            "--context",
            "model=llama=3",
            "--suite",
            "CHACHA20-POLY1305",
            "--chunk-size",
            "64KiB",
            "-o",
            work / "s",
            work / "plain.bin",
        )
    )
    info = json.loads(ok(run("inspect", "--json", work / "s")).stdout)
    assert info["context"] == {"tenant": "acme", "model": "llama=3"}
    assert info["suite"] == "CHACHA20-POLY1305"
    assert info["chunk_size"] == CS
    assert info["chunk_count"] == 4
    ok(run("decrypt", "-o", work / "out", work / "s"))
    assert (work / "out").read_bytes() == DATA
    for size, chunk in (("65536", CS), ("128K", 2 * CS), ("1MiB", 2**20)):
        ok(
            run(
                "encrypt",
                "-k",
                "local:",
                "--chunk-size",
                size,
                "-o",
                work / "c",
                work / "plain.bin",
            )
        )
        assert parse_preamble((work / "c").read_bytes()).header.chunk_size == chunk


@pytest.mark.parametrize("threads", ["1", "3"])
def test_pipes(ring: LocalKeyring, work: Path, threads: str) -> None:
    enc = ok(
        run(
            "encrypt",
            "-k",
            "local:",
            "--chunk-size",
            "64K",
            "-t",
            threads,
            "-o",
            "-",
            "-",
            stdin=DATA,
        )
    )
    assert enc.stdout.startswith(MAGIC)
    assert parse_preamble(enc.stdout).header.plaintext_size is None  # unknown on a pipe
    dec = ok(run("decrypt", "-t", threads, "-o", "-", "-", stdin=enc.stdout))
    assert dec.stdout == DATA
    # Mixed: file to stdout, stdin to file.
    enc2 = ok(run("encrypt", "-k", "local:", "-o", "-", work / "plain.bin"))
    ok(run("decrypt", "-o", work / "out", "-", stdin=enc2.stdout))
    assert (work / "out").read_bytes() == DATA
    (work / "s").write_bytes(enc.stdout)
    assert ok(run("decrypt", "-o", "-", work / "s")).stdout == DATA
    ok(run("verify", "-", stdin=enc.stdout))
    assert listing(work) == ["out", "plain.bin", "s"]


def test_empty_input(ring: LocalKeyring, work: Path) -> None:
    (work / "empty").write_bytes(b"")
    ok(run("encrypt", "-k", "local:", "-o", work / "s", work / "empty"))
    ok(run("decrypt", "-o", work / "out", work / "s"))
    assert (work / "out").read_bytes() == b""
    assert ok(run("decrypt", "-o", "-", "-", stdin=(work / "s").read_bytes())).stdout == b""


def test_quiet(ring: LocalKeyring, work: Path, sealed: Path) -> None:
    proc = ok(run("-q", "decrypt", "-o", work / "out", sealed))
    assert proc.stderr == b""
    proc = ok(run("-q", "verify", sealed))
    assert proc.stderr == b""


# -- inspect and verify ---------------------------------------------------------------


def test_inspect_needs_no_key(ring: LocalKeyring, sealed: Path) -> None:
    ring.path.unlink()
    proc = ok(run("inspect", sealed, drop=("SEALSTORE_PASSPHRASE",)))
    text = proc.stdout.decode()
    for expected in ("sealstore v1", "AES-256-GCM", "64.0 KiB", f"{len(DATA)} bytes", "slot 0"):
        assert expected in text
    assert ring.key_id in text
    info = json.loads(ok(run("inspect", "--json", sealed, drop=("SEALSTORE_PASSPHRASE",))).stdout)
    assert info["version"] == 1
    assert info["plaintext_size"] == info["declared_plaintext_size"] == len(DATA)
    assert info["chunk_count"] == 4
    assert info["file_size"] == sealed.stat().st_size
    assert info["slots_detached"] is False
    assert info["slots"] == [
        {"kind": "local", "key_id": ring.key_id, "keyring": ring.id, "kek": "k1"}
    ]


def test_inspect_impossible_length(sealed: Path) -> None:
    sealed.write_bytes(sealed.read_bytes()[:-5])
    proc = run("inspect", sealed)
    assert proc.returncode == 1
    assert "warning" in proc.stdout.decode()
    info = json.loads(run("inspect", "--json", sealed).stdout)
    assert "layout_error" in info and "chunk_count" not in info


def test_verify(sealed: Path) -> None:
    proc = ok(run("verify", sealed))
    assert f"{sealed}: OK" in proc.stderr.decode()
    ok(run("verify", "-t", "3", sealed))


@pytest.mark.parametrize("where", ["header", "first", "last", "truncate", "extend"])
def test_verify_tampered(sealed: Path, where: str) -> None:
    po = parse_preamble(sealed.read_bytes()).payload_offset
    if where == "header":
        # Still a valid header, but not the bytes that were authenticated.
        data = sealed.read_bytes()
        hbytes = parse_preamble(data).header_bytes
        spaced = hbytes.replace(b'"context":{}', b'"context":{ }')
        assert spaced != hbytes
        rest = data[len(MAGIC) + 4 + len(hbytes) :]
        sealed.write_bytes(MAGIC + struct.pack("<I", len(spaced)) + spaced + rest)
    elif where == "first":
        tamper(sealed, po + 1)
    elif where == "last":
        tamper(sealed, sealed.stat().st_size - 20)
    elif where == "truncate":
        sealed.write_bytes(sealed.read_bytes()[:-1])
    else:
        sealed.write_bytes(sealed.read_bytes() + b"\x00")
    proc = run("verify", sealed)
    fails(proc, 1)
    assert "OK" not in proc.stderr.decode()


# -- errors and exit codes ------------------------------------------------------------


def test_tampered_decrypt_leaves_no_output(sealed: Path, work: Path) -> None:
    tamper(sealed, sealed.stat().st_size - 100)  # in the last chunk
    before = listing(work)
    fails(run("decrypt", "-o", work / "out", sealed), 1)
    assert listing(work) == before  # no output, no temporary file
    (work / "out").write_bytes(b"keep me")
    fails(run("decrypt", "-o", work / "out", sealed, "-t", "3"), 1)
    assert (work / "out").read_bytes() == b"keep me"
    proc = run("decrypt", "-o", "-", "-", stdin=sealed.read_bytes())
    fails(proc, 1)


def test_not_a_sealed_file(ring: LocalKeyring, work: Path) -> None:
    plain = work / "plain.bin"
    for args in (("decrypt", "-o", work / "out", plain), ("verify", plain), ("inspect", plain)):
        assert "not a sealed file" in fails(run(*args), 3)
    fails(run("decrypt", "-o", "-", "-", stdin=b""), 3)
    proc = run("inspect", "--json", plain)  # with --json the error is a JSON object
    assert proc.returncode == 3
    assert json.loads(proc.stderr)["error"]["type"] == "FormatError"
    assert not (work / "out").exists()


def test_unsupported_version(sealed: Path) -> None:
    pre = parse_preamble(sealed.read_bytes())
    obj = json.loads(pre.header_bytes)
    obj["v"] = 2
    hbytes = canonical_json(obj)
    data = sealed.read_bytes()
    rest = data[len(MAGIC) + 4 + len(pre.header_bytes) :]
    sealed.write_bytes(MAGIC + struct.pack("<I", len(hbytes)) + hbytes + rest)
    assert "version 2" in fails(run("inspect", sealed), 3)
    fails(run("decrypt", "-o", sealed.with_name("out"), sealed), 3)


def test_missing_input(ring: LocalKeyring, work: Path) -> None:
    missing = work / "missing.bin"
    assert "missing.bin" in fails(run("encrypt", "-k", "local:", "-o", work / "s", missing), 5)
    fails(run("decrypt", "-o", work / "out", missing), 5)
    fails(run("verify", missing), 5)
    fails(run("inspect", missing), 5)
    assert listing(work) == ["plain.bin"]


def test_missing_keyring_for_encrypt(work: Path) -> None:
    line = fails(run("encrypt", "-k", "local:", "-o", work / "s", work / "plain.bin"), 5)
    assert "keys init" in line
    assert listing(work) == ["plain.bin"]


def test_no_key(ring: LocalKeyring, sealed: Path, work: Path) -> None:
    before = listing(work)
    line = fails(
        run("decrypt", "-o", work / "out", sealed, env={"SEALSTORE_PASSPHRASE": "wrong"}), 4
    )
    assert "wrong passphrase" in line and "wrong" + "wrong" not in line
    fails(run("decrypt", "-o", work / "out", sealed, drop=("SEALSTORE_PASSPHRASE",)), 4)
    fails(run("verify", sealed, env={"SEALSTORE_PASSPHRASE": "wrong"}), 4)
    fails(
        run(
            "encrypt",
            "-k",
            "local:",
            "-o",
            work / "s2",
            work / "plain.bin",
            drop=("SEALSTORE_PASSPHRASE",),
        ),
        4,
    )
    ring.path.unlink()
    fails(run("decrypt", "-o", work / "out", sealed), 4)
    assert listing(work) == before


@pytest.mark.parametrize("size", ["100KiB", "32KiB", "128MiB", "0", "65537"])
def test_bad_chunk_size(ring: LocalKeyring, work: Path, size: str) -> None:
    line = fails(
        run("encrypt", "-k", "local:", "--chunk-size", size, "-o", work / "s", work / "plain.bin"),
        2,
    )
    assert "chunk" in line
    assert listing(work) == ["plain.bin"]


def test_unparseable_chunk_size_is_one_line(ring: LocalKeyring, work: Path) -> None:
    # docs/CLI.md: "Every command prints one clear line on stderr when it fails".
    fails(
        run(
            "encrypt", "-k", "local:", "--chunk-size", "lots", "-o", work / "s", work / "plain.bin"
        ),
        2,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("-k", "nope:thing"), "unknown key provider scheme"),
        (("-k", "x25519:abc"), "x25519"),
        (("-k", "local:", "--context", "novalue"), "KEY=VALUE"),
        (("-k", "local:", "--context", "=v"), "KEY=VALUE"),
    ],
)
def test_usage_errors(ring: LocalKeyring, work: Path, args: tuple[str, ...], needle: str) -> None:
    line = fails(run("encrypt", *args, "-o", work / "s", work / "plain.bin"), 2)
    assert needle in line
    assert listing(work) == ["plain.bin"]


def test_low_order_recipient(work: Path) -> None:
    # An all-zero X25519 key parses as base64url but libsodium refuses to seal to it.
    fails(run("encrypt", "-k", "x25519:" + "A" * 43, "-o", work / "s", work / "plain.bin"), 2)
    assert listing(work) == ["plain.bin"]


def test_same_input_and_output(ring: LocalKeyring, work: Path) -> None:
    fails(run("encrypt", "-k", "local:", "-o", work / "plain.bin", work / "plain.bin"), 2)
    assert (work / "plain.bin").read_bytes() == DATA


def test_damaged_keyring_is_one_line(ring: LocalKeyring, sealed: Path, work: Path) -> None:
    doc = json.loads(ring.path.read_text())
    doc["kdf"] = "argon2id"
    ring.path.write_text(json.dumps(doc))
    # The slot's keyring cannot be used: no key (4), and the line says why.
    line = fails(run("decrypt", "-o", work / "out", sealed), 4)
    assert "damaged" in line
