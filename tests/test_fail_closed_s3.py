"""A hung S3 endpoint: push and pull end by themselves, and Ctrl-C ends them at once.

Each test freezes a SeaweedFS of its own (SIGSTOP: the kernel still accepts
connections and buffers a few MiB, nothing ever answers) in the middle of a
transfer made by the installed ``sealstore`` command.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sealstore.kms.local import LocalKeyring
from tests.conftest import make_keyring
from tests.s3util import incomplete_uploads, s3_options

ROOT = Path(__file__).resolve().parent.parent
WEED = Path(sys.executable).parent / "weed"
KEY, SECRET = "failclosed", "failclosed-secret-0123456789"
# Small enough that a frozen server is noticed quickly, large enough for a
# loaded 2-core machine to finish requests that do get answered.
CONNECT, READ, DEADLINE = 2, 4, 12
SIZE = 160 << 20  # ten 16 MiB parts: the transfer is surely under way when frozen

pytestmark = pytest.mark.skipif(not WEED.exists(), reason="SeaweedFS (weed) not installed")


def _free_port() -> int:
    # weed also listens on PORT+10000 (gRPC): both must be free.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@dataclass
class Weed:
    proc: subprocess.Popen[bytes]
    url: str

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    """A SeaweedFS of this module's own (never the session's shared one)."""
    d = tmp_path_factory.mktemp("weed")
    identity = {
        "name": "t",
        "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    (d / "s3.json").write_text(json.dumps({"identities": [identity]}))
    s3, master, volume, filer, admin = (_free_port() for _ in range(5))
    (d / "data").mkdir()
    log = open(d / "weed.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(WEED),
            "-logtostderr",
            "mini",
            f"-dir={d / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-admin.port={admin}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-s3.port={s3}",
            f"-s3.config={d / 's3.json'}",
            f"-s3.localSocket={d / 's3.sock'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Weed(proc, f"http://127.0.0.1:{s3}")
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (d / "weed.log").read_text()[-3000:]
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(server.url + "/healthz", timeout=2),  # noqa: S310
            ):
                break
            assert time.monotonic() < end, "SeaweedFS did not start"
            time.sleep(0.5)
        yield server
    finally:
        server.thaw()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def env(weed: Weed, sealstore_env: Path) -> Iterator[dict[str, str]]:
    """The command's environment: this test's home, the frozen-to-be server, small timeouts."""
    import boto3

    bucket = "failclosed-" + uuid.uuid4().hex[:12]
    boto3.client(
        "s3",
        endpoint_url=weed.url,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    environ = dict(
        os.environ,
        AWS_ENDPOINT_URL_S3=weed.url,
        AWS_ACCESS_KEY_ID=KEY,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        SEALSTORE_STORE=f"s3://{bucket}/store",
        SEALSTORE_S3_CONNECT_TIMEOUT=str(CONNECT),
        SEALSTORE_S3_READ_TIMEOUT=str(READ),
        SEALSTORE_S3_DEADLINE=str(DEADLINE),
        PYTHONFAULTHANDLER="1",
    )
    make_keyring(sealstore_env / "keyring.json")
    LocalKeyring._cache.clear()
    _ok(_sealstore(environ, "store", "init"))
    try:
        yield environ
    finally:
        weed.thaw()  # a failed test must not leave the module's server frozen


def _sealstore(environ: dict[str, str], *args: str | os.PathLike[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sealstore.cli.main", *map(str, args)],
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _ok(proc: subprocess.Popen[bytes], timeout: float = 180) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def _ends(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, str, float]:
    """Wait for *proc* (killing it if it outlives *timeout*): exit code, stderr, seconds taken."""
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # with PYTHONFAULTHANDLER: where it hangs
        _, err = proc.communicate()
        pytest.fail(f"still running after {timeout:.0f} s: {err.decode()[-20000:]}")
    return proc.returncode, err.decode(), time.monotonic() - start


def _model(tmp_path: Path, files: int = 1) -> Path:
    src = tmp_path / "model"
    src.mkdir()
    for i in range(files):
        with open(src / f"weights-{i}.bin", "wb") as fp:
            # Random-looking is not needed: the sealed object is what travels.
            fp.truncate(SIZE)
    return src


def _when_uploading(environ: dict[str, str], proc: subprocess.Popen[bytes]) -> None:
    """Return once *proc* has a multipart upload under way on the store's bucket."""
    import boto3

    bucket = environ["SEALSTORE_STORE"][len("s3://") :].partition("/")[0]
    client = boto3.client(
        "s3",
        endpoint_url=environ["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    end = time.monotonic() + 120
    while not client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
        assert proc.poll() is None, "the push ended before it could be frozen"
        assert time.monotonic() < end, "no upload started"
        time.sleep(0.02)


def _staged(out: Path) -> list[Path]:
    """The files of a pull into *out*: its staging folder's, and *out*'s own."""
    found = [*out.parent.glob(f".{out.name}.pull-*/**/*"), *out.glob("**/*")]
    return [p for p in found if p.is_file()]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed into place meanwhile
        return 0


def _pull_frozen(environ: dict[str, str], out: Path, weed: Weed) -> subprocess.Popen[bytes]:
    """A pull of ``m`` into *out*, with the server frozen once plaintext started arriving.

    A pull that finishes before the test saw it start (a starved test process
    on a loaded machine) is run again.
    """
    for _ in range(3):
        proc = _sealstore(environ, "pull", "m", "-o", out)
        end = time.monotonic() + 120
        while proc.poll() is None and not any(_size(p) for p in _staged(out)):
            assert time.monotonic() < end, "no download started"
            time.sleep(0.01)
        if proc.poll() is None:
            weed.freeze()
            return proc
        _ok(proc)
        shutil.rmtree(out)
    pytest.fail("every pull ended before it could be frozen")


def _versions(environ: dict[str, str]) -> str:
    return _ok(_sealstore(environ, "ls"))


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sealstore: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_item03_push_to_a_hung_s3_fails_within_the_deadline(
    weed: Weed, env: dict[str, str], tmp_path: Path
) -> None:
    src = _model(tmp_path)
    proc = _sealstore(env, "push", src, "m", "-k", "local:")
    _when_uploading(env, proc)
    weed.freeze()
    try:
        code, err, took = _ends(proc, timeout=3 * DEADLINE)
    finally:
        weed.thaw()
    line = _one_error_line(err)
    assert code == 6, err
    assert weed.url in line and "timed out" in line, line
    # One call's deadline, plus the time the frozen part took to start.
    assert took < 2 * DEADLINE + 10, line
    # Nothing became visible; what the push left, gc removes.
    assert "m" not in _versions(env).split()
    _ok(_sealstore(env, "store", "gc", "--grace", "0"))
    location = env["SEALSTORE_STORE"][len("s3://") :]
    assert incomplete_uploads(s3_options(weed.url, KEY, SECRET), location) == []


def test_item03_pull_from_a_hung_s3_fails_within_the_deadline(
    weed: Weed, env: dict[str, str], tmp_path: Path
) -> None:
    _ok(_sealstore(env, "push", _model(tmp_path), "m", "-k", "local:"))
    out = tmp_path / "out"
    proc = _pull_frozen(env, out, weed)
    try:
        code, err, took = _ends(proc, timeout=3 * DEADLINE)
    finally:
        weed.thaw()
    line = _one_error_line(err)
    assert code == 6, err
    assert weed.url in line and "timed out" in line, line
    assert took < 2 * DEADLINE + 10, line
    # No plaintext left behind, not even a partial temporary file.
    assert _staged(out) == [] and not out.exists()


def test_item03_backup_to_a_hung_s3_fails_within_the_deadline(
    weed: Weed, env: dict[str, str], tmp_path: Path
) -> None:
    local = dict(env, SEALSTORE_STORE=str(tmp_path / "store"))
    _ok(_sealstore(local, "store", "init"))
    _ok(_sealstore(local, "push", _model(tmp_path, files=2), "m", "-k", "local:"))
    proc = _sealstore(local, "backup", "create", "--to", env["SEALSTORE_STORE"] + "-backup")
    _when_uploading(env, proc)
    weed.freeze()
    try:
        code, err, took = _ends(proc, timeout=3 * DEADLINE)
    finally:
        weed.thaw()
    line = _one_error_line(err)
    assert code == 6, err
    assert weed.url in line and "timed out" in line, line
    assert took < 2 * DEADLINE + 10, line


@pytest.mark.parametrize(
    ("command", "sig"),
    [
        ("push", signal.SIGINT),
        ("push-files", signal.SIGINT),
        ("pull", signal.SIGINT),
        ("ls", signal.SIGINT),
        # What docker stop, Kubernetes and timeout send: handled like Ctrl-C.
        ("push", signal.SIGTERM),
        ("pull", signal.SIGTERM),
    ],
)
def test_item03_sigint_or_sigterm_ends_a_command_blocked_on_a_hung_s3(
    weed: Weed, env: dict[str, str], tmp_path: Path, command: str, sig: signal.Signals
) -> None:
    # A deadline far away: only the interrupt can end the command in time.
    env = dict(env, SEALSTORE_S3_READ_TIMEOUT="300", SEALSTORE_S3_DEADLINE="600")
    # push-files: several files sealed and uploaded side by side, on threads.
    src = _model(tmp_path, files=3 if command == "push-files" else 1)
    out = tmp_path / "out"
    blocked = READ + 1.0  # seconds until surely blocked on the frozen server
    if command.startswith("push"):
        proc = _sealstore(env, "push", src, "m", "-k", "local:")
        _when_uploading(env, proc)
        weed.freeze()
    elif command == "ls":  # blocked in the main thread, waiting on fsspec's event loop
        weed.freeze()
        proc = _sealstore(env, "ls")
        blocked += 5  # and the interpreter started, on a loaded machine
    else:
        _ok(_sealstore(env, "push", src, "m", "-k", "local:"))
        proc = _pull_frozen(env, out, weed)
    try:
        time.sleep(blocked)
        assert proc.poll() is None, proc.communicate()[1].decode()
        proc.send_signal(sig)
        code, err, took = _ends(proc, timeout=60)
    finally:
        weed.thaw()
    assert code == (130 if sig == signal.SIGINT else 128 + sig), err
    assert took < 3, f"{took:.1f} s after {sig.name}: {err}"
    said = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert said in err and "Traceback" not in err, err
    if command == "pull":
        assert _staged(out) == [] and not out.exists()
    elif command.startswith("push"):
        assert "m" not in _versions(env).split()


def test_item03_s3_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from sealstore.vault.storage import open_storage

    monkeypatch.setenv("SEALSTORE_S3_CONNECT_TIMEOUT", "3")
    monkeypatch.setenv("SEALSTORE_S3_READ_TIMEOUT", "7.5")
    monkeypatch.setenv("SEALSTORE_S3_DEADLINE", "40")
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    fs = open_storage("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9").fs  # type: ignore[attr-defined]
    assert fs.config_kwargs["connect_timeout"] == 3
    assert fs.config_kwargs["read_timeout"] == 7.5
    assert fs.config_kwargs["retries"] == {"mode": "standard"}
    assert fs.deadline == 40 and fs.retries == 1  # botocore retries; s3fs's own loop off
    monkeypatch.setenv("SEALSTORE_S3_DEADLINE", "soon")
    with pytest.raises(ValueError, match="SEALSTORE_S3_DEADLINE"):
        open_storage("s3://bucket/prefix")


def test_item03_a_timeout_s3fs_rewraps_still_names_the_endpoint() -> None:
    """A body read that times out reaches s3fs as a bare ``TimeoutError()``; s3fs's
    own error check then fails on its empty ``args`` (an ``IndexError``). The line
    must still say what happened and where."""
    from sealstore.vault.s3limits import describe

    try:
        try:
            raise TimeoutError()
        except OSError as ex:
            ex.args[0]  # what s3fs's S3File._fetch_range does
    except IndexError as exc:
        line = describe(exc, "GetObject", endpoint="http://127.0.0.1:1")
    assert line.startswith("http://127.0.0.1:1 timed out: no answer to GetObject"), line
    assert "SEALSTORE_S3_READ_TIMEOUT" in line
