"""Pytest plugin: the real services (OpenBao, moto, SeaweedFS, swtpm, Redis) as fixtures.

Load it with ``-p tests.services`` (or ``pytest_plugins = ["tests.services"]``).

If every ``SEALSTORE_TEST_*`` variable is set (``scripts/services.sh env``, as
``make test`` exports them after ``scripts/services.sh start``), the fixtures use
those endpoints. Otherwise the session runs ``scripts/services.sh start`` itself,
reads the endpoints from ``scripts/services.sh env`` and runs ``stop`` at the end
(unless every service was already up before, in which case it leaves them be).

Anything unreachable FAILS the tests that need it, with the services' log tails:
a missing service is a broken test machine, never a reason to skip.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shlex
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "services.sh"

# Endpoint name (the key in the ``services`` dict) -> environment variable.
ENV_VARS = {
    "vault_addr": "SEALSTORE_TEST_VAULT_ADDR",
    "vault_tls_addr": "SEALSTORE_TEST_VAULT_TLS_ADDR",
    "vault_cacert": "SEALSTORE_TEST_VAULT_CACERT",
    "vault_token": "SEALSTORE_TEST_VAULT_TOKEN",
    "moto_url": "SEALSTORE_TEST_MOTO_URL",
    "s3_url": "SEALSTORE_TEST_S3_URL",
    "s3_key": "SEALSTORE_TEST_S3_KEY",
    "s3_secret": "SEALSTORE_TEST_S3_SECRET",
    "tpm": "SEALSTORE_TEST_TPM",
    "redis_url": "SEALSTORE_TEST_REDIS_URL",
}
LOG_NAMES = ("bao", "bao-tls", "moto", "seaweedfs", "swtpm", "redis")
START_TIMEOUT = 240  # the script waits at most ~30 s for each of six services


@dataclass(frozen=True)
class Vault:
    """OpenBao dev servers: ``addr`` over HTTP, ``tls_addr`` over TLS (CA in ``cacert``)."""

    addr: str
    tls_addr: str
    token: str
    cacert: str


@dataclass(frozen=True)
class S3:
    """A real S3 server (SeaweedFS) that enforces SigV4 with this key pair."""

    url: str
    key: str
    secret: str


def _run_dir() -> Path:
    d = Path(os.environ.get("SEALSTORE_SERVICES_DIR", ROOT / ".services"))
    return d if d.is_absolute() else ROOT / d


def _log_tails(lines: int = 30) -> str:
    out = []
    for name in LOG_NAMES:
        log = _run_dir() / f"{name}.log"
        if log.is_file():
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"---- {log} (last {lines} lines) ----\n" + "\n".join(tail))
    return "\n".join(out) or f"(no service logs under {_run_dir()})"


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(SCRIPT), "stop"], cwd=ROOT, capture_output=True, check=False)
        pytest.fail(
            f"`{SCRIPT} {' '.join(args)}` took over {START_TIMEOUT} s; services stopped\n"
            + _log_tails(),
            pytrace=False,
        )


def _parse_env(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line.removeprefix("export ").partition("=")
            env[key.strip()] = shlex.split(value)[0] if value else ""
    return env


def _endpoints(env: dict[str, str]) -> dict[str, str]:
    return {name: env[var] for name, var in ENV_VARS.items()}


def _http_answers(url: str, path: str, cacert: str | None = None) -> str | None:
    """None if ``url + path`` gives any HTTP answer below 500, else what went wrong."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    try:
        if parts.scheme == "https":
            ctx = ssl.create_default_context(cafile=cacert)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=5, context=ctx
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            conn.request("GET", path)
            status = conn.getresponse().status
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        return f"{url}{path}: {exc!r}"
    return None if status < 500 else f"{url}{path}: HTTP {status}"


def _tcp_answers(tcti: str) -> str | None:
    """``swtpm:host=H,port=P`` -> None if a TCP connect to H:P works."""
    _, _, conf = tcti.partition(":")
    opts = dict(kv.split("=", 1) for kv in conf.split(",") if "=" in kv)
    host, port = opts.get("host", "127.0.0.1"), int(opts.get("port", "2321"))
    try:
        with socket.create_connection((host, port), timeout=5):
            return None
    except OSError as exc:
        return f"{tcti}: {exc!r}"


def _redis_answers(url: str) -> str | None:
    """``redis://H:P/N`` -> None if the server there answers PING with PONG."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError as exc:
        return f"{url}: {exc!r}"
    # A port held by something else, or a server wanting AUTH, answers otherwise.
    return None if reply.startswith(b"+PONG") else f"{url}: PING answered {reply!r}"


def check_endpoints(ep: dict[str, str]) -> list[str]:
    """Every problem found contacting each service (empty when all answer)."""
    problems = [
        _http_answers(ep["vault_addr"], "/v1/sys/health"),
        _http_answers(ep["vault_tls_addr"], "/v1/sys/health", ep["vault_cacert"]),
        _http_answers(ep["moto_url"], "/moto-api/"),
        _http_answers(ep["s3_url"], "/healthz"),
        _tcp_answers(ep["tpm"]),
        _redis_answers(ep["redis_url"]),
    ]
    if not Path(ep["vault_cacert"]).is_file():
        problems.append(f"vault CA certificate {ep['vault_cacert']} does not exist")
    return [p for p in problems if p]


@pytest.fixture(scope="session")
def services() -> Iterator[dict[str, str]]:
    """Endpoints of every service, keyed as in ``ENV_VARS``; fails if any is down."""
    present = [var for var in ENV_VARS.values() if os.environ.get(var)]
    if present:
        missing = [var for var in ENV_VARS.values() if not os.environ.get(var)]
        if missing:
            pytest.fail(
                f"some SEALSTORE_TEST_* variables are set but not {missing}; "
                f"export all of `{SCRIPT} env`",
                pytrace=False,
            )
        ep = _endpoints(dict(os.environ))
        problems = check_endpoints(ep)
        if problems:
            pytest.fail(
                "services named by SEALSTORE_TEST_* do not answer:\n  "
                + "\n  ".join(problems)
                + "\n"
                + _log_tails(),
                pytrace=False,
            )
        yield ep
        return

    # Nothing exported: bring the services up for this session.
    already_up = _script("status").returncode == 0
    if not already_up:
        started = _script("start")
        if started.returncode != 0:
            pytest.fail(
                f"`{SCRIPT} start` failed (rc {started.returncode}):\n"
                f"{started.stderr}\n{started.stdout}",
                pytrace=False,
            )
    try:
        ep = _endpoints(_parse_env(_script("env").stdout))
        problems = check_endpoints(ep)
        if problems:
            pytest.fail(
                "services started but do not answer:\n  "
                + "\n  ".join(problems)
                + "\n"
                + _log_tails(),
                pytrace=False,
            )
        yield ep
    finally:
        if not already_up:
            _script("stop")


@pytest.fixture(scope="session")
def vault(services: dict[str, str]) -> Vault:
    return Vault(
        addr=services["vault_addr"],
        tls_addr=services["vault_tls_addr"],
        token=services["vault_token"],
        cacert=services["vault_cacert"],
    )


@pytest.fixture(scope="session")
def moto_url(services: dict[str, str]) -> str:
    return services["moto_url"]


@pytest.fixture(scope="session")
def s3(services: dict[str, str]) -> S3:
    return S3(url=services["s3_url"], key=services["s3_key"], secret=services["s3_secret"])


@pytest.fixture(scope="session")
def tpm_tcti(services: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The swtpm: the session's, or under pytest-xdist one of each worker's own after the first.

    The TPM tests reset and extend PCR 16, count the handles left loaded and fill the
    TPM's few object slots: two workers on one TPM would see each other's. So every
    worker but ``gw0`` starts a real swtpm of its own (the same binary and flags as
    ``scripts/services.sh``) and stops it at the end of its session.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    if worker == "gw0":
        yield services["tpm"]
        return
    yield from _own_swtpm(tmp_path_factory.mktemp(f"swtpm-{worker}"))


def _free_port_pair() -> int:
    """A free port P with P + 1 free too (the swtpm TCTI talks to the control channel on P + 1)."""
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return int(port)
    pytest.fail("no two adjacent free TCP ports on 127.0.0.1 for a swtpm", pytrace=False)


@contextlib.contextmanager
def spawned(
    cmd: list[str], log: Path, ready: Callable[[], bool], what: str, timeout: float = 30
) -> Iterator[subprocess.Popen[bytes]]:
    """*cmd* running, its output in *log*, once ``ready()``; stopped on the way out.

    Fails the test, with the log's tail, if the process exits or is not ready within
    *timeout* seconds. Stopping is SIGTERM, then SIGKILL after 10 s.
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                pytest.fail(f"{what} did not come up:\n{tail}", pytrace=False)
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _own_swtpm(state: Path, timeout: float = 30) -> Iterator[str]:
    """A swtpm on free ports with its state in *state*; fails loudly if it does not answer."""
    port = _free_port_pair()
    log = state / "swtpm.log"
    server, control = (f"type=tcp,port={p},bindaddr=127.0.0.1" for p in (port, port + 1))
    cmd = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--server", server]
    cmd += ["--ctrl", control, "--flags", "not-need-init,startup-clear"]
    tcti = f"swtpm:host=127.0.0.1,port={port}"

    def up() -> bool:
        return _tcp_answers(tcti) is None

    with spawned(cmd, log, up, f"this worker's swtpm ({tcti})", timeout):
        yield tcti


@pytest.fixture(scope="session")
def redis_url(services: dict[str, str]) -> str:
    """``redis://127.0.0.1:PORT/0``: shared by the session, empty at start, AOF on (everysec)."""
    return services["redis_url"]
