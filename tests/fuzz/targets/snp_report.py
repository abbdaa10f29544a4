"""AMD SEV-SNP attestation reports (``enclave/attestation/snp.py``): parse, judge, verify.

Each input is a report: parsed, its TCBs decoded for every product line,
checked against reference values, and verified against the real VCEK and
AMD chain of the go-sev-guest sample (a mutated report fails its signature:
that path, and the parse before it, is what is fuzzed).
"""

from __future__ import annotations

import binascii
import contextlib
import datetime as dt
from collections.abc import Iterator

from sealstore.enclave.attestation.snp import SnpReference, SnpReport, Tcb, verify_report
from sealstore.errors import AttestationError
from tests.fuzz.harness import shared_data

NAME = "snp_report"
EXPECTED = (AttestationError,)
_SNP = shared_data() / "attestation" / "snp"
_AT = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
_VCEK = (_SNP / "go-sev-guest" / "vcek.testcer").read_bytes()
_CHAIN = (_SNP / "amd-roots" / "ask_ark_milan.pem").read_bytes()
_REFERENCE = SnpReference(measurements=("00" * 48,), min_tcb=Tcb(1, 0, 1, 1), host_data="00" * 32)


def seeds() -> Iterator[bytes]:
    yield (_SNP / "go-sev-guest" / "attestation.bin").read_bytes()
    yield (_SNP / "trustee" / "test-report.bin").read_bytes()
    yield (_SNP / "trustee" / "test-vlek-report.bin").read_bytes()
    yield binascii.unhexlify((_SNP / "virtee" / "report_milan.hex").read_bytes().strip())


def one_input(data: bytes) -> None:
    rep = SnpReport.parse(data)
    for product in (None, "Milan", "Genoa", "Turin"):
        for which in ("current", "reported", "committed", "launch"):
            str(rep.tcb(which, product))
    rep.signature()
    with contextlib.suppress(AttestationError):
        _REFERENCE.check(rep, "Milan", b"\x01" * 64)
    verify_report(rep, _VCEK, _CHAIN, at=_AT)
