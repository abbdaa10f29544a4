# ruff: noqa: F811 (the broker tests' fixtures, imported, are parameters here)
"""The broker fails closed when its shared state fails: real Redis, real replicas.

Each test runs its own ``redis-server`` (AOF on, fsync every second, in a temp
folder) on a free port, so it can kill, wipe and restart it without touching
the session's server; two ``sealstore broker serve`` replicas share it, with
swtpm evidence, as in production.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sealstore.audit import read_records
from sealstore.enclave.broker.client import BrokerKey
from sealstore.enclave.broker.state import StateReset
from sealstore.errors import BackendError
from sealstore.keys import DataKey
from sealstore.vault.storage import open_storage
from tests.test_broker import (  # noqa: F401 (fixtures)
    CONTEXT,
    TOKENS,
    Pki,
    Setup,
    _body,
    _free_port,
    pki,
    setup,
    start_broker,
)
from tests.test_broker_incident import (  # noqa: F401 (fixtures)
    ADMIN,
    Replicas,
    Webhook,
    _bad,
    _config,
    _release_body,
    _slot,
    two_replicas,
    webhook,
)
from tests.test_broker_state import Backend, backend, redis_prefix  # noqa: F401 (fixtures)

REDIS_SERVER = "/usr/bin/redis-server"


class OwnRedis:
    """A redis-server of this test's own, persisting to *folder* (AOF, fsync each second)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder.parent / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--daemonize",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                with redis.Redis.from_url(self.url, socket_timeout=1) as r:
                    if r.ping():
                        return
            except redis.exceptions.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {self.port}", pytrace=False)
            time.sleep(0.1)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown save, no goodbye
        self.proc.wait(10)
        self.proc = None

    def wipe(self) -> None:
        """Its data gone, as on a new server or a lost volume."""
        assert self.proc is None
        shutil.rmtree(self.folder)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis-data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def replicas(
    setup: Setup, pki: Pki, tmp_path: Path, own_redis: OwnRedis, webhook: Webhook
) -> Iterator[Replicas]:
    """Two broker replicas on the test's own Redis."""
    prefix = f"t-{uuid.uuid4().hex}:"
    with two_replicas(setup, pki, tmp_path, own_redis.url, webhook, prefix) as rep:
        yield rep


def _admin(rep: Replicas, i: int, path: str, body: dict | None) -> tuple[int, Any]:
    return rep.call(i, "GET" if body is None else "POST", path, body, ADMIN)


def _settled(
    call: Callable[[], tuple[int, Any]], *, final: Callable[[], bool] = lambda: False
) -> tuple[int, Any]:
    """*call*'s answer once the replica has reconnected to a restarted Redis.

    A replica may answer ``state-unavailable`` (503) while its connection is
    re-established: a refusal too, so never a key; waited out, generously --
    unless *final* says the 503 is the replica's settled answer already.
    """
    deadline = time.monotonic() + 30
    while True:
        status, out = call()
        assert status != 200 or "sealed" not in out
        if out != {"error": "state-unavailable"} or final() or time.monotonic() > deadline:
            return status, out
        time.sleep(0.2)


# What a replica logs when Redis answers but the lockdowns cannot be put back.
NOT_RECONCILED = "code=state-unavailable reason=the shared state was reset and the audit log"


def _not_reconciled(rep: Replicas, i: int) -> Callable[[], bool]:
    """Whether replica *i* has refused for the reconcile's sake (Redis answered),
    not for an outage: the 503 that waiting longer would not change."""
    return lambda: NOT_RECONCILED in (rep.folder / f"replica{i}.log").read_text(errors="replace")


def _wait_for(cond: Callable[[], bool], seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _globex_body(rep: Replicas, i: int, setup: Setup) -> dict:
    ring = setup.folder / "globex-keyring.json"
    key = BrokerKey(f"broker+https://127.0.0.1:1/globex/minilm?key=local:{ring}")
    blob = key.wrap(DataKey.generate(), CONTEXT).blob
    status, ch = rep.call(
        i, "POST", "/v1/challenge", {"tenant": "globex", "artifact": "minilm"}, "globex"
    )
    assert status == 200, ch
    return _body(ch, "globex", "minilm", blob)[0]


# -- a restart or a reset of Redis does not lift a lockdown ---------------------------


def test_item04_state_epoch_and_reassert(backend: Backend) -> None:
    """A reset state says so (no epoch); the record goes back in once, atomically."""
    s = backend.state
    assert s.epoch() is None
    assert s.standing("alice") == ({}, None, None)
    with pytest.raises(StateReset):
        s.standing("alice", require_epoch=True)
    now = backend.now()
    outs = {"alice": (now + 60, "failures"), "bob": (now - 1, "over")}
    assert s.reassert({"acme": "theft", "*": "drill"}, outs, "e1") is True
    assert s.epoch() == "e1"
    assert s.standing("alice", require_epoch=True) == (
        {"acme": "theft", "*": "drill"},
        "failures",
        None,
    )
    assert s.lockouts() == {"alice": "failures"}  # bob's had ended
    # A second replica finding it done changes nothing.
    assert s.reassert({"globex": "x"}, {}, "e2") is False
    assert s.epoch() == "e1" and s.lockdowns() == {"acme": "theft", "*": "drill"}


def test_item04_test_redis_keeps_its_data(redis_url: str) -> None:
    """The session's Redis persists as production must: AOF, fsync every second."""
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        conf = r.config_get("append*")
        assert conf["appendonly"] == "yes"
        assert conf["appendfsync"] == "everysec"
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def test_item04_lockdown_survives_redis_kill9_and_restart(
    replicas: Replicas, own_redis: OwnRedis, setup: Setup, tcti: str
) -> None:
    blob = _slot(setup)
    # Challenges issued before the lockdown, one per replica.
    bodies = [_release_body(replicas, i, setup, blob) for i in (0, 1)]
    status, out = _admin(replicas, 0, "/v1/admin/lockdown", {"tenant": "acme", "reason": "drill"})
    assert status == 200 and out["lockdowns"] == {"acme": "drill"}
    own_redis.kill9()
    own_redis.start()  # from its AOF
    for i in (0, 1):
        status, out = _settled(
            lambda i=i: replicas.call(i, "POST", "/v1/release", bodies[i], TOKENS["trainer"])
        )
        assert (status, out) == (403, {"error": "locked-down"})
        status, out = _settled(
            lambda i=i: replicas.call(
                i,
                "POST",
                "/v1/challenge",
                {"tenant": "acme", "artifact": "minilm"},
                TOKENS["trainer"],
            )
        )
        assert (status, out) == (403, {"error": "locked-down"})
    status, out = _admin(replicas, 1, "/v1/admin/status", None)
    assert out["lockdowns"] == {"acme": "drill"}


def test_item04_redis_back_empty_reasserts_lockdowns_and_lockouts(
    replicas: Replicas, own_redis: OwnRedis, setup: Setup, tcti: str, webhook: Webhook
) -> None:
    blob = _slot(setup)
    # intern is locked out by three failed attestations, then acme is locked down.
    for i in (0, 1, 0):
        status, ch = replicas.call(
            i, "POST", "/v1/challenge", {"tenant": "acme", "artifact": "notes"}, TOKENS["intern"]
        )
        assert status == 200, ch
        req = _bad(_body(ch, "acme", "notes", _slot(setup, "notes"))[0])
        status, out = replicas.call(1 - i, "POST", "/v1/release", req, TOKENS["intern"])
        assert out == {"error": "tpm-signature"}
    status, _ = _admin(replicas, 1, "/v1/admin/lockdown", {"tenant": "acme", "reason": "theft"})
    assert status == 200
    assert _wait_for(lambda: "lockout" in webhook.kinds())
    # Redis comes back empty: a lost volume, a new server.
    own_redis.kill9()
    own_redis.wipe()
    own_redis.start()
    with redis.Redis.from_url(own_redis.url) as r:
        assert r.dbsize() == 0
    for i in (0, 1):
        status, out = _settled(
            lambda i=i: replicas.call(
                i,
                "POST",
                "/v1/challenge",
                {"tenant": "acme", "artifact": "minilm"},
                TOKENS["trainer"],
            )
        )
        assert (status, out) == (403, {"error": "locked-down"})
    # Other tenants are released as before; the lockout is back too.
    for i in (0, 1):
        body = _globex_body(replicas, i, setup)
        status, out = replicas.call(1 - i, "POST", "/v1/release", body, "globex")
        assert status == 200 and "sealed" in out
        status, out = replicas.call(
            i, "POST", "/v1/challenge", {"tenant": "acme", "artifact": "notes"}, TOKENS["intern"]
        )
        assert (status, out) == (403, {"error": "locked-down"})
    status, out = _admin(replicas, 1, "/v1/admin/status", None)
    assert out["lockdowns"] == {"acme": "theft"} and set(out["lockouts"]) == {"intern"}
    assert _wait_for(lambda: "state-reset" in webhook.kinds())
    assert webhook.kinds().count("state-reset") == 1  # one replica put it back, once
    alert = next(a for a in webhook.alerts if a["alert"] == "state-reset")
    assert "acme" in alert["reason"] and "intern" in alert["reason"]
    # Lifted, it stays lifted through another reset: the lift is recorded too.
    status, out = _admin(replicas, 0, "/v1/admin/lift", {"tenant": "acme"})
    assert status == 200 and out["lockdowns"] == {}
    own_redis.kill9()
    own_redis.wipe()
    own_redis.start()
    status, ch = _settled(
        lambda: replicas.call(
            1,
            "POST",
            "/v1/challenge",
            {"tenant": "acme", "artifact": "minilm"},
            TOKENS["trainer"],
        )
    )
    assert status == 200, ch
    body = _body(ch, "acme", "minilm", blob)[0]
    assert replicas.call(0, "POST", "/v1/release", body, TOKENS["trainer"])[0] == 200


def test_item04_reset_state_with_unreadable_record_refuses_everything(
    replicas: Replicas, own_redis: OwnRedis, setup: Setup, tcti: str, webhook: Webhook
) -> None:
    """If the broker cannot tell whether a lockdown is in force, it refuses."""
    status, _ = _admin(replicas, 0, "/v1/admin/lockdown", {"tenant": "acme"})
    assert status == 200
    own_redis.kill9()
    own_redis.wipe()
    # The audit log (the record of lockdowns) cannot be read either.
    audit = replicas.folder / "audit" / "audit"
    audit.rename(replicas.folder / "audit-away")
    audit.write_text("not a folder")
    own_redis.start()
    for i in (0, 1):
        status, out = _settled(
            lambda i=i: replicas.call(
                i, "POST", "/v1/challenge", {"tenant": "globex", "artifact": "minilm"}, "globex"
            ),
            final=_not_reconciled(replicas, i),
        )
        # Still refused once Redis answers: the state cannot be reconciled.
        assert (status, out) == (503, {"error": "state-unavailable"})
        assert _not_reconciled(replicas, i)()
    with redis.Redis.from_url(own_redis.url) as r:
        assert not list(r.scan_iter(match="*lockdown*"))
    audit.unlink()
    (replicas.folder / "audit-away").rename(audit)
    for i in (0, 1):
        status, out = replicas.call(
            i,
            "POST",
            "/v1/challenge",
            {"tenant": "acme", "artifact": "minilm"},
            TOKENS["trainer"],
        )
        assert (status, out) == (403, {"error": "locked-down"})
    assert (
        replicas.call(
            0, "POST", "/v1/challenge", {"tenant": "globex", "artifact": "minilm"}, "globex"
        )[0]
        == 200
    )


def test_item04_a_forged_lift_in_the_audit_log_is_not_believed(
    replicas: Replicas, own_redis: OwnRedis
) -> None:
    """The lockdowns are rebuilt only from a log that verifies: a lift slipped into
    it (by whoever can write the audit storage) makes the broker refuse, not lift."""
    status, _ = _admin(replicas, 0, "/v1/admin/lockdown", {"tenant": "acme"})
    assert status == 200
    own_redis.kill9()
    own_redis.wipe()
    segments = sorted((replicas.folder / "audit").rglob("*.jsonl"))
    assert segments, list((replicas.folder / "audit").rglob("*"))
    seg = segments[-1]
    before = seg.read_bytes()
    forged = {
        "action": "lockdown.lift",
        "detail": {"scope": "acme"},
        "time": "9999-01-01T00:00:00Z",
    }
    seg.write_bytes(before + json.dumps(forged).encode() + b"\n")
    own_redis.start()
    for i in (0, 1):
        status, out = _settled(
            lambda i=i: replicas.call(
                i,
                "POST",
                "/v1/challenge",
                {"tenant": "acme", "artifact": "minilm"},
                TOKENS["trainer"],
            ),
            final=_not_reconciled(replicas, i),
        )
        assert (status, out) == (503, {"error": "state-unavailable"}), (i, status, out)
        assert _not_reconciled(replicas, i)()
    seg.write_bytes(before)
    for i in (0, 1):
        status, out = replicas.call(
            i,
            "POST",
            "/v1/challenge",
            {"tenant": "acme", "artifact": "minilm"},
            TOKENS["trainer"],
        )
        assert (status, out) == (403, {"error": "locked-down"})


# -- a state outage is a 503 refusal, audited and alerted, not a bug --------------------


def _audit_failures(rep: Replicas, i: int) -> float:
    """Replica *i*'s ``sealstore_broker_audit_failures_total`` (0 until one is counted)."""
    port = int(rep.urls[i].rsplit(":", 1)[1])
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=rep.ctx())
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    found = re.search(r"^sealstore_broker_audit_failures_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_item05_redis_down_is_503_state_unavailable_audited_and_alerted(
    replicas: Replicas,
    own_redis: OwnRedis,
    setup: Setup,
    tcti: str,
    webhook: Webhook,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blob = _slot(setup)
    bodies = [_release_body(replicas, i % 2, setup, blob) for i in range(6)]
    own_redis.kill9()
    for i, body in enumerate(bodies):
        status, out = replicas.call(i % 2, "POST", "/v1/release", body, TOKENS["trainer"])
        assert (status, out) == (503, {"error": "state-unavailable"})
    status, out = replicas.call(
        0, "POST", "/v1/challenge", {"tenant": "acme", "artifact": "minilm"}, TOKENS["trainer"]
    )
    assert (status, out) == (503, {"error": "state-unavailable"})
    # Every refusal is an audit record.
    records = list(read_records(open_storage(replicas.folder / "audit")))
    refused = [r for r in records if r.get("decision") == "denied"]
    assert [(r["action"], r["code"], r["who"]) for r in refused] == [
        ("release", "state-unavailable", "trainer")
    ] * 6 + [("challenge", "state-unavailable", "trainer")]
    assert [r["action"] for r in records].count("alert.state-unavailable") == 2
    # The log says what happened, not that the broker has a bug.
    for i in (0, 1):
        text = (replicas.folder / f"replica{i}.log").read_text()
        assert "code=state-unavailable" in text and "ConnectionError" in text
        assert "a bug in the broker" not in text and "code=internal" not in text
    # One alert per replica for the outage, not one per refusal.
    assert _wait_for(lambda: webhook.kinds().count("state-unavailable") == 2)
    time.sleep(0.5)
    assert webhook.kinds().count("state-unavailable") == 2
    # The client reads a 503 as a clear refusal for now (BackendError, CLI exit 6).
    monkeypatch.setenv("SEALSTORE_BROKER_CACERT", str(replicas.pki.ca))
    key = BrokerKey(f"broker+{replicas.urls[0]}/acme/minilm", token=TOKENS["trainer"])
    with pytest.raises(BackendError, match="cannot decide on acme/minilm now: state-unavailable"):
        key.standing()
    # With the audit log down as well, the refusals stand and are counted.
    audit = replicas.folder / "audit" / "audit"
    audit.rename(replicas.folder / "audit-away")
    audit.write_text("not a folder")
    before = _audit_failures(replicas, 1)
    for body in bodies[:2]:
        status, out = replicas.call(1, "POST", "/v1/release", body, TOKENS["trainer"])
        assert (status, out) == (503, {"error": "state-unavailable"})
    assert _audit_failures(replicas, 1) == before + 2
