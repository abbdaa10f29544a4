"""Fail closed on the file system: what ``-o`` does with things that are not regular
files, what SIGTERM / SIGHUP / SIGKILL leave behind, ``-`` for pull and push, and
pull into a folder that already has files. The installed command, as a subprocess.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sealstore.kms.local import LocalKeyring
from tests.conftest import CS

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import SEALSTORE, fails, ok
from tests.test_cli import in_process as run
from tests.test_cli import run as run_process
from tests.test_store import model_dir, same_tree

DATA = os.urandom(6 * CS + 99)


@pytest.fixture
def sealed(ring: LocalKeyring, tmp_path: Path) -> Path:
    (tmp_path / "plain.bin").write_bytes(DATA)
    out = tmp_path / "f.seal"
    ok(run("encrypt", "-k", "local:", "--chunk-size", "64KiB", "-o", out, tmp_path / "plain.bin"))
    return out


@pytest.fixture
def store_env(ring: LocalKeyring, tmp_path: Path) -> dict[str, str]:
    url = f"file://{tmp_path}/store"
    ok(run("store", "init", url))
    return {"SEALSTORE_STORE": url}


def run_in(cwd: Path, *args: str | os.PathLike[str], **kw: object) -> subprocess.CompletedProcess:
    """``run``, from the folder *cwd* (where a ``-`` folder would appear)."""
    env = dict(os.environ, **kw.get("env", {}))  # type: ignore[arg-type]
    return subprocess.run(
        [str(SEALSTORE), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
    )


def char_device(path: Path) -> Path:
    """A character device like /dev/null (1, 3), made in the test's own folder."""
    os.mknod(path, 0o640 | stat.S_IFCHR, os.makedev(1, 3))
    return path


def read_fifo(path: Path) -> tuple[threading.Thread, list[bytes]]:
    """A reader that drains the FIFO *path* on a thread; its bytes land in the list."""
    got: list[bytes] = []

    def drain() -> None:
        with open(path, "rb") as fp:
            got.append(fp.read())

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    return t, got


def spawn(
    *args: str | os.PathLike[str], env: dict[str, str] | None = None, hangup: bool = True
) -> subprocess.Popen:
    """The installed command as a background process, its output piped.

    *hangup*: whether the command starts with SIGHUP at its default, as a
    terminal or a supervisor starts it. The test run's own disposition is
    not inherited: under ``nohup`` (as CI may run) SIGHUP arrives ignored,
    and an ignored SIGHUP stays ignored (``test_item02_nohup_keeps_sighup_ignored``).
    """
    disposition = signal.SIG_DFL if hangup else signal.SIG_IGN
    return subprocess.Popen(
        [str(SEALSTORE), *map(str, args)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, disposition),
    )


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """Poll *cond* until true; fail if *proc* ends first (it was meant to be stopped)."""
    deadline = time.monotonic() + 60
    while not cond():
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"the command ended (rc {proc.returncode}) before {what}: {err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def writes_into(pid: int, folder: Path, besides: Path) -> bool:
    """Whether process *pid* has a file of *folder* other than *besides* open.

    Named or ``O_TMPFILE`` alike: /proc shows the latter as ``FOLDER/#INODE (deleted)``.
    """
    fds = Path(f"/proc/{pid}/fd")
    try:
        links = [os.readlink(fds / n) for n in os.listdir(fds)]
    except OSError:
        return False
    return any(link.startswith(f"{folder}/") and link != str(besides) for link in links)


# -- -o onto something that is not a regular file ---------------------------------


def test_item01_decrypt_into_a_char_device_writes_through(sealed: Path, tmp_path: Path) -> None:
    dev = char_device(tmp_path / "null")
    ok(run("decrypt", "-o", dev, sealed))
    assert stat.S_ISCHR(dev.lstat().st_mode), "the device was replaced by a regular file"
    assert stat.S_IMODE(dev.lstat().st_mode) == 0o640  # and its mode left alone
    ok(run("encrypt", "-k", "local:", "-o", dev, tmp_path / "plain.bin"))
    assert stat.S_ISCHR(dev.lstat().st_mode)


def test_item01_decrypt_into_a_fifo_and_a_process_substitution(
    sealed: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    t, got = read_fifo(fifo)
    ok(run("decrypt", "-o", fifo, sealed))
    t.join(30)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert got == [DATA]
    # bash's >(cmd) is a /dev/fd/63 path: the plaintext reaches the command.
    out = tmp_path / "sum"
    script = f'"{SEALSTORE}" decrypt -o >(sha256sum > "{out}") "{sealed}"; echo rc=$?; wait'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, timeout=60, check=False)
    assert b"rc=0" in proc.stdout, proc.stderr.decode()
    deadline = time.monotonic() + 30
    while not (out.exists() and out.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.read_text().split()[0] == hashlib.sha256(DATA).hexdigest()


def test_item01_symlinks_are_followed_or_refused_never_replaced(
    sealed: Path, tmp_path: Path
) -> None:
    # A link to /proc/self/fd/1 (what /dev/stdout is): the plaintext goes to stdout.
    to_stdout = tmp_path / "stdout-link"
    to_stdout.symlink_to("/proc/self/fd/1")
    proc = ok(run_process("decrypt", "-o", to_stdout, sealed))  # the process's own fd 1
    assert proc.stdout == DATA
    assert to_stdout.is_symlink()
    # A link to a regular file: the target is replaced, the link kept.
    target = tmp_path / "target.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link"
    link.symlink_to(target)
    ok(run("decrypt", "-o", link, sealed))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == DATA
    # A link to a device: written through; link and device stay what they were.
    dev = char_device(tmp_path / "null")
    to_dev = tmp_path / "dev-link"
    to_dev.symlink_to(dev)
    ok(run("decrypt", "-o", to_dev, sealed))
    assert to_dev.is_symlink() and stat.S_ISCHR(dev.lstat().st_mode)
    # A link to nothing: refused; nothing created at either end.
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert "symlink" in fails(run("decrypt", "-o", dangling, sealed), 5)
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def test_item01_dev_stdout_keeps_the_shells_append_and_position(
    sealed: Path, tmp_path: Path
) -> None:
    """``-o /dev/stdout >> log`` appends; ``{ echo head; ... -o /dev/stdout; } > out``
    keeps the head: the command writes through its own descriptor, never reopens
    the file behind it with O_TRUNC."""
    log = tmp_path / "log"
    log.write_bytes(b"keep-me\n")
    cmd = f"'{SEALSTORE}' -q decrypt -o /dev/stdout '{sealed}' >> '{log}'"
    subprocess.run(["bash", "-c", cmd], check=True, timeout=60, stdin=subprocess.DEVNULL)
    assert log.read_bytes() == b"keep-me\n" + DATA
    out = tmp_path / "out"
    cmd = f"{{ echo head; '{SEALSTORE}' -q decrypt -o /dev/fd/1 '{sealed}'; }} > '{out}'"
    subprocess.run(["bash", "-c", cmd], check=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.read_bytes() == b"head\n" + DATA


def test_item01_identity_file_is_never_written_through_a_device(tmp_path: Path) -> None:
    """An identity is a secret: ``keys init --identity`` writes a regular file or refuses."""
    dev = char_device(tmp_path / "null")
    link = tmp_path / "id.key"
    link.symlink_to(dev)
    r = run("keys", "init", "--identity", link)
    fails(r, 5)
    r = run("keys", "init", "--identity", link, "--force")
    assert "not a regular file" in fails(r, 2)
    assert link.is_symlink() and stat.S_ISCHR(dev.lstat().st_mode)
    # A link to a regular identity is followed and its target replaced; the link stays.
    real = tmp_path / "real.key"
    ok(run("keys", "init", "--identity", real))
    before = real.read_bytes()
    link.unlink()
    link.symlink_to(real)
    ok(run("keys", "init", "--identity", link, "--force"))
    assert link.is_symlink() and real.read_bytes() != before
    assert stat.S_IMODE(real.stat().st_mode) == 0o600


def test_item01_pull_bom_and_audit_export_write_through_a_device(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    src = model_dir(tmp_path, {"w.bin": 3 * CS, "cfg.json": 100})
    ok(run("push", src, "m", "-k", "local:", env=store_env))
    dev = char_device(tmp_path / "null")
    ok(run("pull", "m", "--file", "w.bin", "-o", dev, env=store_env))
    ok(run("bom", "export", "m", "-o", dev, env=store_env))
    ok(run("audit", "export", "-o", dev, env=store_env))
    assert stat.S_ISCHR(dev.lstat().st_mode)
    # A whole version needs a folder: a device is refused before anything is decrypted.
    assert "needs a folder" in fails(run("pull", "m", "-o", dev, env=store_env), 2)
    # audit export -o - is standard output, not a file named "-".
    proc = run_in(tmp_path, "audit", "export", "-o", "-", env=store_env)
    assert proc.returncode == 0 and b'"action"' in proc.stdout, proc.stderr
    assert not (tmp_path / "-").exists()


# -- SIGTERM / SIGHUP / SIGKILL --------------------------------------------------


def slow_decrypt(
    sealed: Path, out_dir: Path, *, hangup: bool = True
) -> tuple[subprocess.Popen, object]:
    """``decrypt`` reading a FIFO that we feed: half the file, then nothing more.

    Deterministic: the command has opened its output and holds plaintext
    when the test checks, and cannot finish until the test writes the rest.
    """
    fifo = out_dir / "in.fifo"
    os.mkfifo(fifo)
    proc = spawn("decrypt", "-o", out_dir / "out.bin", fifo, hangup=hangup)
    feed = open(fifo, "wb")  # noqa: SIM115 - held open so the command keeps waiting
    data = sealed.read_bytes()
    feed.write(data[: len(data) // 2])
    feed.flush()
    wait_for(lambda: writes_into(proc.pid, out_dir, fifo), proc, "the output was opened")
    return proc, feed


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_item02_sigterm_sighup_mid_decrypt_leave_no_plaintext(
    sealed: Path, tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc, feed = slow_decrypt(sealed, out_dir)
    try:
        proc.send_signal(sig)
        proc.wait(60)
    finally:
        feed.close()  # type: ignore[attr-defined]
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert proc.returncode == code, err
    assert err.strip() == f"sealstore: terminated ({sig.name})"
    assert sorted(p.name for p in out_dir.iterdir()) == ["in.fifo"]


def test_item02_a_sigterm_landing_beside_a_blocking_read_still_stops_it() -> None:
    # A signal that another thread takes (or that lands just before the main
    # thread enters read()) does not interrupt the read: the handler would wait
    # for input that never comes. The CLI re-sends it to the main thread.
    code = (
        "import os, signal, sys, threading, time\n"
        "from sealstore import errors\n"
        "from sealstore.cli.main import _catch_termination\n"
        "restore = _catch_termination()\n"
        "r, w = os.pipe()\n"
        "def other():\n"
        "    time.sleep(0.3)\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # taken here\n"
        "threading.Thread(target=other, daemon=True).start()\n"
        "try:\n"
        "    os.read(r, 1)  # blocks: nothing is ever written\n"
        "except errors.Terminated:\n"
        "    print('terminated')\n"
        "restore()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "terminated", done.stderr


def test_item02_a_signal_whose_handler_ran_inside_a_finalizer_still_stops_the_command() -> None:
    # The handler can run inside a __del__ (a SealedFile dropped between two
    # files of a pull): Python prints the exception there and goes on, and the
    # next blocking read would then wait for ever (a pull blocked on a FIFO
    # did not stop on SIGHUP, once in CI). The CLI arms the signal again.
    code = (
        "import os, signal\n"
        "from sealstore import errors\n"
        "from sealstore.cli.main import _catch_termination\n"
        "restore = _catch_termination()\n"
        "class Dropped:\n"
        "    def __del__(self):\n"
        "        signal.raise_signal(signal.SIGHUP)\n"
        "        for _ in range(1000):  # the handler runs here, inside __del__\n"
        "            pass\n"
        "r, w = os.pipe()\n"
        "try:\n"
        "    Dropped()\n"
        "    print('past the finalizer', flush=True)\n"
        "    os.read(r, 1)  # blocks: nothing is ever written\n"
        "except errors.Terminated:\n"
        "    print('terminated')\n"
        "restore()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.split() == ["past", "the", "finalizer", "terminated"], done.stderr
    assert "Exception ignored" not in done.stderr


def test_item02_nohup_keeps_sighup_ignored(sealed: Path, tmp_path: Path) -> None:
    # A command started under nohup chose to outlive its terminal: SIGHUP stays
    # ignored, and SIGTERM still stops it cleanly.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc, feed = slow_decrypt(sealed, out_dir, hangup=False)
    try:
        proc.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        feed.close()  # type: ignore[attr-defined]
    assert proc.returncode == 143, proc.stderr.read().decode()  # type: ignore[union-attr]
    assert sorted(p.name for p in out_dir.iterdir()) == ["in.fifo"]


def test_item02_sigkill_mid_decrypt_leaves_no_named_file(sealed: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc, feed = slow_decrypt(sealed, out_dir)
    # The plaintext so far is in a file with no name (O_TMPFILE): never in the folder.
    assert sorted(p.name for p in out_dir.iterdir()) == ["in.fifo"]
    proc.kill()
    proc.wait(60)
    feed.close()  # type: ignore[attr-defined]
    assert sorted(p.name for p in out_dir.iterdir()) == ["in.fifo"]


def test_item02_next_write_sweeps_temporaries_of_dead_writers(sealed: Path, tmp_path: Path) -> None:
    # What a writer without O_TMPFILE (or an older release) leaves when killed:
    dead = tmp_path / ".out.bin.abcd1234.tmp"
    dead.write_bytes(b"plaintext of a killed run")
    # ...and one a live writer holds (its flock): not to be touched.
    live = tmp_path / ".out.bin.live0000.tmp"
    live.write_bytes(b"in progress")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        ok(run("decrypt", "-o", tmp_path / "out.bin", sealed))
    assert not dead.exists()
    assert live.exists()
    assert (tmp_path / "out.bin").read_bytes() == DATA


def slow_pull(
    store_env: dict[str, str], tmp_path: Path, dest: Path
) -> tuple[subprocess.Popen, Path, bytes, Path]:
    """A pull whose second object is a FIFO: the first file's plaintext sits in the
    pull's hidden folder while the command waits, forever, to open the second.
    """
    from sealstore.vault.store import Store

    src = model_dir(tmp_path, {"a.bin": 2 * CS + 5, "b.bin": CS})
    ok(run("push", src, "m", "-k", "local:", env=store_env))
    store = Store.open(store_env["SEALSTORE_STORE"])
    m = store.manifest("m:1")
    first, last = m.files[0], m.files[-1]
    obj = tmp_path / "store" / store.object_path(m.tenant, last.object)
    kept = obj.read_bytes()
    obj.unlink()
    os.mkfifo(obj)
    proc = spawn("pull", "m", "-o", dest, env=dict(os.environ, **store_env))

    def first_file_decrypted() -> bool:
        return any(
            (d / first.path).exists() and (d / first.path).stat().st_size == first.size
            for d in dest.parent.glob(f".{dest.name}.pull-*")
        )

    wait_for(first_file_decrypted, proc, "the first file was decrypted")
    return proc, obj, kept, src


def hidden_pull_folders(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob(f".{dest.name}.pull-*"))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_item02_sigterm_sighup_mid_pull_leave_no_plaintext(
    store_env: dict[str, str], tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    dest = tmp_path / "dest"
    proc, _, _, _ = slow_pull(store_env, tmp_path, dest)
    proc.send_signal(sig)
    proc.wait(60)
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert proc.returncode == code, err
    assert f"terminated ({sig.name})" in err
    assert hidden_pull_folders(dest) == []
    assert not dest.exists()


def test_item02_sigkill_mid_pull_is_swept_by_the_next_pull(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    proc, obj, kept, src = slow_pull(store_env, tmp_path, dest)
    proc.kill()
    proc.wait(60)
    # SIGKILL cannot be caught: the hidden folder (mode 0700) stays...
    assert len(hidden_pull_folders(dest)) == 1
    obj.unlink()
    obj.write_bytes(kept)
    # ...until the next pull to the same place removes it.
    ok(run("pull", "m", "-o", dest, env=store_env))
    assert hidden_pull_folders(dest) == []
    assert same_tree(src, dest)


# -- "-" for pull and push ---------------------------------------------------------


def test_item06_pull_dash_is_stdout_for_one_file_only(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    src = model_dir(tmp_path, {"w.bin": 2 * CS + 1, "cfg.json": 10})
    ok(run("push", src, "m", "-k", "local:", env=store_env))
    line = fails(run_in(tmp_path, "pull", "m", "-o", "-", env=store_env), 2)
    assert "--file" in line
    assert not (tmp_path / "-").exists()
    proc = run_in(tmp_path, "pull", "m", "--file", "w.bin", "-o", "-", env=store_env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == (src / "w.bin").read_bytes()
    assert not (tmp_path / "-").exists()


def test_item06_push_dash_is_refused(store_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "-").mkdir()  # a folder named "-" is not what "-" means
    (tmp_path / "-" / "w.bin").write_bytes(b"x" * 100)
    line = fails(run_in(tmp_path, "push", "-", "m", "-k", "local:", env=store_env), 2)
    assert "stdin" in line
    assert ok(run("ls", env=store_env)).stdout == b""


# -- pull into a folder that has files -----------------------------------------------


def test_item07_pull_into_a_non_empty_folder_needs_force(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    src = model_dir(tmp_path, {"w.bin": 1000, "cfg.json": 10})
    ok(run("push", src, "m", "-k", "local:", env=store_env))
    dest = tmp_path / "dest"
    dest.mkdir()
    ok(run("pull", "m", "-o", dest, env=store_env))  # empty: fine
    assert same_tree(src, dest)
    (dest / "w.bin").write_bytes(b"my local edit")
    line = fails(run("pull", "m", "-o", dest, env=store_env), 5)
    assert str(dest) in line and "--force" in line
    assert (dest / "w.bin").read_bytes() == b"my local edit"
    assert sorted(p.name for p in dest.iterdir()) == ["cfg.json", "w.bin"]
    ok(run("pull", "m", "-o", dest, "--force", env=store_env))
    assert same_tree(src, dest)


def test_item02_without_o_tmpfile_the_named_temporary_is_locked_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealstore import fsutil

    monkeypatch.setattr(fsutil, "_O_TMPFILE", 0)  # a system without O_TMPFILE
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "out.bin"
    with pytest.raises(KeyboardInterrupt), fsutil.atomic_file(target) as fp:
        fp.write(b"secret")
        tmp = next(folder.glob(".out.bin.*.tmp"))
        # Locked while written: a sweep by someone else leaves it alone.
        with open(tmp, "rb") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert fsutil.sweep_temporaries(target) == []
        raise KeyboardInterrupt
    assert list(folder.iterdir()) == []
    with fsutil.atomic_file(target) as fp:
        fp.write(b"done")
    assert [p.name for p in folder.iterdir()] == ["out.bin"]
    assert target.read_bytes() == b"done"


def test_item02_a_pull_folder_swept_before_its_lock_is_refused(tmp_path: Path) -> None:
    """A sweep that takes a new pull folder's lock first removes it while holding
    the lock; the pull, once it gets the lock, must see it gone (not write into a
    recreated, unlocked folder)."""
    from sealstore.fsutil import lock_folder

    folder = tmp_path / ".out.pull-xyz"
    folder.mkdir()
    sweeper = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(sweeper, fcntl.LOCK_EX)
    got: list[BaseException | int] = []

    def lock() -> None:
        try:
            got.append(lock_folder(folder))
        except BaseException as exc:
            got.append(exc)

    t = threading.Thread(target=lock)
    t.start()
    time.sleep(0.3)  # the pull now waits on the sweep's lock
    folder.rmdir()
    os.close(sweeper)
    t.join(10)
    assert len(got) == 1 and isinstance(got[0], FileNotFoundError), got
