"""The key-release broker's JSON request bodies (``enclave/broker/http.py``, ``broker.py``).

The first byte of an input picks the route (challenge, standing, release);
the rest is the body, parsed as the HTTP layer parses it and handed to the
broker's decisions in this process, with an identity that holds a token.
A release whose ``nonce`` is ``"$challenge"`` gets a fresh challenge's nonce
for its tenant and artifact, so the fuzzer reaches the evidence checks (TPM,
SEV-SNP, TDX: one artifact each) with the real samples as seeds.

Every refusal is a :class:`BrokerRefusal` with a code; any other exception would
be an HTTP 500 (``internal``) from the running broker, and is a bug.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

from sealstore.enclave.attestation.certs import load_certificates
from sealstore.enclave.broker.config import BrokerConfig
from sealstore.enclave.broker.http import ChallengeIn, ReleaseIn, StandingIn, parse_body
from sealstore.enclave.broker.server import Broker, BrokerRefusal
from tests.fuzz.harness import shared_data
from tests.fuzz.targets import tpm_attest

NAME = "broker_request"
EXPECTED = (BrokerRefusal,)
_ROUTES = ("challenge", "standing", "release")
_MODELS = (ChallengeIn, StandingIn, ReleaseIn)
# Removed when the process ends (the config, the AK and the audit key live here).
_TMP = tempfile.TemporaryDirectory(prefix="sealstore-fuzz-broker-", ignore_cleanup_errors=True)
_DIR = Path(_TMP.name)
_TDX_COLLATERAL = Path(__file__).resolve().parents[2] / "data" / "tdx" / "go-tdx-guest-2023"


def _broker() -> Broker:
    (_DIR / "tls.pem").write_text("unused: the broker is driven in this process\n")
    (_DIR / "ak.pem").write_bytes(tpm_attest._AK_PEM)
    (_DIR / "pcrs.json").write_text(json.dumps({"7": "00" * 32, "16": "16" * 32}))
    doc = {
        "server": {"tls_cert": "tls.pem", "tls_key": "tls.pem"},
        "max_challenges": 10_000_000,
        "max_challenges_per_identity": 1_000_000,
        "identities": {"fuzz": {"token_sha256": "00" * 32, "tpm_ak": "ak.pem"}},
        "tenants": {
            "acme": {
                "keys": [f"local:{_DIR / 'no-keyring.json'}"],
                "artifacts": {
                    "tpm-model": {
                        "identities": ["fuzz"],
                        "evidence": ["tpm"],
                        "tpm": {"pcrs": "7,16", "reference_file": "pcrs.json"},
                    },
                    "snp-model": {
                        "identities": ["fuzz"],
                        "evidence": ["snp"],
                        "snp": {
                            "measurements": ["00" * 48],
                            "min_tcb": {"bootloader": 0, "tee": 0, "snp": 0, "microcode": 0},
                        },
                    },
                    "tdx-model": {
                        "identities": ["fuzz"],
                        "evidence": ["tdx"],
                        "tdx": {
                            "mrtd": ["00" * 48],
                            "rtmrs": {0: ["00" * 48]},
                            # Intel's real collateral for the seed quote's
                            # platform; old, so a grace that reaches past it.
                            "collateral": {"dir": str(_TDX_COLLATERAL), "grace_hours": 200_000},
                        },
                    },
                },
            }
        },
        "audit": {"log": f"memory://{_DIR.name}/audit"},
        # Never locked out or throttled: each input is judged on its own.
        "detectors": {
            "attestation_failures": {"max": 1_000_000},
            "release_rate": {"floor": 1_000_000_000},
        },
    }
    (_DIR / "broker.yaml").write_text(yaml.safe_dump(doc))
    logging.getLogger("sealstore.broker").disabled = True
    return Broker(BrokerConfig.load(_DIR / "broker.yaml"))


_BROKER = _broker()
_WHO = _BROKER.config.identities["fuzz"]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _release(artifact: str, evidence: dict[str, Any]) -> bytes:
    body = {
        "tenant": "acme",
        "artifact": artifact,
        "nonce": "$challenge",
        "public_key": _b64(bytes(range(1, 33))),
        "evidence": evidence,
        "slot": {"kind": "local", "key_id": "local:k1", "blob": _b64(bytes(60))},
        "context": {"purpose": "fuzz"},
    }
    return b"\x02" + json.dumps(body).encode()


def seeds() -> Iterator[bytes]:
    snp = shared_data() / "attestation" / "snp"
    tdx = shared_data() / "attestation" / "tdx" / "trustee"
    yield b"\x00" + json.dumps({"tenant": "acme", "artifact": "tpm-model"}).encode()
    yield b"\x01" + json.dumps({"tenant": "acme"}).encode()
    attest = next(tpm_attest.seeds())
    sig = tpm_attest._AK.sign(attest, tpm_attest.ec.ECDSA(tpm_attest.hashes.SHA256()))
    yield _release(
        "tpm-model",
        {
            "kind": "tpm",
            "attest": _b64(attest),
            "signature": _b64(sig),
            "pcrs": {"7": "00" * 32, "16": "16" * 32},
        },
    )
    chain = load_certificates((snp / "amd-roots" / "ask_ark_milan.pem").read_bytes())
    ask, ark = (_b64(c.public_bytes(serialization.Encoding.DER)) for c in chain)
    yield _release(
        "snp-model",
        {
            "kind": "snp",
            "report": _b64((snp / "go-sev-guest" / "attestation.bin").read_bytes()),
            "certs": {
                "vcek": _b64((snp / "go-sev-guest" / "vcek.testcer").read_bytes()),
                "ask": ask,
                "ark": ark,
            },
        },
    )
    yield _release(
        "tdx-model", {"kind": "tdx", "quote": _b64((tdx / "tdx_quote_4.dat").read_bytes())}
    )


def one_input(data: bytes) -> None:
    if not data:
        return
    route = _ROUTES[data[0] % len(_ROUTES)]
    req = parse_body(data[1:], _MODELS[data[0] % len(_ROUTES)]).fields()
    if route == "challenge":
        _BROKER.challenge(_WHO, req.get("tenant"), req.get("artifact"))
    elif route == "standing":
        _BROKER.standing(_WHO, req.get("tenant"))
    else:
        if req.get("nonce") == "$challenge":
            with contextlib.suppress(BrokerRefusal):
                req["nonce"] = _BROKER.challenge(_WHO, req.get("tenant"), req.get("artifact"))[
                    "nonce"
                ]
        _BROKER.release(_WHO, req)
