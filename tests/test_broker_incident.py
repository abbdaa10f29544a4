# ruff: noqa: F811 (the broker tests' fixtures, imported, are parameters here)
"""Incident response at the broker: detectors, lockdown, roles, replicas on one Redis, audit.

In process (a fake clock, in-process state): every detector fires and clears.
Over the wire (real `sealstore broker serve` replicas sharing the real Redis
server, swtpm evidence): a nonce is single use across replicas, a lockout on
one holds on the other, a lockdown stops a running loader's next release, and
200 concurrent releases on two replicas all reach the audit log.
"""

# ruff: noqa: F811 (the broker tests' fixtures, imported, are parameters here)
from __future__ import annotations

import contextlib
import http.server
import json
import ssl
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sealstore.audit import read_records, verify_log
from sealstore.enclave.broker.client import BrokerKey, https_json
from sealstore.enclave.broker.config import BrokerConfig
from sealstore.enclave.broker.server import Broker, BrokerRefusal
from sealstore.errors import KeyReleaseDenied
from sealstore.keys import DataKey
from sealstore.vault.storage import open_storage
from tests.conftest import extend_pcr16
from tests.test_broker import (  # noqa: F401 (fixtures)
    CONTEXT,
    TOKENS,
    Pki,
    Setup,
    _Clock,
    _code,
    _free_port,
    _minilm,
    _sha,
    _tpm_request,
    pki,
    setup,
    start_broker,
)
from tests.test_cli import fails, ok, run

ADMIN = "ops-" + uuid.uuid4().hex


class Webhook:
    """An HTTP server on 127.0.0.1 that keeps the alerts POSTed to it."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("content-length", "0"))
                hook.alerts.append(json.loads(self.rfile.read(size)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kinds(self) -> list[str]:
        return [a["alert"] for a in self.alerts]


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()


def _config(setup: Setup, folder: Path, **top: Any) -> Path:
    """The broker test config plus an admin identity and *top* sections, in *folder*."""
    doc = yaml.safe_load(setup.config.read_text())
    doc["identities"]["ops"] = {"token_sha256": _sha(ADMIN), "roles": {"*": "admin"}}
    doc["audit"] = {"log": str(folder / "audit")}
    doc.update(top)
    for name in ("ak.pem", "pcrs.json"):
        (folder / name).write_bytes((setup.folder / name).read_bytes())
    (folder / "b.yaml").write_text(yaml.safe_dump(doc))
    return folder / "b.yaml"


def _slot(setup: Setup, artifact: str = "minilm") -> bytes:
    uri = f"broker+https://127.0.0.1:1/acme/{artifact}?key=local:{setup.keyring}"
    return BrokerKey(uri).wrap(DataKey.generate(), CONTEXT).blob


def _bad(req: dict) -> dict:
    return dict(req, evidence=dict(req["evidence"], attest="AAAA"))


# -- in process: detectors fire and clear ---------------------------------------------


def test_attestation_failures_lock_out_then_clear(
    setup: Setup, tcti: str, tmp_path: Path, webhook: Webhook
) -> None:
    cfg = _config(
        setup,
        tmp_path,
        alerts={"webhook": webhook.url},
        detectors={"attestation_failures": {"max": 3, "window": 60, "lockout": 120}},
    )
    clock = _Clock()
    b = Broker(BrokerConfig.load(cfg), clock=clock)
    blob = _slot(setup)
    for _ in range(3):
        assert _code(b, "trainer", _bad(_tpm_request(b, "trainer", blob))) == "tpm-signature"
    with pytest.raises(BrokerRefusal) as err:
        b.challenge(b.config.identities["trainer"], "acme", "minilm")
    assert err.value.code == "locked-out"
    # Another identity is not affected.
    assert "sealed" in b.release(
        b.config.identities["intern"], _tpm_request(b, "intern", _slot(setup, "notes"), "notes")
    )
    assert b.alerts.flush() and webhook.kinds() == ["lockout"]
    assert webhook.alerts[0]["identity"] == "trainer"
    assert 'sealstore_broker_alerts_total{kind="lockout"} 1.0' in b.metrics.render().splitlines()
    assert "sealstore_broker_lockouts 1.0" in b.metrics.render().splitlines()
    clock.now += 121  # the lockout ends by itself
    assert "sealed" in b.release(b.config.identities["trainer"], _tpm_request(b, "trainer", blob))
    # Failures outside the window do not add up.
    for _ in range(2):
        _code(b, "trainer", _bad(_tpm_request(b, "trainer", blob)))
    clock.now += 61
    _code(b, "trainer", _bad(_tpm_request(b, "trainer", blob)))
    b.challenge(b.config.identities["trainer"], "acme", "minilm")
    # Lifted by an admin before its time (the failure just now still counts).
    for _ in range(2):
        _code(b, "trainer", _bad(_tpm_request(b, "trainer", blob)))
    assert b.state.lockout("trainer")
    b.lift(b.config.identities["ops"], identity="trainer")
    b.challenge(b.config.identities["trainer"], "acme", "minilm")
    records = list(read_records(open_storage(tmp_path / "audit")))
    assert [r["action"] for r in records].count("alert.lockout") == 2
    assert any(r["action"] == "lockout.lift" and r["who"] == "ops" for r in records)


def test_release_rate_far_above_usual_is_throttled_then_clears(
    setup: Setup, tcti: str, tmp_path: Path, webhook: Webhook
) -> None:
    cfg = _config(
        setup,
        tmp_path,
        alerts={"webhook": webhook.url},
        detectors={
            "release_rate": {"bucket": 10, "history": 6, "factor": 3, "floor": 4, "throttle": 30}
        },
    )
    clock = _Clock()
    b = Broker(BrokerConfig.load(cfg), clock=clock)
    trainer, blob = b.config.identities["trainer"], _slot(setup)
    for _ in range(6):  # the usual rate: 2 per bucket
        for _ in range(2):
            assert "sealed" in b.release(trainer, _tpm_request(b, "trainer", blob))
        clock.now += 10
    for _ in range(6):  # up to max(3 x 2, 4) = 6 in one bucket
        assert "sealed" in b.release(trainer, _tpm_request(b, "trainer", blob))
    assert _code(b, "trainer", _tpm_request(b, "trainer", blob)) == "throttled"
    with pytest.raises(BrokerRefusal) as err:
        b.challenge(trainer, "acme", "minilm")
    assert (err.value.code, err.value.status) == ("throttled", 429)
    assert b.alerts.flush() and webhook.kinds() == ["throttle"]
    assert "usual 2.0" in webhook.alerts[0]["reason"]
    clock.now += 31  # the throttle ends; the spike's bucket is over
    assert "sealed" in b.release(trainer, _tpm_request(b, "trainer", blob))
    text = b.metrics.render().splitlines()
    assert 'sealstore_broker_releases_total{code="throttled",result="denied"} 1.0' in text
    assert 'sealstore_broker_alerts_total{kind="throttle"} 1.0' in text


def test_changed_evidence_for_a_known_machine_alerts(
    setup: Setup, tcti: str, tmp_path: Path, webhook: Webhook
) -> None:
    cfg = _config(setup, tmp_path, alerts={"webhook": webhook.url})
    b = Broker(BrokerConfig.load(cfg))
    blob = _slot(setup)
    trainer = b.config.identities["trainer"]
    assert "sealed" in b.release(trainer, _tpm_request(b, "trainer", blob))
    assert "sealed" in b.release(trainer, _tpm_request(b, "trainer", blob))
    assert b.alerts.flush() and webhook.kinds() == []  # same machine, same measurements
    extend_pcr16()  # the machine now measures something else: refused, and alerted
    assert _code(b, "trainer", _tpm_request(b, "trainer", blob)) == "tpm-pcr-mismatch"
    assert b.alerts.flush() and webhook.kinds() == ["evidence-changed"]
    alert = webhook.alerts[0]
    assert alert["machine"] == "tpm:trainer" and alert["before"] != alert["now"]
    # The same changed evidence again is no news.
    _code(b, "trainer", _tpm_request(b, "trainer", blob))
    assert b.alerts.flush() and webhook.kinds() == ["evidence-changed"]


def test_roles_and_lockdown_in_process(setup: Setup, tcti: str, tmp_path: Path) -> None:
    b = Broker(BrokerConfig.load(_config(setup, tmp_path)))
    ops, trainer = b.config.identities["ops"], b.config.identities["trainer"]
    # Least privilege: trainer is a reader where a rule names it, and no admin.
    assert trainer.roles == {"acme": "reader"}
    with pytest.raises(BrokerRefusal) as err:
        b.lockdown(trainer, "acme")
    assert err.value.code == "not-permitted"
    with pytest.raises(BrokerRefusal) as err:
        b.challenge(b.config.identities["globex-bot"], "acme", "minilm")
    assert err.value.code == "not-permitted"
    blob = _slot(setup)
    req = _tpm_request(b, "trainer", blob)  # a challenge issued before the lockdown
    b.lockdown(ops, "acme", "suspected key theft")
    assert _code(b, "trainer", req) == "locked-down"
    with pytest.raises(BrokerRefusal) as err:
        b.challenge(trainer, "acme", "minilm")
    assert err.value.code == "locked-down"
    b.lift(ops, "acme")
    assert "sealed" in b.release(trainer, _tpm_request(b, "trainer", blob))
    b.lockdown(ops, "*")
    for who, tenant in (("trainer", "acme"), ("globex-bot", "globex")):
        with pytest.raises(BrokerRefusal) as err:
            b.challenge(b.config.identities[who], tenant, "minilm")
        assert err.value.code == "locked-down"
    b.lift(ops, "*")
    actions = [r["action"] for r in read_records(open_storage(tmp_path / "audit"))]
    assert {"lockdown", "lockdown.lift", "release", "challenge"} <= set(actions)


def test_a_release_is_not_made_without_its_audit_record(
    setup: Setup, tcti: str, tmp_path: Path
) -> None:
    cfg = _config(setup, tmp_path)
    b = Broker(BrokerConfig.load(cfg))
    blob = _slot(setup)
    req = _tpm_request(b, "trainer", blob)
    # The log's folder becomes a file: no record can be written.
    b.audit.storage = open_storage(tmp_path / "blocked")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "audit").write_text("not a folder")
    b.audit._head = None
    assert _code(b, "trainer", req) == "audit-unavailable"
    assert "sealstore_broker_audit_failures_total 1.0" in b.metrics.render().splitlines()


# -- over the wire: two replicas on one Redis -----------------------------------------


@dataclass
class Replicas:
    urls: list[str]
    config: Path
    folder: Path
    procs: list[subprocess.Popen]
    pki: Pki

    def ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca))

    def call(self, i: int, method: str, path: str, body: dict | None, token: str) -> tuple:
        port = int(self.urls[i].rsplit(":", 1)[1])
        return https_json("127.0.0.1", port, self.ctx(), method, path, body, token)


@contextmanager
def two_replicas(
    setup: Setup, pki: Pki, tmp_path: Path, redis_url: str, webhook: Webhook, prefix: str
) -> Iterator[Replicas]:
    """Two ``sealstore broker serve`` replicas sharing the Redis at *redis_url*."""
    cfg = _config(
        setup,
        tmp_path,
        state={"url": redis_url, "prefix": prefix},
        max_challenges_per_identity=1000,
        alerts={"webhook": webhook.url},
        detectors={
            "attestation_failures": {"max": 3, "window": 60, "lockout": 600},
            "release_rate": {"floor": 100_000},
        },
    )
    ports = [_free_port(), _free_port()]
    procs: list[subprocess.Popen] = []
    try:
        for i, port in enumerate(ports):
            procs.append(start_broker(cfg, port, tmp_path / f"replica{i}.log", pki.ca))
        yield Replicas([f"https://127.0.0.1:{p}" for p in ports], cfg, tmp_path, procs, pki)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def replicas(
    setup: Setup, pki: Pki, tmp_path: Path, redis_url: str, webhook: Webhook
) -> Iterator[Replicas]:
    prefix = f"t-{uuid.uuid4().hex}:"
    try:
        with two_replicas(setup, pki, tmp_path, redis_url, webhook, prefix) as rep:
            yield rep
    finally:
        import redis

        r = redis.Redis.from_url(redis_url)
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)


def _release_body(rep: Replicas, i: int, setup: Setup, blob: bytes) -> dict:
    from tests.test_broker import _body

    status, ch = rep.call(
        i, "POST", "/v1/challenge", {"tenant": "acme", "artifact": "minilm"}, TOKENS["trainer"]
    )
    assert status == 200, ch
    return _body(ch, "acme", "minilm", blob)[0]


def test_two_replicas_share_nonces_and_lockouts(
    replicas: Replicas, setup: Setup, tcti: str, webhook: Webhook
) -> None:
    blob = _slot(setup)
    req = _release_body(replicas, 0, setup, blob)  # issued by replica 0 ...
    status, out = replicas.call(1, "POST", "/v1/release", req, TOKENS["trainer"])
    assert status == 200 and "sealed" in out  # ... released by replica 1
    for i in (0, 1):  # ... and used up on both
        status, out = replicas.call(i, "POST", "/v1/release", req, TOKENS["trainer"])
        assert (status, out) == (403, {"error": "challenge-unknown"})
    # Three failures spread over both replicas lock trainer out on both.
    for i in (0, 1, 0):
        status, out = replicas.call(
            i,
            "POST",
            "/v1/release",
            _bad(_release_body(replicas, i, setup, blob)),
            TOKENS["trainer"],
        )
        assert out == {"error": "tpm-signature"}
    for i in (0, 1):
        status, out = replicas.call(
            i, "POST", "/v1/challenge", {"tenant": "acme", "artifact": "minilm"}, TOKENS["trainer"]
        )
        assert (status, out) == (403, {"error": "locked-out"})
    deadline = time.monotonic() + 10
    while "lockout" not in webhook.kinds() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert webhook.kinds().count("lockout") == 1  # one alert, though two replicas saw failures
    # The operator lifts it through the shared state, on neither replica.
    text = ok(run("lockdown", "status", "--config", replicas.config)).stdout.decode()
    assert "locked out trainer" in text
    ok(run("lockdown", "lift", "--identity", "trainer", "--config", replicas.config))
    status, _ = replicas.call(
        1, "POST", "/v1/challenge", {"tenant": "acme", "artifact": "minilm"}, TOKENS["trainer"]
    )
    assert status == 200
    # Metrics: on this host only, each replica its own counters.
    port = int(replicas.urls[0].rsplit(":", 1)[1])
    import http.client

    conn = http.client.HTTPSConnection("127.0.0.1", port, context=replicas.ctx())
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode().splitlines()
    assert 'sealstore_broker_releases_total{code="tpm-signature",result="denied"} 2.0' in text
    assert "sealstore_broker_lockouts 0.0" in text
    # From another address (127.0.0.2 is not this host's loopback address 127.0.0.1 to
    # the broker's check) the admin API and the metrics are refused: no remote root.
    conn = http.client.HTTPSConnection(
        "127.0.0.1", port, context=replicas.ctx(), source_address=("127.0.0.2", 0)
    )
    conn.request(
        "POST",
        "/v1/admin/lockdown",
        body=json.dumps({"all": True}),
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())) == (403, {"error": "remote-disabled"})


def test_lockdown_stops_a_running_loaders_next_release(
    replicas: Replicas, setup: Setup, tcti: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealstore.kms.envelope import configure_cache
    from sealstore.loaders import load_file

    monkeypatch.setenv("SEALSTORE_BROKERS", replicas.urls[0])
    monkeypatch.setenv("SEALSTORE_BROKER_CACERT", str(replicas.pki.ca))
    monkeypatch.setenv("SEALSTORE_BROKER_TOKEN", TOKENS["trainer"])
    configure_cache(None)  # every load asks the broker: nothing kept from the last one
    sealed = tmp_path / "minilm.seal"
    uri = f"broker+{replicas.urls[0]}/acme/minilm?key=local:{setup.keyring}"
    ok(run("encrypt", "-k", uri, "-o", sealed, _minilm()))
    results: list[str] = []
    stop = threading.Event()
    declared = threading.Event()

    def loader() -> None:  # a serving process reloading its model
        while not stop.is_set():
            try:
                load_file(sealed)
                results.append("after" if declared.is_set() else "ok")
            except KeyReleaseDenied as exc:
                results.append(str(exc))
                return

    t = threading.Thread(target=loader)
    t.start()
    deadline = time.monotonic() + 30
    while "ok" not in results and time.monotonic() < deadline:
        time.sleep(0.05)
    # The kill switch, through the *other* replica's admin API.
    env = {"SEALSTORE_BROKER_CACERT": str(replicas.pki.ca), "SEALSTORE_BROKER_TOKEN": ADMIN}
    out = ok(
        run(
            "lockdown",
            "--tenant",
            "acme",
            "--reason",
            "drill",
            "--broker",
            replicas.urls[1],
            env=env,
        )
    ).stdout.decode()
    declared.set()
    assert "lockdown acme: drill" in out
    t.join(30)
    stop.set()
    assert not t.is_alive()
    assert "locked-down" in results[-1]
    assert results.count("after") <= 1  # at most the load already past its release
    # A reader-only identity cannot declare one; lift ends it.
    line = fails(
        run(
            "lockdown",
            "--all",
            "--broker",
            replicas.urls[1],
            env={**env, "SEALSTORE_BROKER_TOKEN": TOKENS["trainer"]},
        ),
        4,
    )
    assert "not-permitted" in line
    ok(run("lockdown", "lift", "--tenant", "acme", "--broker", replicas.urls[0], env=env))
    load_file(sealed)


def test_200_concurrent_releases_on_two_replicas_are_all_audited(
    replicas: Replicas, setup: Setup, tcti: str
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    blob = _slot(setup)
    n = 200
    bodies = [(i % 2, _release_body(replicas, i % 2, setup, blob)) for i in range(n)]
    gate = threading.Barrier(min(n, 64))

    def one(item: tuple[int, dict]) -> tuple[int, float]:
        i, body = item
        with contextlib.suppress(threading.BrokenBarrierError):
            gate.wait(5)
        t0 = time.perf_counter()
        status, _ = replicas.call(1 - i, "POST", "/v1/release", body, TOKENS["trainer"])
        return status, time.perf_counter() - t0

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, bodies))
    assert [s for s, _ in results] == [200] * n
    lat = sorted(t for _, t in results)
    p95 = lat[int(0.95 * n) - 1]
    print(
        f"\n200 releases on two replicas: median {statistics.median(lat) * 1000:.1f} ms, "
        f"p95 {p95 * 1000:.1f} ms"
    )
    log = open_storage(replicas.folder / "audit")
    granted = [
        r for r in read_records(log) if r["action"] == "release" and r["decision"] == "granted"
    ]
    assert len(granted) == n  # none lost
    reports = verify_log(log)
    assert len(reports) == 2 and all(not r.problems for r in reports)
