# ruff: noqa: F811 (the broker tests' fixtures, imported, are parameters here)
"""Reloading a running broker: SIGHUP, watched files, signed bundles, token rotation.

Over the wire: a real ``sealstore broker serve`` subprocess (TLS, its state in
the session's real Redis, its own audit log), releases with swtpm quotes. The
reference values change under it (PCR 16's value in ``pcrs.json``) and the
releases follow; a bad change is refused, audited and counted, and the old
config keeps deciding. In process: a request is decided under one config
even when a reload lands between its authentication and its decision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealstore.audit import read_records, verify_log
from sealstore.enclave.broker.client import BrokerKey, client_context, https_json
from sealstore.enclave.broker.config import BrokerConfig, load_bundle_key
from sealstore.enclave.broker.http import create_app
from sealstore.enclave.broker.reload import Reloader
from sealstore.enclave.broker.server import Broker, BrokerRefusal
from sealstore.errors import FormatError
from sealstore.keys import DataKey
from sealstore.vault.storage import open_storage
from tests.test_broker import (  # noqa: F401 (fixtures)
    CONTEXT,
    TOKENS,
    Pki,
    Setup,
    _body,
    _Clock,
    _free_port,
    _sha,
    pki,
    setup,
    start_broker,
)
from tests.test_cli import fails, ok, run

WRONG_PCRS = {"7": "00" * 32, "16": "ff" * 32}  # not this swtpm's values: tpm-pcr-mismatch


def _iso(seconds_from_now: float) -> str:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds_from_now)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _doc(setup: Setup, folder: Path, redis_url: str, **top: Any) -> dict[str, Any]:
    """The broker test config in *folder*: state in Redis (a fresh prefix), audit beside it."""
    doc = yaml.safe_load(setup.config.read_text())
    doc["state"] = {"url": redis_url, "prefix": f"t-{uuid.uuid4().hex}:"}
    doc["audit"] = {"log": str(folder / "audit")}
    doc["reload"] = {"watch": False}
    doc.update(top)
    (folder / "ak.pem").write_bytes((setup.folder / "ak.pem").read_bytes())
    if not (folder / "pcrs.json").exists():
        (folder / "pcrs.json").write_bytes((setup.folder / "pcrs.json").read_bytes())
    return doc


def _write(path: Path, data: bytes | str) -> None:
    """Replace *path* at once (write aside, rename), as an operator's tooling should."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


@dataclass
class Served:
    proc: subprocess.Popen
    port: int
    config: Path
    log: Path
    ca: Path
    redis_url: str
    prefix: str

    def call(self, path: str, body: dict | None, token: str | None) -> tuple[int, Any]:
        ctx = client_context(str(self.ca), None, None)
        return https_json(
            "127.0.0.1", self.port, ctx, "POST" if body is not None else "GET", path, body, token
        )

    def challenge(self, token: str) -> tuple[int, Any]:
        return self.call("/v1/challenge", {"tenant": "acme", "artifact": "minilm"}, token)

    def release(self, token: str, slot_blob: bytes) -> tuple[int, Any]:
        """A challenge and a release of acme/minilm with a swtpm quote: (status, body)."""
        status, ch = self.challenge(token)
        if status != 200:
            return status, ch
        body, _ = _body(ch, "acme", "minilm", slot_blob)
        return self.call("/v1/release", body, token)

    def metrics(self) -> str:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        url = f"https://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
            return r.read().decode()

    def reloads(self) -> list[dict[str, Any]]:
        """The config.reload records of the audit log, oldest first."""
        storage = open_storage(str(self.config.parent / "audit"))
        return [r for r in read_records(storage) if r.get("action") == "config.reload"]

    def sighup(self, expect: int) -> dict[str, Any]:
        """SIGHUP, then the *expect*-th config.reload record once it is there."""
        self.proc.send_signal(signal.SIGHUP)
        return self.wait_reload(expect)

    def wait_reload(self, expect: int, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.reloads()
            if len(got) >= expect:
                return got[expect - 1]
            time.sleep(0.1)
        pytest.fail(f"no reload record #{expect}:\n{self.log.read_text()}", pytrace=False)


@pytest.fixture
def serve(
    setup: Setup, pki: Pki, tmp_path: Path, redis_url: str, tcti: str
) -> Iterator[Callable[[dict[str, Any]], Served]]:
    """Start `sealstore broker serve` on a config document written to tmp_path/b.yaml."""
    running: list[Served] = []

    def start(doc: dict[str, Any]) -> Served:
        cfg = tmp_path / "b.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        port = _free_port()
        log = tmp_path / f"broker-{port}.log"
        proc = start_broker(cfg, port, log, pki.ca)
        served = Served(proc, port, cfg, log, pki.ca, redis_url, doc["state"]["prefix"])
        running.append(served)
        return served

    yield start
    for s in running:
        s.proc.terminate()
        try:
            s.proc.wait(10)
        except subprocess.TimeoutExpired:
            s.proc.kill()
        with redis.Redis.from_url(redis_url) as r:
            keys = list(r.scan_iter(match=f"{s.prefix}*"))
            if keys:
                r.delete(*keys)


def _slot(setup: Setup) -> bytes:
    uri = f"broker+https://127.0.0.1:1/acme/minilm?key=local:{setup.keyring}"
    return BrokerKey(uri).wrap(DataKey.generate(), CONTEXT).blob


def _sha_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- SIGHUP -----------------------------------------------------------------------------


def test_sighup_reloads_reference_values_and_refuses_a_bad_config(
    setup: Setup, tmp_path: Path, redis_url: str, serve: Callable[[dict], Served]
) -> None:
    (tmp_path / "pcrs.json").write_text(json.dumps(WRONG_PCRS))
    wrong = _sha_file(tmp_path / "pcrs.json")
    b = serve(_doc(setup, tmp_path, redis_url))
    blob, token = _slot(setup), TOKENS["trainer"]
    assert b.release(token, blob) == (403, {"error": "tpm-pcr-mismatch"})

    # The right reference values, then SIGHUP: the next release is granted.
    _write(tmp_path / "pcrs.json", (setup.folder / "pcrs.json").read_bytes())
    rec = first = b.sighup(1)
    assert rec["decision"] == "ok" and rec["detail"]["outcome"] == "applied"
    assert rec["detail"]["trigger"] == "sighup"
    assert rec["detail"]["old_files"] == {"pcrs.json": wrong}
    assert rec["detail"]["new_files"] == {"pcrs.json": _sha_file(tmp_path / "pcrs.json")}
    assert "tenants.acme.artifacts.minilm" in rec["detail"]["changed"]
    assert rec["detail"]["old"] != rec["detail"]["new"]
    status, out = b.release(token, blob)
    assert status == 200 and "sealed" in out

    # A reference file that is not JSON: refused whole, the old config decides.
    _write(tmp_path / "pcrs.json", "{not json")
    rec = b.sighup(2)
    assert (rec["decision"], rec["code"], rec["detail"]["outcome"]) == (
        "denied",
        "config-refused",
        "refused",
    )
    assert "reference_file" in rec["reason"] and "not JSON" in rec["reason"]
    assert rec["detail"]["new_files"] == {"pcrs.json": _sha_file(tmp_path / "pcrs.json")}
    status, out = b.release(token, blob)
    assert status == 200 and "sealed" in out

    # A change that needs a restart (the state's prefix) is refused whole too, even
    # with a good reference file beside it; so is YAML that does not parse.
    _write(tmp_path / "pcrs.json", json.dumps(WRONG_PCRS))
    doc = yaml.safe_load(b.config.read_text())
    doc["state"]["prefix"] = "elsewhere:"
    _write(b.config, yaml.safe_dump(doc))
    rec = b.sighup(3)
    assert (
        rec["detail"]["outcome"] == "refused"
        and "state_prefix changes only on a restart" in (rec["reason"])
    )
    _write(b.config, "server: [unclosed")
    assert b.sighup(4)["detail"]["outcome"] == "refused"
    status, out = b.release(token, blob)
    assert status == 200 and "sealed" in out  # still the right values of reload 1

    metrics = b.metrics()
    assert 'sealstore_broker_config_reloads_total{outcome="applied",trigger="sighup"} 1' in metrics
    assert 'sealstore_broker_config_reloads_total{outcome="refused",trigger="sighup"} 3' in metrics
    assert 'sealstore_broker_alerts_total{kind="config-refused"} 3' in metrics
    assert "refused; " in b.log.read_text() and "stays in force" in b.log.read_text()
    storage = open_storage(str(tmp_path / "audit"))
    assert all(not rep.problems for rep in verify_log(storage))
    starts = [r for r in read_records(storage) if r.get("action") == "config.load"]
    assert len(starts) == 1 and starts[0]["detail"]["digest"] == first["detail"]["old"]


# -- watched files ----------------------------------------------------------------------


def test_a_watched_file_change_reloads_and_a_bad_one_is_refused(
    setup: Setup, tmp_path: Path, redis_url: str, serve: Callable[[dict], Served]
) -> None:
    doc = _doc(setup, tmp_path, redis_url)
    doc["reload"] = {"watch": True, "interval": 0.2}
    b = serve(doc)
    blob, token = _slot(setup), TOKENS["trainer"]
    status, out = b.release(token, blob)
    assert status == 200 and "sealed" in out

    # New reference values land in the file: no signal, the broker sees them.
    _write(tmp_path / "pcrs.json", json.dumps(WRONG_PCRS))
    rec = b.wait_reload(1)
    assert (rec["detail"]["trigger"], rec["detail"]["outcome"]) == ("watch", "applied")
    assert b.release(token, blob) == (403, {"error": "tpm-pcr-mismatch"})

    # A PCR value of the wrong size: refused, and not tried again until it changes.
    _write(tmp_path / "pcrs.json", json.dumps({"7": "00" * 32, "16": "ab"}))
    rec = b.wait_reload(2)
    assert rec["detail"]["outcome"] == "refused" and "32-byte hex" in rec["reason"]
    time.sleep(1.0)
    assert len(b.reloads()) == 2
    assert b.release(token, blob) == (403, {"error": "tpm-pcr-mismatch"})  # the old one

    # A new identity in the config file itself.
    doc["identities"]["late"] = {"token_sha256": _sha("late-token"), "tpm_ak": "ak.pem"}
    doc["tenants"]["acme"]["artifacts"]["minilm"]["identities"].append("late")
    _write(tmp_path / "pcrs.json", (setup.folder / "pcrs.json").read_bytes())
    _write(b.config, yaml.safe_dump(doc))
    rec = b.wait_reload(3)
    assert rec["detail"]["outcome"] == "applied"
    assert "identities.late added" in rec["detail"]["changed"]
    status, out = b.release("late-token", blob)
    assert status == 200 and "sealed" in out
    assert 'config_reloads_total{outcome="applied",trigger="watch"} 2' in b.metrics()


# -- one config per request --------------------------------------------------------------


def _two_configs(setup: Setup, folder: Path) -> tuple[BrokerConfig, BrokerConfig]:
    """X: token T is trainer's, minilm is trainer's. Y: T is intern's, minilm is intern's.

    Under either alone T gets a challenge for minilm; authenticated under X and
    decided under Y (or the reverse), it gets ``not-permitted``.
    """
    out = []
    for owner in ("trainer", "intern"):
        sub = folder / owner
        sub.mkdir()
        doc = yaml.safe_load(setup.config.read_text())
        doc["audit"] = {"log": str(folder / "audit")}
        doc["max_challenges_per_identity"] = 10**6
        doc["identities"]["trainer"]["token_sha256"] = _sha(f"{owner}-only")
        doc["identities"]["intern"]["token_sha256"] = _sha(f"{owner}-other")
        doc["identities"][owner]["token_sha256"] = _sha("T")
        doc["tenants"]["acme"]["artifacts"]["minilm"]["identities"] = [owner]
        for name in ("ak.pem", "pcrs.json"):
            (sub / name).write_bytes((setup.folder / name).read_bytes())
        (sub / "b.yaml").write_text(yaml.safe_dump(doc))
        out.append(BrokerConfig.load(sub / "b.yaml"))
    return out[0], out[1]


def test_a_request_is_decided_under_the_config_it_started_with(
    setup: Setup, tmp_path: Path
) -> None:
    x, y = _two_configs(setup, tmp_path)
    b = Broker(x)
    with b.pinned():
        ident = b.authenticate("T", None)
        b.replace_config(y)  # a reload lands mid-request
        assert "nonce" in b.challenge(ident, "acme", "minilm")
        assert b.config is x
    assert b.config is y and b.authenticate("T", None).name == "intern"
    # Not pinned, the same interleaving mixes them: what the pin prevents.
    b.replace_config(x)
    ident = b.authenticate("T", None)
    b.replace_config(y)
    with pytest.raises(BrokerRefusal) as err:
        b.challenge(ident, "acme", "minilm")
    assert err.value.code == "not-permitted"


def _asgi_post(app: Any, path: str, body: dict, token: str) -> tuple[int, Any]:
    """One HTTP request straight into the ASGI app (the code between uvicorn and Broker)."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8443),
        "headers": [
            (b"authorization", f"Bearer {token}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
        ],
        "state": {},
    }
    sent: list[dict] = []
    fed = False

    async def receive() -> dict:
        nonlocal fed
        if not fed:
            fed = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(data)


def test_over_http_a_reload_between_authentication_and_decision_changes_nothing(
    setup: Setup, tmp_path: Path
) -> None:
    """The app pins each request; the pin follows it into the worker thread that decides."""
    x, y = _two_configs(setup, tmp_path)

    class ReloadMidRequest(Broker):
        def authenticate(self, bearer: str | None, peer_cert: bytes | None) -> Any:
            ident = super().authenticate(bearer, peer_cert)
            self.replace_config(y if self._policy.config is x else x)
            return ident

    b = ReloadMidRequest(x)
    app = create_app(b)
    for _ in range(4):  # X then Y then X ...: each request under the one it started with
        status, out = _asgi_post(
            app, "/v1/challenge", {"tenant": "acme", "artifact": "minilm"}, "T"
        )
        assert status == 200 and "nonce" in out, out


def test_concurrent_requests_during_reloads_never_mix_two_configs(
    setup: Setup, tmp_path: Path
) -> None:
    x, y = _two_configs(setup, tmp_path)
    b = Broker(x)
    stop = threading.Event()
    codes: list[str] = []

    def flip() -> None:
        while not stop.is_set():
            b.replace_config(y if b._policy.config is x else x)

    def ask() -> None:
        for _ in range(300):
            with b.pinned():
                ident = b.authenticate("T", None)
                time.sleep(0)  # let the flipper run between the two
                try:
                    b.challenge(ident, "acme", "minilm")
                    codes.append("ok")
                except BrokerRefusal as exc:
                    codes.append(exc.code)

    flipper = threading.Thread(target=flip)
    flipper.start()
    workers = [threading.Thread(target=ask) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    flipper.join()
    assert codes == ["ok"] * 900


# -- signed bundles ---------------------------------------------------------------------


def _keypair(folder: Path, name: str) -> Path:
    key = Ed25519PrivateKey.generate()
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (folder / f"{name}.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return folder / f"{name}.key"


def test_a_signed_bundle_is_required_at_start_and_on_every_reload(
    setup: Setup, pki: Pki, tmp_path: Path, redis_url: str, serve: Callable[[dict], Served]
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    signer, stranger = _keypair(keys, "signer"), _keypair(keys, "stranger")
    doc = _doc(setup, tmp_path, redis_url, signing={"public_key": str(keys / "signer.pub")})
    doc["reload"] = {"watch": True, "interval": 0.2}
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump(doc))

    # Unsigned, or signed by another key: neither check nor serve takes it.
    assert "unsigned (no b.yaml.sig)" in fails(run("broker", "check", "--config", cfg), 3)
    ok(run("broker", "sign", "--config", cfg, "--key", stranger))
    assert "signed by another key" in fails(run("broker", "check", "--config", cfg), 3)
    port = _free_port()
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("sealstore")),
            "broker",
            "serve",
            "--config",
            str(cfg),
            "--port",
            str(port),
        ],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 3 and b"signed by another key" in proc.stderr

    out = ok(run("broker", "sign", "--config", cfg, "--key", signer)).stdout.decode()
    assert "serial 2, 3 file(s)" in out  # the stranger's was serial 1
    assert "signed bundle, serial 2" in ok(run("broker", "check", "--config", cfg)).stdout.decode()
    b = serve(doc | {})  # the same document: serve rewrites b.yaml byte for byte
    ok(run("broker", "sign", "--config", cfg, "--key", signer, "--serial", "3"))
    first = b.wait_reload(1)
    assert first["detail"]["outcome"] == "applied" and first["detail"]["serial"] == 3
    blob, token = _slot(setup), TOKENS["trainer"]
    status, out = b.release(token, blob)
    assert status == 200 and "sealed" in out
    good_sig = cfg.with_name("b.yaml.sig").read_bytes()
    good_pcrs = (tmp_path / "pcrs.json").read_bytes()

    # New reference values without a signature over them: refused, old in force.
    _write(tmp_path / "pcrs.json", json.dumps(WRONG_PCRS))
    rec = b.wait_reload(2)
    assert rec["detail"]["outcome"] == "refused"
    assert "pcrs.json is not the signed version" in rec["reason"]
    status, out = b.release(token, blob)
    assert status == 200 and "sealed" in out

    # Signed: in force.
    ok(run("broker", "sign", "--config", cfg, "--key", signer))
    rec = b.wait_reload(3)
    assert (rec["detail"]["outcome"], rec["detail"]["serial"]) == ("applied", 4)
    assert b.release(token, blob) == (403, {"error": "tpm-pcr-mismatch"})

    # A tampered signature, then an older bundle replayed whole: both refused.
    sig = json.loads(cfg.with_name("b.yaml.sig").read_text())
    sig["serial"] = 99
    _write(cfg.with_name("b.yaml.sig"), json.dumps(sig))
    rec = b.wait_reload(4)
    assert rec["detail"]["outcome"] == "refused" and "does not verify" in rec["reason"]
    _write(tmp_path / "pcrs.json", good_pcrs)
    _write(cfg.with_name("b.yaml.sig"), good_sig)
    rec = b.wait_reload(5)
    assert rec["detail"]["outcome"] == "refused"
    assert "serial 3 is not above the running 4" in rec["reason"]
    assert b.release(token, blob) == (403, {"error": "tpm-pcr-mismatch"})
    assert "sealstore_broker_config_serial 4" in b.metrics()

    # Nor does a restart take it back: the audit log holds serial 4.
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("sealstore")),
            "broker",
            "serve",
            "--config",
            str(cfg),
            "--port",
            str(_free_port()),
        ],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr.decode()
    assert b"serial 3 is not above 4, already in force by the audit log" in proc.stderr
    b.proc.terminate()
    b.proc.wait(10)

    def start(config: BrokerConfig) -> None:
        """What serve does before it listens: the audit log's checks, then config.load."""
        Reloader(Broker(config), lambda: config).record_start()

    # Another bundle with the serial in force (4) is refused at start, as a reload refuses it.
    _write(tmp_path / "pcrs.json", good_pcrs)
    ok(run("broker", "sign", "--config", cfg, "--key", signer, "--serial", "4"))
    with pytest.raises(FormatError, match="serial 4 is not above 4"):
        start(BrokerConfig.load(cfg))

    # signing: deleted from the config, restarted: refused (the audit log shows key signer's
    # bundles in force), unless the operator overrides it, which is audited.
    unsigned = {k: v for k, v in doc.items() if k != "signing"}
    cfg.write_text(yaml.safe_dump(unsigned))
    plain = BrokerConfig.load(cfg)
    assert plain.signing_key is None
    with pytest.raises(FormatError, match=r"audit log shows bundles signed by key .* unsigned"):
        start(plain)
    # ... or pointed at the attacker's own key: refused the same way.
    cfg.write_text(yaml.safe_dump(doc | {"signing": {"public_key": str(keys / "stranger.pub")}}))
    ok(run("broker", "sign", "--config", cfg, "--key", stranger, "--serial", "50"))
    with pytest.raises(FormatError, match=r"audit log shows bundles signed by key .* signed by"):
        start(BrokerConfig.load(cfg))
    count = len(list(read_records(open_storage(str(tmp_path / "audit")))))
    cfg.write_text(yaml.safe_dump(unsigned))
    start(dataclasses.replace(BrokerConfig.load(cfg), allow_bundle_key_change=True))
    recs = list(read_records(open_storage(str(tmp_path / "audit"))))
    assert len(recs) == count + 1
    load = recs[-1]
    assert load["action"] == "config.load" and load["detail"]["override"] == "bundle-key-change"
    assert load["detail"].get("key") is None and load["detail"]["previous_key"]

    # The key pinned outside the config (env or --bundle-key): an unsigned config, or one
    # signed by another key, does not even load.
    cfg.with_name("b.yaml.sig").unlink()
    for env, extra in (
        ({"SEALSTORE_BROKER_BUNDLE_KEY": str(keys / "signer.pub")}, []),
        ({}, ["--bundle-key", str(keys / "signer.pub")]),
    ):
        proc = subprocess.run(
            [
                str(Path(sys.executable).with_name("sealstore")),
                "broker",
                "serve",
                "--config",
                str(cfg),
                "--port",
                str(_free_port()),
                *extra,
            ],
            capture_output=True,
            timeout=60,
            env=dict(os.environ, **env),
        )
        assert proc.returncode == 3, proc.stderr.decode()
        assert b"unsigned (no b.yaml.sig)" in proc.stderr
    with pytest.raises(FormatError, match="unsigned"):
        BrokerConfig.load(cfg, bundle_key=load_bundle_key(keys / "signer.pub"))
    cfg.write_text(yaml.safe_dump(doc | {"signing": {"public_key": str(keys / "stranger.pub")}}))
    with pytest.raises(FormatError, match="not the bundle key pinned outside the config"):
        BrokerConfig.load(cfg, bundle_key=load_bundle_key(keys / "signer.pub"))
    ok(run("broker", "sign", "--config", cfg, "--key", stranger, "--serial", "51"))
    cfg.write_text(yaml.safe_dump(unsigned))  # the stranger's signature beside it
    with pytest.raises(FormatError, match="signed by another key"):
        BrokerConfig.load(cfg, bundle_key=load_bundle_key(keys / "signer.pub"))
    ok(run("broker", "sign", "--config", cfg, "--key", signer, "--serial", "52"))
    pinned = BrokerConfig.load(cfg, bundle_key=load_bundle_key(keys / "signer.pub"))
    assert pinned.bundle_serial == 52 and pinned.bundle_key_pinned


# -- bearer tokens ------------------------------------------------------------------------


def test_a_token_rotation_overlaps_then_the_old_token_expires(
    setup: Setup, tmp_path: Path, redis_url: str, serve: Callable[[dict], Served]
) -> None:
    old, new = "old-" + uuid.uuid4().hex, "new-" + uuid.uuid4().hex
    doc = _doc(setup, tmp_path, redis_url)
    trainer = doc["identities"]["trainer"]
    trainer.pop("token_sha256")
    trainer["tokens"] = [{"sha256": _sha(old), "not_after": _iso(3600)}]
    b = serve(doc)
    assert b.challenge(old)[0] == 200
    assert b.challenge(new) == (401, {"error": "unauthenticated"})

    # Step 1: the new token is added; the old one ends in a few seconds.
    trainer["tokens"] = [
        {"sha256": _sha(old), "not_after": _iso(4)},
        {"sha256": _sha(new), "not_after": _iso(86400)},
    ]
    _write(b.config, yaml.safe_dump(doc))
    assert b.sighup(1)["detail"]["changed"] == ["identities.trainer"]
    assert b.challenge(old)[0] == 200 and b.challenge(new)[0] == 200  # the overlap
    gauge = re.search(r"^sealstore_broker_token_next_expiry (\S+)$", b.metrics(), re.M)
    assert gauge and abs(float(gauge[1]) - (time.time() + 4)) < 1e4  # the old one's end

    # The overlap ends: the old token is refused with its own code, and audited.
    deadline = time.monotonic() + 15
    while b.challenge(old)[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b.challenge(old) == (401, {"error": "token-expired"})
    status, out = b.release(new, _slot(setup))
    assert status == 200 and "sealed" in out
    storage = open_storage(str(tmp_path / "audit"))
    expired = [r for r in read_records(storage) if r.get("code") == "token-expired"]
    assert expired and expired[0]["who"] == "trainer" and expired[0]["decision"] == "denied"
    assert old not in json.dumps(expired) and _sha(old) not in json.dumps(expired)
    assert 'token_refusals_total{code="token-expired"}' in b.metrics()

    # Step 2: the old token is dropped from the list: now simply unknown.
    trainer["tokens"] = trainer["tokens"][1:]
    _write(b.config, yaml.safe_dump(doc))
    assert b.sighup(2)["detail"]["outcome"] == "applied"
    assert b.challenge(old) == (401, {"error": "unauthenticated"})
    assert b.challenge(new)[0] == 200
    assert old not in b.log.read_text() and new not in b.log.read_text()


def test_token_lists_are_checked(setup: Setup, tmp_path: Path) -> None:
    def load(tokens: Any) -> BrokerConfig:
        doc = yaml.safe_load(setup.config.read_text())
        doc["identities"]["trainer"]["tokens"] = tokens
        (tmp_path / "ak.pem").write_bytes((setup.folder / "ak.pem").read_bytes())
        (tmp_path / "pcrs.json").write_bytes((setup.folder / "pcrs.json").read_bytes())
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(doc))
        return BrokerConfig.load(tmp_path / "b.yaml")

    for bad, message in [
        ([{"sha256": _sha("a"), "not_after": "2030-01-01T00:00:00"}], "with its zone"),
        ([{"sha256": _sha("a")}], "missing field 'not_after'"),
        ([{"sha256": "abc", "not_after": "2030-01-01T00:00:00Z"}], "32-byte hex"),
        (
            [{"sha256": _sha(TOKENS["intern"]), "not_after": "2030-01-01T00:00:00Z"}],
            "the same as (trainer|intern)'s",
        ),
        ([{"sha256": _sha("a"), "not_after": "2030-01-01T00:00:00Z"}] * 2, "given twice"),
        ([], "non-empty list"),
    ]:
        with pytest.raises(FormatError, match=message):
            load(bad)
    # An unquoted YAML time is a datetime to YAML: taken too. A clock past it refuses.
    config = load([{"sha256": _sha("a"), "not_after": dt.datetime(2030, 1, 1, tzinfo=dt.UTC)}])
    clock = _Clock()
    clock.now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp() - 1
    b = Broker(config, clock=clock)
    assert b.authenticate("a", None).name == "trainer"
    assert b.authenticate(TOKENS["trainer"], None).name == "trainer"  # token_sha256: no end
    clock.now += 1
    with pytest.raises(BrokerRefusal) as err:
        b.authenticate("a", None)
    assert (err.value.code, err.value.status) == ("token-expired", 401)


def test_sign_refuses_what_is_not_an_ed25519_private_key(
    setup: Setup, pki: Pki, tmp_path: Path
) -> None:
    doc = yaml.safe_load(setup.config.read_text())
    for name in ("ak.pem", "pcrs.json"):
        (tmp_path / name).write_bytes((setup.folder / name).read_bytes())
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    encrypted = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass phrase"),
    )
    (tmp_path / "enc.key").write_bytes(encrypted)
    for key, message in [
        (tmp_path / "ak.pem", "not a PEM private key"),
        (tmp_path / "enc.key", "encrypted: set SEALSTORE_BUNDLE_PASSPHRASE"),
        (pki.server_key, "not an Ed25519 key"),
    ]:
        assert message in fails(run("broker", "sign", "--config", cfg, "--key", key), 2)
    assert not cfg.with_name("b.yaml.sig").exists()
    ok(
        run(
            "broker",
            "sign",
            "--config",
            cfg,
            "--key",
            tmp_path / "enc.key",
            env={"SEALSTORE_BUNDLE_PASSPHRASE": "pass phrase"},
        )
    )
    sig = json.loads(cfg.with_name("b.yaml.sig").read_text())
    assert sig["serial"] == 1 and set(sig["files"]) == {"b.yaml", "ak.pem", "pcrs.json"}
    assert "pass phrase" not in json.dumps(sig)
