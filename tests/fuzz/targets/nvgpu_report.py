"""NVIDIA GPU attestation reports (``enclave/attestation/nvgpu.py``): parse, verify, judge.

Each input is a report as NVML returns it (the SPDM GET_MEASUREMENTS request
and the signed response with NVIDIA's opaque data). It is parsed, verified
against the real H100 certificate chain of NVIDIA's 2023 sample (a mutated
report fails its signature: that path, and the parse before it, is what is
fuzzed), and its parsed values are judged against the RIMs NVIDIA signed for
that sample, as a broker judges them once the signature holds.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

from sealstore.enclave.attestation.nvgpu import GpuReference, GpuReport, verify_report
from sealstore.enclave.attestation.nvgpu_rim import load_rim
from sealstore.errors import AttestationError

NAME = "nvgpu_report"
EXPECTED = (AttestationError,)
_DATA = Path(__file__).resolve().parents[2] / "data" / "nvgpu"
_AT = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
_CHAIN = (_DATA / "hopper-2023" / "gpuAkCertChain.txt").read_bytes()
_REFERENCE = GpuReference(
    (load_rim((_DATA / "rims" / "Driver_RIM_test_no_gpu.swidtag").read_bytes(), "driver", at=_AT),),
    (
        load_rim(
            (_DATA / "rims" / "1010_0200_882_96005E0001_test_no_gpu.swidtag").read_bytes(),
            "vbios",
            at=_AT,
        ),
    ),
    min_driver="535.0",
    min_vbios="96.00.5e.00.00",
    modes=frozenset({"spt"}),
)


def seeds() -> Iterator[bytes]:
    for folder, name in (
        ("hopper-2023", "attestationReport.txt"),
        ("hopper-2025", "hopperAttestationReport.txt"),
        ("blackwell", "blackwellAttestationReport.txt"),
    ):
        yield bytes.fromhex((_DATA / folder / name).read_text().strip())
    item = json.loads((_DATA / "hopper-590" / "evidence_hopper_590_12.json").read_text())[0]
    yield base64.b64decode(item["evidence"])


def one_input(data: bytes) -> None:
    rep = GpuReport.parse(data)
    # Judged as parsed (what the broker does after the signature holds), then verified.
    with contextlib.suppress(AttestationError):
        _REFERENCE.check(rep, rep.nonce)
    verify_report(rep, _CHAIN, at=_AT)
