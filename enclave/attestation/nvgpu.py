"""NVIDIA confidential-computing GPU attestation reports: parse them and verify them offline.

A Hopper (H100/H200) or Blackwell GPU in CC mode answers an SPDM (DMTF
DSP0274, version 1.1) GET_MEASUREMENTS request. What NVML's
``nvmlDeviceGetConfComputeGpuAttestationReport`` returns -- the *report* here --
is that request (37 bytes: version, code 0xE0, param1, param2, the
requester's 32-byte nonce, slot) followed by the GPU's MEASUREMENTS response:
its measurement blocks (one SHA-384 digest per index), the responder's nonce,
NVIDIA's opaque data (type-length-value fields: driver and VBIOS versions,
chip, SKU, NVDEC0 and protected-PCIe status, ...) and an ECDSA P-384
signature (r || s, big-endian) over SHA-384 of the request and the response
up to the signature.

The key that signs is the GPU's attestation key. Its certificate (from
``nvmlDeviceGetConfComputeGpuCertificate``) chains to NVIDIA's Device Identity
CA, which ships with sealstore (``nvidia-roots/device_identity_root.pem``) and is
pinned by the hash of its public key, so a chain that only claims to be
NVIDIA's is refused.

``verify_report`` checks what the GPU and NVIDIA vouch for (the chain, the
signature); ``GpuReference.check`` checks what a policy wants: the nonce,
minimum driver and VBIOS versions, the CC feature mode where the report
carries it, and the measurements against NVIDIA's reference values (RIMs,
``nvgpu_rim``). Parsing is written here because no maintained library parses
SPDM transcripts in Python (NVIDIA's own verifier pins an old cryptography
and is deprecated).

Not checked offline: revocation (NVIDIA's OCSP service answers for the
device certificates and the RIM signers; a broker without network cannot ask
it) and the FWID the leaf certificate carries.
"""

from __future__ import annotations

import datetime as dt
import hmac
import importlib.resources
import itertools
import json
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sealstore.enclave.attestation.certs import (
    check_validity,
    common_name,
    issued_by,
    load_certificates,
    spki_sha256,
)
from sealstore.enclave.attestation.nvgpu_rim import Rim
from sealstore.errors import AttestationError

__all__ = [
    "DEVICE_ROOT_SPKI_SHA256",
    "NONCE_SIZE",
    "GpuReference",
    "GpuReport",
    "collect_nvml",
    "device_root",
    "parse_version",
    "verify_report",
]

NONCE_SIZE = 32
REQUEST_SIZE = 37
SIGNATURE_SIZE = 96  # ECDSA P-384: r || s, 48 bytes each
MAX_CHAIN = 5  # leaf, BROM, provisioner ICA, product identity, Device Identity CA

# SHA-256 of the SubjectPublicKeyInfo of NVIDIA's Device Identity CA (the
# root of every GPU's attestation certificate; the PEM is nvidia-roots/ here).
DEVICE_ROOT_SPKI_SHA256 = "a90c4eb5acfd3e3d03a25db6a26b84f720ad0503196c627c21ddd48dd85b06a4"

_SPDM_1_1 = 0x11
_GET_MEASUREMENTS = 0xE0
_MEASUREMENTS = 0x60
_DMTF_SPEC = 0x01

# Opaque data field types (NVIDIA's numbering) this module reads.
DRIVER_VERSION = 3
VBIOS_VERSION = 6
NVDEC0_STATUS = 11
CHIP_SKU = 15
PROJECT = 17
PROJECT_SKU = 18
FWID = 20
PROTECTED_PCIE_STATUS = 21
OPAQUE_DATA_VERSION = 34
CHIP_INFO = 35
FEATURE_FLAG = 36
_NVDEC0_DISABLED = 0x55
_FEATURE_FLAGS = {0: "spt", 1: "mpt", 2: "ppcie"}  # single / multi-GPU passthrough, protected PCIe
# NVDEC0's measurement: meaningless (and not compared, as NVIDIA's verifier
# does) while the report says NVDEC0 is disabled.
_NVDEC0_INDEX = 35


def _bad(message: str) -> AttestationError:
    return AttestationError(f"GPU attestation report: {message}", "nvgpu-format")


@dataclass(frozen=True)
class GpuReport:
    """The fields of a GPU attestation report a verifier or a policy looks at."""

    raw: bytes = field(repr=False)
    spdm_version: int
    nonce: bytes  # the requester's: what the broker's challenge must equal
    responder_nonce: bytes
    measurements: dict[int, bytes] = field(repr=False)
    opaque: dict[int, bytes] = field(repr=False)

    @classmethod
    def parse(cls, raw: bytes) -> GpuReport:
        """Parse the SPDM request and response of *raw*; every length must add up exactly.

        Raises:
            AttestationError: code ``nvgpu-format``, naming what is wrong.
        """
        raw = bytes(raw)
        if len(raw) < REQUEST_SIZE + 8 + NONCE_SIZE + 2 + SIGNATURE_SIZE:
            raise _bad(f"{len(raw)} bytes is too short")
        version, code, param1, _param2 = raw[0], raw[1], raw[2], raw[3]
        # Hopper and Blackwell speak SPDM 1.1; later versions lay the response
        # out differently (1.3 adds a requester context), so they are refused
        # until a sample shows their layout.
        if version != _SPDM_1_1:
            raise _bad(f"SPDM version {version >> 4}.{version & 0xF} is not supported (1.1 is)")
        if code != _GET_MEASUREMENTS:
            raise _bad(f"request code {code:#04x} is not GET_MEASUREMENTS")
        if not param1 & 1:
            raise _bad("the request did not ask for a signature")
        nonce = raw[4:36]
        resp = memoryview(raw)[REQUEST_SIZE:]
        if resp[0] != version or resp[1] != _MEASUREMENTS:
            raise _bad(
                f"response version/code {resp[0]:#04x}/{resp[1]:#04x} do not answer the request"
            )
        count = resp[4]
        record_len = int.from_bytes(resp[5:8], "little")
        pos = 8
        if pos + record_len > len(resp):
            raise _bad("the measurement record runs past the end")
        measurements = _blocks(bytes(resp[pos : pos + record_len]), count)
        pos += record_len
        if pos + NONCE_SIZE + 2 > len(resp):
            raise _bad("it ends inside the responder's nonce")
        responder_nonce = bytes(resp[pos : pos + NONCE_SIZE])
        pos += NONCE_SIZE
        opaque_len = int.from_bytes(resp[pos : pos + 2], "little")
        pos += 2
        if pos + opaque_len + SIGNATURE_SIZE != len(resp):
            raise _bad(
                f"{len(resp) - pos - opaque_len} bytes follow the opaque data, not a "
                f"{SIGNATURE_SIZE}-byte signature"
            )
        opaque = _opaque(bytes(resp[pos : pos + opaque_len]))
        return cls(raw, version, nonce, responder_nonce, measurements, opaque)

    @property
    def signed(self) -> bytes:
        return self.raw[:-SIGNATURE_SIZE]

    @property
    def signature(self) -> bytes:
        return self.raw[-SIGNATURE_SIZE:]

    def _text(self, kind: int) -> str:
        return self.opaque.get(kind, b"").split(b"\0", 1)[0].decode("ascii", "replace").strip()

    @property
    def driver_version(self) -> str:
        """The driver's version, as the GPU saw it loaded ("550.90.07"), or ""."""
        return self._text(DRIVER_VERSION)

    @property
    def vbios_version(self) -> str:
        """The VBIOS version as NVIDIA writes it ("96.00.9f.00.01"), or ""."""
        raw = self.opaque.get(VBIOS_VERSION, b"")
        if len(raw) != 8:
            return ""
        v = int.from_bytes(raw, "little")
        parts = [(v >> 24) & 0xFF, (v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF, (v >> 32) & 0xFF]
        return ".".join(f"{p:02x}" for p in parts)

    @property
    def project(self) -> str:
        """Board project, project SKU and chip SKU ("1010-0200-882"): which VBIOS RIM applies."""
        return "-".join(self._text(k) for k in (PROJECT, PROJECT_SKU, CHIP_SKU))

    @property
    def nvdec0_disabled(self) -> bool:
        return self.opaque.get(NVDEC0_STATUS) == bytes([_NVDEC0_DISABLED])

    @property
    def feature_flag(self) -> str | None:
        """The CC mode the GPU reports ("spt", "mpt", "ppcie"); None where the report
        has no such field (opaque data version 0: Hopper drivers before 570)."""
        raw = self.opaque.get(FEATURE_FLAG)
        if raw is None:
            return None
        return _FEATURE_FLAGS.get(int.from_bytes(raw, "little"), f"unknown-{raw.hex()}")


def _blocks(record: bytes, count: int) -> dict[int, bytes]:
    """index -> measurement value; each block is a DMTF measurement of a known size."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(record):
        if pos + 4 > len(record):
            raise _bad("a measurement block header is cut short")
        index, spec, size = (
            record[pos],
            record[pos + 1],
            int.from_bytes(record[pos + 2 : pos + 4], "little"),
        )
        body = record[pos + 4 : pos + 4 + size]
        if spec != _DMTF_SPEC:
            raise _bad(f"measurement {index} is not a DMTF measurement (spec {spec:#04x})")
        if len(body) != size or size < 3 or int.from_bytes(body[1:3], "little") != size - 3:
            raise _bad(f"measurement {index} has inconsistent sizes")
        if index in out:
            raise _bad(f"measurement {index} appears twice")
        out[index] = body[3:]
        pos += 4 + size
    if len(out) != count:
        raise _bad(f"the response announces {count} measurement blocks and holds {len(out)}")
    return out


def _opaque(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise _bad("an opaque data field header is cut short")
        kind, size = struct.unpack_from("<HH", data, pos)
        value = data[pos + 4 : pos + 4 + size]
        if len(value) != size:
            raise _bad(f"opaque data field {kind} runs past the end")
        if kind in out:
            raise _bad(f"opaque data field {kind} appears twice")
        out[kind] = value
        pos += 4 + size
    return out


def device_root() -> x509.Certificate:
    """NVIDIA's Device Identity CA, as shipped in the package (checked against the pin).

    Raises:
        AttestationError: ``cert-untrusted-root`` if the packaged file is not
            the pinned key (a damaged or replaced installation).
    """
    return _packaged("device_identity_root.pem", DEVICE_ROOT_SPKI_SHA256)


def _packaged(name: str, spki: str) -> x509.Certificate:
    pem = importlib.resources.files("sealstore.enclave.attestation").joinpath(
        f"nvidia-roots/{name}"
    )
    cert = load_certificates(pem.read_bytes())[0]
    if spki_sha256(cert) != spki:
        raise AttestationError(
            f"the packaged nvidia-roots/{name} is not NVIDIA's pinned root", "cert-untrusted-root"
        )
    return cert


def verify_chain(
    chain: Sequence[x509.Certificate], at: dt.datetime, root: x509.Certificate, what: str
) -> None:
    """Check *chain* (leaf first) link by link up to *root*, the trust anchor.

    The chain may end in a copy of *root* (NVML's does); anything the chain
    says about its root is ignored, *root* is what its top must be issued by.
    Every issuer must be a CA; every certificate valid at *at*.
    """
    anchor = spki_sha256(root)
    certs = list(chain)
    if certs and spki_sha256(certs[-1]) == anchor:
        certs.pop()
    if not certs:
        raise AttestationError(f"the {what} chain has no certificate below the root", "cert-chain")
    top = certs[-1]
    if top.issuer != root.subject:
        raise AttestationError(
            f"the {what} chain leads to {top.issuer.rfc4514_string()!r}, not to NVIDIA's pinned "
            f"root {common_name(root)!r}",
            "cert-untrusted-root",
        )
    if len(certs) >= MAX_CHAIN:
        raise AttestationError(
            f"the {what} chain has {len(certs) + 1} certificates (at most {MAX_CHAIN})",
            "cert-chain",
        )
    links = [*certs, root]
    for cert, issuer in itertools.pairwise(links):
        try:
            ca = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise AttestationError(
                f"{common_name(issuer)!r} in the {what} chain is not a CA", "cert-chain"
            )
        issued_by(cert, issuer, f"{what} {common_name(cert)!r}")
    for cert in links:
        check_validity(cert, at, f"{what} {common_name(cert)!r}")


def verify_report(
    report: bytes | GpuReport,
    chain: bytes | Iterable[x509.Certificate],
    *,
    at: dt.datetime | None = None,
    root: x509.Certificate | None = None,
) -> GpuReport:
    """Verify a GPU attestation report against its certificate chain and NVIDIA's root.

    Args:
        report: the report as NVML returns it (SPDM request + response), or a parsed one.
        chain: the GPU's attestation certificate chain, leaf first, ending in
            the Device Identity CA (PEM bytes as NVML gives them, or certificates).
        at: the time the certificates must be valid at (default: now, UTC).
        root: the trust anchor (default: NVIDIA's Device Identity CA, packaged
            and pinned; tests pass their own).

    Returns:
        The parsed report; its values are judged by ``GpuReference.check``.

    Raises:
        AttestationError: code nvgpu-format, cert-format, cert-chain,
            cert-untrusted-root, cert-expired or nvgpu-signature.
    """
    rep = report if isinstance(report, GpuReport) else GpuReport.parse(report)
    certs = load_certificates(chain) if isinstance(chain, bytes | bytearray) else list(chain)
    at = (at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    verify_chain(certs, at, root or device_root(), "GPU attestation")
    public = certs[0].public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp384r1":
        raise AttestationError("the GPU attestation key is not ECDSA P-384", "cert-format")
    sig = rep.signature
    der = encode_dss_signature(int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big"))
    try:
        public.verify(der, rep.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError(
            "the GPU attestation report's signature does not verify with its certificate",
            "nvgpu-signature",
        ) from None
    return rep


def parse_version(text: str, *, hexadecimal: bool = False) -> tuple[int, ...]:
    """ "550.90.07" -> (550, 90, 7); a VBIOS version's parts are hexadecimal.

    Raises:
        ValueError: not dot-separated numbers.
    """
    parts = text.strip().split(".")
    try:
        return tuple(int(p, 16 if hexadecimal else 10) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a version (dot-separated numbers)") from None


@dataclass(frozen=True)
class GpuReference:
    """What a policy wants of every GPU's report.

    Args:
        driver_rims: NVIDIA's driver RIMs the driver may match (one per driver
            release the fleet runs).
        vbios_rims: the VBIOS RIMs (one per board and VBIOS version).
        min_driver: the lowest driver version accepted ("550.54.15"), or "".
        min_vbios: the lowest VBIOS version accepted ("96.00.5e.00.01"), or "".
        modes: the CC modes accepted ("spt", "mpt", "ppcie"); empty: the report's
            mode is not judged (reports without the field carry no mode).
        gpus: how many GPUs must present evidence, at least.
    """

    driver_rims: tuple[Rim, ...]
    vbios_rims: tuple[Rim, ...]
    min_driver: str = ""
    min_vbios: str = ""
    modes: frozenset[str] = frozenset()
    gpus: int = 1

    def check(self, report: GpuReport, bound: bytes) -> None:
        """Judge a verified report.

        Raises:
            AttestationError: nvgpu-nonce, nvgpu-driver-version,
                nvgpu-vbios-version, nvgpu-mode or nvgpu-measurement.
        """
        if not hmac.compare_digest(report.nonce, bound):
            raise AttestationError("the GPU report's nonce is not this challenge's", "nvgpu-nonce")
        if self.min_driver:
            got = report.driver_version
            if not got or _older(got, self.min_driver, False):
                raise AttestationError(
                    f"GPU driver {got or '(none)'} is older than {self.min_driver}",
                    "nvgpu-driver-version",
                )
        if self.min_vbios:
            got = report.vbios_version
            if not got or _older(got, self.min_vbios, True):
                raise AttestationError(
                    f"GPU VBIOS {got or '(none)'} is older than {self.min_vbios}",
                    "nvgpu-vbios-version",
                )
        if self.modes:
            mode = report.feature_flag
            if mode not in self.modes:
                raise AttestationError(
                    f"the GPU reports CC mode {mode or '(none: the report carries no mode)'}, "
                    f"not one of {', '.join(sorted(self.modes))}",
                    "nvgpu-mode",
                )
        self._measurements(report)

    def _measurements(self, report: GpuReport) -> None:
        best: list[int] | None = None
        for drv in self.driver_rims:
            for vb in self.vbios_rims:
                wrong = _mismatches(report, golden(drv, vb))
                if not wrong:
                    return
                if best is None or len(wrong) < len(best):
                    best = wrong
        drivers = [r.name for r in self.driver_rims]
        vbioses = [r.name for r in self.vbios_rims]
        raise AttestationError(
            f"GPU measurements {best} match none of the reference values (driver RIMs "
            f"{drivers}, VBIOS RIMs {vbioses})",
            "nvgpu-measurement",
        )


def _older(got: str, want: str, hexadecimal: bool) -> bool:
    try:
        return parse_version(got, hexadecimal=hexadecimal) < parse_version(
            want, hexadecimal=hexadecimal
        )
    except ValueError:
        return True  # a version that does not parse is not "at least" anything


def golden(driver: Rim, vbios: Rim) -> dict[int, tuple[bytes, ...]]:
    """The reference values of one driver and one VBIOS: their active measurements.

    Raises:
        ValueError: both RIMs have an active measurement at the same index.
    """
    out = {i: m.values for i, m in driver.measurements.items() if m.active}
    for i, m in vbios.measurements.items():
        if not m.active:
            continue
        if i in out:
            raise ValueError(f"{driver.name} and {vbios.name} both measure index {i}")
        out[i] = m.values
    return out


def _mismatches(report: GpuReport, want: dict[int, tuple[bytes, ...]]) -> list[int]:
    wrong = []
    for index in sorted(want):
        if index == _NVDEC0_INDEX and report.nvdec0_disabled:
            continue
        # Zero-based indices, as NVIDIA's RIMs and tools number them.
        if report.measurements.get(index + 1) not in want[index]:
            wrong.append(index)
    return wrong


# -- collection on the GPU's machine ----------------------------------------------------


def collect_nvml(nonce: bytes) -> list[dict[str, Any]]:
    """Every GPU's report for *nonce* and its certificate chain, through NVML (pynvml).

    Needs the NVIDIA driver in CC mode and the ``nvidia-ml-py`` package; not
    run in sealstore's tests (no CC GPU there).

    Returns:
        ``[{"report": bytes, "certs": bytes (PEM chain)}, ...]``, one per GPU.

    Raises:
        AttestationError: ``evidence-unavailable``: no pynvml, no driver, no GPU,
            or a GPU that gives no report (CC mode off).
    """
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"an SPDM nonce is {NONCE_SIZE} bytes")
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        raise AttestationError(
            "GPU evidence needs nvidia-ml-py (pip install nvidia-ml-py)", "evidence-unavailable"
        ) from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise AttestationError(f"NVML: {exc}", "evidence-unavailable") from None
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            rep = pynvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
            cert = pynvml.nvmlDeviceGetConfComputeGpuCertificate(handle)
            out.append(
                {
                    "report": bytes(rep.attestationReport[: rep.attestationReportSize]),
                    "certs": bytes(cert.attestationCertChain[: cert.attestationCertChainSize]),
                }
            )
        if not out:
            raise AttestationError("NVML sees no GPU", "evidence-unavailable")
        return out
    except pynvml.NVMLError as exc:
        raise AttestationError(
            f"NVML gave no GPU attestation report: {exc}", "evidence-unavailable"
        ) from None
    finally:
        pynvml.nvmlShutdown()


GpuCollector = Callable[[bytes], list[dict[str, Any]]]


def file_collector(path: str) -> GpuCollector:
    """A collector that returns the evidence recorded in *path* (JSON: a list of
    ``{"report": base64, "certs": base64 PEM chain}``), whatever the nonce: the
    broker's nonce check decides whether it is fresh."""

    def collect(_nonce: bytes) -> list[dict[str, Any]]:
        import base64

        try:
            with open(path, encoding="utf-8") as f:
                items = json.load(f)
            return [
                {k: base64.b64decode(i[k], validate=True) for k in ("report", "certs")}
                for i in items
            ]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise AttestationError(
                f"GPU evidence file {path}: {exc}", "evidence-unavailable"
            ) from None

    return collect
