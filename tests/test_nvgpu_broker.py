"""Composite evidence at the broker: a CPU TEE's evidence plus NVIDIA GPU reports in one release.

The GPU reports are NVIDIA's real samples, so their SPDM nonce is fixed
(``4cff7f53...``, the 2023 H100 report). The broker takes the GPU's nonce to
be the challenge's nonce itself, so a test runs a real report through the
whole protocol by having the broker issue that nonce: the ``nonces=`` seam
of :class:`Broker` (Python only; no config or command line reaches it).
Everything else is real: the challenge is single use in the real Redis,
the TPM quote comes from swtpm, TLS is uvicorn's, the client is
:class:`BrokerKey`. A broker issuing random nonces (the default) refuses the
same report: ``nvgpu-nonce``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.public
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from sealstore.audit import read_records
from sealstore.enclave.attestation import tpm
from sealstore.enclave.attestation.certs import load_certificates
from sealstore.enclave.attestation.tpm_quote import ak_public
from sealstore.enclave.broker import release
from sealstore.enclave.broker.client import BrokerKey
from sealstore.enclave.broker.config import BrokerConfig
from sealstore.enclave.broker.server import Broker, BrokerRefusal
from sealstore.errors import AttestationError, FormatError, KeyReleaseDenied
from sealstore.keys import DataKey
from tests.conftest import make_keyring
from tests.test_broker import TCB, _issue, _resign, _sha
from tests.test_enclave_evidence import _signed_report, make_own_chain
from tests.test_nvgpu import DATA, DRIVER_RIM, NONCE_2023, VBIOS_RIM, OwnChain, sample
from tests.uvicorn_thread import free_port, uvicorn_running

CONTEXT = {"purpose": "gpu-direct load"}
TOKEN = "gpu-node-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA (ca.pem) and the broker's certificate for 127.0.0.1 (server.pem, server.key)."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _issue(d, "ca", "sealstore test CA", None)
    _issue(d, "server", "127.0.0.1", (ca_key, ca.subject), server=True)
    return d


def _gpu_rule(**extra: Any) -> dict:
    return {
        "driver_rims": [str(DATA / DRIVER_RIM)],
        "vbios_rims": [str(DATA / VBIOS_RIM)],
        "min_driver": "545.00",
        "min_vbios": "96.00.5e.00.01",
        # The 2023 RIMs' signer certificates ended in mid-2025.
        "rims_valid_at": "2025-01-01T00:00:00+00:00",
        **extra,
    }


def _config(folder: Path, tls: Path, rule: dict, **top: Any) -> Path:
    make_keyring(folder / "keyring.json")
    doc = {
        "server": {
            "host": "127.0.0.1",
            "tls_cert": str(tls / "server.pem"),
            "tls_key": str(tls / "server.key"),
        },
        "identities": {"gpu-node": {"token_sha256": _sha(TOKEN)}},
        "tenants": {
            "acme": {
                "keys": [f"local:{folder / 'keyring.json'}"],
                "artifacts": {"llama": {"identities": ["gpu-node"], **rule}},
            }
        },
        # Many refusals in a row here are the point, not an attack to lock out.
        "detectors": {"attestation_failures": {"max": 1000}},
        **top,
    }
    (folder / "broker.yaml").write_text(yaml.safe_dump(doc))
    return folder / "broker.yaml"


SNP_GPU = {
    "evidence": ["snp+nvidia-gpu"],
    "snp": {"measurements": ["00" * 48], "min_tcb": TCB},
    "nvidia-gpu": _gpu_rule(),
}


# -- the policy ------------------------------------------------------------------------


def test_a_rule_joins_gpu_evidence_to_a_cpu_kind(tmp_path: Path, tls: Path) -> None:
    cfg = BrokerConfig.load(_config(tmp_path, tls, SNP_GPU))
    rule = cfg.tenants["acme"].rule("llama")
    assert rule is not None and rule.evidence == ("snp+nvidia-gpu",)
    assert rule.nvgpu is not None and rule.nvgpu.min_driver == "545.00"
    assert [r.version for r in rule.nvgpu.vbios_rims] == ["96.00.5e.00.01"]
    assert any("rims_valid_at" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(evidence=["nvidia-gpu"]), "unknown kind 'nvidia-gpu'"),
        (lambda r: r.update(evidence=["snp+gpu"]), "unknown kind 'snp+gpu'"),
        (lambda r: r.update(evidence=["snp"]), "nvidia-gpu: reference values for a kind not in"),
        (lambda r: r.pop("nvidia-gpu"), "needs its reference values under nvidia-gpu:"),
        (lambda r: r["nvidia-gpu"].pop("min_vbios"), "missing field 'min_vbios'"),
        (lambda r: r["nvidia-gpu"].update(min_driver="new"), "is not a version"),
        (lambda r: r["nvidia-gpu"].update(modes=["cc"]), "expected a list of spt, mpt, ppcie"),
        (lambda r: r["nvidia-gpu"].update(gpus=0), "gpus: expected an integer from 1"),
        (lambda r: r["nvidia-gpu"].pop("rims_valid_at"), "driver_rims[0]: the RIM"),  # expired
        (
            lambda r: r["nvidia-gpu"].update(vbios_rims=[str(DATA / DRIVER_RIM)]),
            "both measure index",
        ),
        (
            lambda r: r["nvidia-gpu"].update(
                driver_rims=[str(DATA / "rims/incorrect_signature_driver_rim.xml")]
            ),
            "the signature does not verify",
        ),
        (
            lambda r: r["nvidia-gpu"].update(
                driver_rims=[str(DATA / "rims/incorrect_cert_chain_driver_rim.xml")]
            ),
            "not to NVIDIA's pinned root",
        ),
    ],
)
def test_gpu_policy_errors_name_the_field(tmp_path: Path, tls: Path, change, message) -> None:
    rule = json.loads(json.dumps(SNP_GPU))
    change(rule)
    with pytest.raises(FormatError, match=None) as err:
        BrokerConfig.load(_config(tmp_path, tls, rule))
    assert message in str(err.value), str(err.value)
    assert "artifacts.llama" in str(err.value)


# -- SEV-SNP and GPU evidence, in process ---------------------------------------------------


class Cvm:
    """A confidential VM with one H100: SEV-SNP reports signed by our own AMD-like chain
    (pinned in the broker instead of AMD's), the GPU's real report."""

    def __init__(self, broker: Broker, slot_blob: bytes, own: dict) -> None:
        self.broker = broker
        self.own = own
        self.slot = json.loads(slot_blob)
        self.who = broker.config.identities["gpu-node"]

    def request(
        self,
        gpus: list[tuple[bytes, bytes]] | None = None,
        kind: str = "snp+nvidia-gpu",
        gpu_key: str = release.GPU_KIND,
    ) -> tuple[dict, nacl.public.PrivateKey]:
        ch = self.broker.challenge(self.who, "acme", "llama")
        secret = nacl.public.PrivateKey.generate()
        public = bytes(secret.public_key)
        nonce = base64.b64decode(ch["nonce"])
        report = bytearray(
            _signed_report(self.own["key"], self.own["chip"], bytes([3, 0, 0, 0, 0, 0, 8, 0x73]))
        )
        report[0x50:0x90] = release.binding(nonce, public, "snp")
        der = {
            k: release.b64e(self.own[k].public_bytes(Encoding.DER)) for k in ("vcek", "ask", "ark")
        }
        signed = _resign(bytes(report), self.own["key"])
        ev: dict[str, Any] = {"kind": kind, "certs": der, "report": release.b64e(signed)}
        if gpus is None:
            gpus = [sample("hopper-2023")]
        ev[gpu_key] = [{"report": release.b64e(r), "certs": release.b64e(c)} for r, c in gpus]
        body = {
            "tenant": "acme",
            "artifact": "llama",
            "nonce": ch["nonce"],
            "public_key": release.b64e(public),
            "evidence": ev,
            "slot": self.slot,
            "context": CONTEXT,
        }
        return body, secret

    def code(self, req: dict) -> str:
        with pytest.raises(BrokerRefusal) as err:
            self.broker.release(self.who, req)
        return err.value.code


def _wrap(cfg: Path) -> tuple[DataKey, Any]:
    uri = f"broker+https://127.0.0.1:1/acme/llama?key=local:{cfg.parent / 'keyring.json'}"
    dek = DataKey.generate()
    return dek, BrokerKey(uri).wrap(dek, CONTEXT)


def test_snp_with_the_real_h100_report_is_released(tmp_path: Path, tls: Path) -> None:
    cfg = _config(tmp_path, tls, SNP_GPU)
    dek, slot = _wrap(cfg)
    own = make_own_chain()
    b = Broker(BrokerConfig.load(cfg), snp_roots=own["roots"], nonces=lambda: NONCE_2023)
    cvm = Cvm(b, slot.blob, own)
    req, secret = cvm.request()
    out = b.release(cvm.who, req)
    nonce = base64.b64decode(req["nonce"])
    opened = release.open_answer(
        out, bytes(secret), nonce=nonce, tenant=req["tenant"], artifact=req["artifact"]
    )
    assert opened == dek.material()
    # The same evidence without the GPU, or the GPU alone, is not what the rule asks for.
    req, _ = cvm.request(kind="snp")
    assert cvm.code(req) == "evidence-kind"
    req, _ = cvm.request(gpu_key="gpus")
    assert cvm.code(req) == "evidence-format"
    req, _ = cvm.request(gpus=[])
    assert cvm.code(req) == "evidence-format"
    # A GPU report with a flipped byte; a later H100's report (another nonce, other RIMs).
    report, chain = sample("hopper-2023")
    flipped = bytearray(report)
    flipped[200] ^= 1
    req, _ = cvm.request(gpus=[(bytes(flipped), chain)])
    assert cvm.code(req) == "nvgpu-signature"
    req, _ = cvm.request(gpus=[sample("hopper-2025")])
    assert cvm.code(req) == "nvgpu-nonce"
    req, _ = cvm.request(gpus=[(report[:-1], chain)])
    assert cvm.code(req) == "nvgpu-format"
    # The CPU evidence is still checked first: a report_data for another key fails there.
    req, _ = cvm.request()
    req["public_key"] = release.b64e(bytes(nacl.public.PrivateKey.generate().public_key))
    assert cvm.code(req) == "snp-report-data"


def test_a_random_nonce_refuses_the_recorded_report(tmp_path: Path, tls: Path) -> None:
    """Without the seam the broker's nonces are fresh, and a recorded report is stale."""
    cfg = _config(tmp_path, tls, SNP_GPU)
    _, slot = _wrap(cfg)
    own = make_own_chain()
    b = Broker(BrokerConfig.load(cfg), snp_roots=own["roots"])
    cvm = Cvm(b, slot.blob, own)
    req, _ = cvm.request()
    assert cvm.code(req) == "nvgpu-nonce"


def test_every_gpu_counts_once(tmp_path: Path, tls: Path) -> None:
    rule = json.loads(json.dumps(SNP_GPU))
    rule["nvidia-gpu"]["gpus"] = 2
    cfg = _config(tmp_path, tls, rule)
    _, slot = _wrap(cfg)
    own = make_own_chain()
    b = Broker(BrokerConfig.load(cfg), snp_roots=own["roots"], nonces=lambda: NONCE_2023)
    cvm = Cvm(b, slot.blob, own)
    req, _ = cvm.request()
    assert cvm.code(req) == "nvgpu-count"
    req, _ = cvm.request(gpus=[sample("hopper-2023")] * 2)
    assert cvm.code(req) == "nvgpu-count"
    # The same GPU under another attestation key (the leaf is derived with the firmware):
    # counted by the device identity certificate (the chain's second), it is still one GPU.
    report, chain = sample("hopper-2023")
    real = load_certificates(chain)
    key = ec.generate_private_key(ec.SECP384R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(real[0].subject)
        .issuer_name(real[0].issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(real[0].not_valid_before_utc)
        .not_valid_after(real[0].not_valid_after_utc)
        .sign(key, hashes.SHA384())
    )
    other_leaf = b"".join(c.public_bytes(Encoding.PEM) for c in [leaf, *real[1:]])
    req, _ = cvm.request(gpus=[(report, chain), (report, other_leaf)])
    assert cvm.code(req) == "nvgpu-count"
    # A second, different GPU whose report fails its own checks fails the release.
    other = OwnChain()
    report, _ = sample("hopper-2023")
    req, _ = cvm.request(gpus=[sample("hopper-2023"), (other.resign(report), _pem(other))])
    assert cvm.code(req) == "cert-untrusted-root"


def _pem(own: OwnChain) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in own.chain)


# -- end to end: TLS, Redis, swtpm, the client ---------------------------------------------


@pytest.fixture
def served(
    tmp_path: Path, tls: Path, tcti: str, redis_url: str
) -> Iterator[tuple[Broker, str, Path]]:
    """A broker over real TLS on a free port, its state in the real Redis, whose rule
    wants a TPM quote (swtpm, PCRs 7 and 16 as after a reset of 16) and the H100's report."""
    import uvicorn

    from sealstore.enclave.broker.http import _peer_h11_protocol, create_app

    (tmp_path / "ak.pem").write_bytes(ak_public(tcti))
    with tpm.connect(tcti) as ectx:
        tpm.reset(ectx, 16)
        pcrs = tpm.read_pcrs(ectx, tpm.PcrPolicy.parse("7,16"))
    (tmp_path / "pcrs.json").write_text(json.dumps({str(k): v.hex() for k, v in pcrs.items()}))
    rule = {
        "evidence": ["tpm+nvidia-gpu"],
        "tpm": {"pcrs": "7,16", "reference_file": "pcrs.json"},
        "nvidia-gpu": _gpu_rule(),
    }
    prefix = f"sealstore-test-{uuid.uuid4().hex[:8]}:"
    cfg = _config(tmp_path, tls, rule, state={"url": redis_url, "prefix": prefix})
    doc = yaml.safe_load(cfg.read_text())
    doc["identities"]["gpu-node"]["tpm_ak"] = "ak.pem"
    cfg.write_text(yaml.safe_dump(doc))
    broker = Broker(BrokerConfig.load(cfg), nonces=lambda: NONCE_2023)
    port = free_port()
    config = uvicorn.Config(
        create_app(broker),
        host="127.0.0.1",
        port=port,
        http=_peer_h11_protocol(),
        ssl_certfile=str(tls / "server.pem"),
        ssl_keyfile=str(tls / "server.key"),
        ssl_cert_reqs=ssl.CERT_NONE,
        log_level="warning",
        access_log=False,
    )
    with uvicorn_running(config, "the broker", join=10):
        yield broker, f"https://127.0.0.1:{port}", cfg


def _evidence_file(path: Path, gpus: list[tuple[bytes, bytes]]) -> str:
    items = [{"report": release.b64e(r), "certs": release.b64e(c)} for r, c in gpus]
    path.write_text(json.dumps(items))
    return str(path)


def test_a_gpu_direct_key_is_released_over_tls(
    served: tuple[Broker, str, Path], tls: Path, tcti: str, tmp_path: Path
) -> None:
    broker, url, cfg = served
    origin = url.removeprefix("https://")
    uri = f"broker+https://{origin}/acme/llama?key=local:{cfg.parent / 'keyring.json'}"
    dek = DataKey.generate()
    slot = BrokerKey(uri).wrap(dek, CONTEXT)
    gpus = _evidence_file(tmp_path / "gpus.json", [sample("hopper-2023")])
    client = BrokerKey(uri, token=TOKEN, cacert=str(tls / "ca.pem"), tcti=tcti, gpu_evidence=gpus)
    got = client.unwrap(slot, CONTEXT)
    assert got.material() == dek.material()
    # Granted and audited with the composite kind.
    records = list(read_records(broker.audit.storage))
    assert any(
        r.get("decision") == "granted" and (r.get("detail") or {}).get("kind") == "tpm+nvidia-gpu"
        for r in records
    ), records[-3:]
    # The H100 of 2025 answered another nonce: refused, and the client says why.
    stale = _evidence_file(tmp_path / "stale.json", [sample("hopper-2025")])
    client = BrokerKey(uri, token=TOKEN, cacert=str(tls / "ca.pem"), tcti=tcti, gpu_evidence=stale)
    with pytest.raises(KeyReleaseDenied, match="nvgpu-nonce"):
        client.unwrap(slot, CONTEXT)
    # A collector callable gets the nonce the GPU must sign: the challenge's own.
    asked: list[bytes] = []

    def collect(nonce: bytes) -> list[dict]:
        asked.append(nonce)
        report, chain = sample("hopper-2023")
        return [{"report": report, "certs": chain}]

    ca = str(tls / "ca.pem")
    client = BrokerKey(uri, token=TOKEN, cacert=ca, tcti=tcti, gpu_evidence=collect)
    assert client.unwrap(slot, CONTEXT).material() == dek.material()
    assert asked == [NONCE_2023]


def test_a_client_without_gpu_evidence_says_so(
    served: tuple[Broker, str, Path], tls: Path, tcti: str
) -> None:
    _, url, cfg = served
    uri = f"broker+{url}/acme/llama?key=local:{cfg.parent / 'keyring.json'}"
    slot = BrokerKey(uri).wrap(DataKey.generate(), CONTEXT)
    client = BrokerKey(uri, token=TOKEN, cacert=str(tls / "ca.pem"), tcti=tcti)
    with pytest.raises(AttestationError) as err:
        client.unwrap(slot, CONTEXT)
    assert err.value.code == "evidence-unavailable"


def test_each_rim_is_read_once_and_parsed_from_the_bytes_digested(
    tmp_path: Path, tls: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest a bundle signature covers and the RIM judged come from one read."""
    rims = {DATA / DRIVER_RIM, DATA / VBIOS_RIM}
    reads: list[Path] = []
    real_read = Path.read_bytes

    def counting(self: Path) -> bytes:
        if self in rims:
            reads.append(self)
        return real_read(self)

    cfg = _config(tmp_path, tls, SNP_GPU)
    monkeypatch.setattr(Path, "read_bytes", counting)
    loaded = BrokerConfig.load(cfg)
    monkeypatch.undo()
    # Per RIM: one read for the content, one for the "changed while it was read" check.
    assert sorted(reads) == sorted([*rims, *rims])
    for rim in rims:
        assert loaded.sources[str(rim)] == hashlib.sha256(rim.read_bytes()).hexdigest()
