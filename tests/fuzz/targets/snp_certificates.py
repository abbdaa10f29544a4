"""The certificates an SEV-SNP release request carries.

``enclave/attestation/snp.py`` and ``certs.py`` hold the code under test.

A broker parses the VCEK/VLEK, ASK and ARK a caller sends before it trusts
any of them. The first byte of an input picks which of the real sample's
certificates it replaces (VCEK, ASK or ARK); the rest is that certificate's
DER. The chain is checked against AMD's pinned roots, as the broker does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from cryptography.hazmat.primitives import serialization

from sealstore.enclave.attestation.certs import load_certificates
from sealstore.enclave.attestation.snp import verify_report
from sealstore.errors import AttestationError
from tests.fuzz.harness import shared_data

NAME = "snp_certificates"
EXPECTED = (AttestationError,)
_SNP = shared_data() / "attestation" / "snp"
_AT = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
_REPORT = (_SNP / "go-sev-guest" / "attestation.bin").read_bytes()
_VCEK = (_SNP / "go-sev-guest" / "vcek.testcer").read_bytes()
_ASK, _ARK = (
    c.public_bytes(serialization.Encoding.DER)
    for c in load_certificates((_SNP / "amd-roots" / "ask_ark_milan.pem").read_bytes())
)


def seeds() -> Iterator[bytes]:
    yield b"\x00" + _VCEK
    yield b"\x01" + _ASK
    yield b"\x02" + _ARK
    yield b"\x00" + (_SNP / "trustee" / "test-vcek-invalid-new.der").read_bytes()
    yield b"\x00" + (_SNP / "trustee" / "test-vcek-invalid-legacy.der").read_bytes()
    yield b"\x00" + (_SNP / "virtee" / "vcek_turin.der").read_bytes()


def one_input(data: bytes) -> None:
    if not data:
        return
    ders = [_VCEK, _ASK, _ARK]
    ders[data[0] % 3] = data[1:]
    vcek, *chain = ders
    # As the broker does: every chain certificate is parsed, then the report verified.
    parsed = [load_certificates(der)[0] for der in chain]
    verify_report(_REPORT, vcek, parsed, at=_AT)
