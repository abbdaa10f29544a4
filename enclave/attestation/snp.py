"""AMD SEV-SNP attestation reports: parse them and verify them offline.

A report (SEV-SNP ABI spec, "ATTESTATION_REPORT") is 1184 bytes signed by
the chip: ECDSA P-384 with SHA-384 over bytes 0x000..0x29F, by the VCEK (a
key derived from the chip and its firmware TCB) or by a VLEK (a key AMD
provisions to one cloud). The VCEK's certificate chains VCEK -> ASK -> ARK;
the ARK is AMD's root for one product line and is pinned here by the hash
of its public key, so a chain that merely *claims* to be AMD's is refused.

``verify_report`` checks what the chip and AMD vouch for: the chain, the
signature, that the certificate is for this chip (its hwID against the
report's chip_id, as the product line lays it out) at this TCB, that the
report, the certificate and the root agree on the product line, and, when
a revocation source is given (``snp_crl``), that AMD has not revoked a key
in the chain. What the verifier *wants* -- the measurement, minimum TCB, debug
off, the nonce in report_data -- is ``SnpReference.check``, so a policy can
hold reference values without touching the cryptography.

Certificates are checked at a time the caller may pin (``at=``): AMD's
certificates expire, and evidence recorded in the past (and the test data)
must be checkable at the time it was produced.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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
from sealstore.enclave.attestation.snp_crl import SnpRevocation
from sealstore.errors import AttestationError

__all__ = [
    "AMD_ARK_SPKI_SHA256",
    "REPORT_SIZE",
    "SnpReference",
    "SnpReport",
    "SnpRevocation",
    "Tcb",
    "verify_report",
]

REPORT_SIZE = 0x4A0
_SIGNED = 0x2A0  # the signature covers bytes [0, 0x2A0)

# SHA-256 of each ARK's SubjectPublicKeyInfo (DER). These are AMD's roots of
# trust for SEV-SNP (the ARK certificates served by kdsintf.amd.com, also
# embedded by go-sev-guest and virtee/sev). A new product line is added here
# after checking its ARK against AMD's key distribution service.
AMD_ARK_SPKI_SHA256 = {
    "Milan": "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9",
    "Genoa": "429a69c9422aa258ee4d8db5fcda9c6470ef15f8cd5a9cebd6cbc7d90b863831",
    "Turin": "4f125410563a2ab9a50356f9243f6fe0b6f73de98603f53f90339c70e9d7ad08",
}

# Guest policy bits (ABI spec, GUEST_POLICY).
POLICY_SMT = 1 << 16
POLICY_RESERVED_ONE = 1 << 17
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20

_SIGNING_KEYS = {0: "vcek", 1: "vlek", 7: "none"}
_OID = "1.3.6.1.4.1.3704.1."
_PRODUCT_NAME_OID = _OID + "2"
_HWID_OID = _OID + "4"
# The VCEK's hwID per product line (AMD's VCEK certificate spec): Milan and
# Genoa certify the chip's 64-byte ID; from Turin on the hwID is 8 bytes and
# the report's CHIP_ID holds those 8 bytes followed by 56 zero bytes.
_HWID_SIZE = {"Milan": 64, "Genoa": 64, "Turin": 8}
# The product line of a CPUID family / model (report version 3 on; the ABI
# spec's CPUID_FAM_ID and CPUID_MOD_ID, extended and base fields combined).
_CPUID_PRODUCTS = (
    (0x19, range(0x00, 0x10), "Milan"),
    (0x19, range(0x10, 0x20), "Genoa"),
    (0x19, range(0xA0, 0xB0), "Genoa"),  # Siena: Genoa's keys
    (0x1A, range(0x00, 0x12), "Turin"),
)
# The VCEK/VLEK productName extension ("Milan-B0", "Genoa", "Turin") by its stem.
_PRODUCT_NAMES = {"Milan": "Milan", "Genoa": "Genoa", "Siena": "Genoa", "Turin": "Turin"}
# The VCEK/VLEK certificate's TCB extensions (AMD's VCEK spec), by TCB field.
_TCB_OIDS = {
    "bootloader": _OID + "3.1",
    "tee": _OID + "3.2",
    "snp": _OID + "3.3",
    "microcode": _OID + "3.8",
    "fmc": _OID + "3.9",
}


@dataclass(frozen=True, order=False)
class Tcb:
    """A TCB_VERSION: security patch levels of the firmware components.

    Milan and Genoa pack it as bootloader, tee, 4 reserved bytes, snp,
    microcode; Turin as fmc, bootloader, tee, snp, 3 reserved, microcode.
    """

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None  # Turin and later

    @classmethod
    def unpack(cls, raw: bytes, product: str | None = None) -> Tcb:
        if product == "Turin":
            return cls(raw[1], raw[2], raw[3], raw[7], fmc=raw[0])
        return cls(raw[0], raw[1], raw[6], raw[7])

    def at_least(self, other: Tcb) -> bool:
        """Every component at or above *other*'s (TCB levels are not totally ordered)."""
        pairs = [
            (self.bootloader, other.bootloader),
            (self.tee, other.tee),
            (self.snp, other.snp),
            (self.microcode, other.microcode),
        ]
        if other.fmc is not None:
            pairs.append((self.fmc or 0, other.fmc))
        return all(a >= b for a, b in pairs)

    def __str__(self) -> str:
        fmc = "" if self.fmc is None else f"fmc={self.fmc} "
        return f"{fmc}bl={self.bootloader} tee={self.tee} snp={self.snp} ucode={self.microcode}"


@dataclass(frozen=True)
class SnpReport:
    """The fields of an attestation report a verifier or a policy looks at.

    TCB fields are raw 8-byte values until the product is known
    (``tcb(name, product)``): their layout depends on it.
    """

    raw: bytes = field(repr=False)
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    platform_info: int
    signing_key: str
    mask_chip_id: bool
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    chip_id: bytes
    cpuid: tuple[int, int, int]  # family, model, stepping (report v3+; zeros before)

    @classmethod
    def parse(cls, data: bytes) -> SnpReport:
        """Parse a report's bytes.

        Raises:
            AttestationError: wrong size, an unknown version or signature algorithm.
        """
        raw = bytes(data)
        if len(raw) != REPORT_SIZE:
            raise AttestationError(
                f"an SEV-SNP report is {REPORT_SIZE} bytes, not {len(raw)}", code="snp-format"
            )
        version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0)
        vmpl, algo = struct.unpack_from("<II", raw, 0x30)
        (platform_info, flags) = struct.unpack_from("<QI", raw, 0x40)
        if not 2 <= version <= 5:
            raise AttestationError(
                f"SEV-SNP report version {version} is not supported", "snp-format"
            )
        if algo != 1:
            raise AttestationError(
                f"SEV-SNP report signature algorithm {algo} is not ECDSA P-384/SHA-384",
                "snp-format",
            )
        key = (flags >> 2) & 7
        if key not in _SIGNING_KEYS:
            raise AttestationError(f"SEV-SNP report names signing key {key}", "snp-format")
        return cls(
            raw=raw,
            version=version,
            guest_svn=guest_svn,
            policy=policy,
            family_id=raw[0x10:0x20],
            image_id=raw[0x20:0x30],
            vmpl=vmpl,
            signature_algo=algo,
            platform_info=platform_info,
            signing_key=_SIGNING_KEYS[key],
            mask_chip_id=bool(flags & 2),
            report_data=raw[0x50:0x90],
            measurement=raw[0x90:0xC0],
            host_data=raw[0xC0:0xE0],
            id_key_digest=raw[0xE0:0x110],
            author_key_digest=raw[0x110:0x140],
            report_id=raw[0x140:0x160],
            chip_id=raw[0x1A0:0x1E0],
            cpuid=(raw[0x188], raw[0x189], raw[0x18A]) if version >= 3 else (0, 0, 0),
        )

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    def tcb(self, name: str, product: str | None = None) -> Tcb:
        """``current``, ``reported``, ``committed`` or ``launch`` TCB, decoded for *product*."""
        off = {"current": 0x38, "reported": 0x180, "committed": 0x1E0, "launch": 0x1F0}[name]
        return Tcb.unpack(self.raw[off : off + 8], product)

    def signature(self) -> bytes:
        """The signature as DER (r and s are stored little-endian, 72 bytes each)."""
        r = int.from_bytes(self.raw[_SIGNED : _SIGNED + 72], "little")
        s = int.from_bytes(self.raw[_SIGNED + 72 : _SIGNED + 144], "little")
        return encode_dss_signature(r, s)


def _ext(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        value = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    except x509.ExtensionNotFound:
        return None
    return getattr(value, "value", None)


def _ext_int(cert: x509.Certificate, oid: str) -> int | None:
    der = _ext(cert, oid)
    if der is None:
        return None
    if len(der) < 3 or der[0] != 0x02 or der[1] != len(der) - 2:
        raise AttestationError(f"certificate extension {oid} is not a DER INTEGER", "cert-format")
    return int.from_bytes(der[2:], "big")


def _hwid(cert: x509.Certificate) -> bytes | None:
    der = _ext(cert, _HWID_OID)
    # AMD's KDS stores the raw bytes (64, or 8 from Turin on); other issuers
    # wrap them in an OCTET STRING. The sizes keep the two apart.
    if der is not None and len(der) in (66, 10) and der[:2] in (b"\x04\x40", b"\x04\x08"):
        return der[2:]
    return der


def cpuid_product(family: int, model: int) -> str | None:
    """The product line of a report's CPUID family and model, or None if unknown."""
    return next((p for f, models, p in _CPUID_PRODUCTS if f == family and model in models), None)


def _check_product(cert: x509.Certificate, rep: SnpReport, product: str, what: str) -> None:
    """The root decides the product line; the certificate and the report must agree."""
    der = _ext(cert, _PRODUCT_NAME_OID)
    if der is not None:
        if len(der) < 2 or der[0] != 0x16 or der[1] != len(der) - 2:
            raise AttestationError(
                f"the {what}'s productName is not a DER IA5String", "cert-format"
            )
        name = der[2:].decode("ascii", "replace")
        if _PRODUCT_NAMES.get(name.split("-")[0]) != product:
            raise AttestationError(
                f"the {what} is for product {name!r}, its root for {product}",
                "snp-product-mismatch",
            )
    if rep.version >= 3:
        family, model, _ = rep.cpuid
        seen = cpuid_product(family, model)
        if seen != product:
            raise AttestationError(
                f"the report's CPUID (family {family:#x}, model {model:#x}) is "
                f"{seen or 'no known SEV-SNP product'}, its root is for {product}",
                "snp-product-mismatch",
            )


def _check_chip(cert: x509.Certificate, rep: SnpReport, product: str) -> None:
    """The VCEK is derived for one chip: its hwID must be the report's chip_id."""
    hwid = _hwid(cert)
    size = _HWID_SIZE.get(product)
    if hwid is None or size is None:
        raise AttestationError(
            f"the VCEK carries no hwID for {product} to bind it to the chip", "snp-chip-mismatch"
        )
    if len(hwid) != size:
        raise AttestationError(
            f"a {product} VCEK's hwID is {size} bytes, this one has {len(hwid)}",
            "snp-chip-mismatch",
        )
    if hwid.ljust(len(rep.chip_id), b"\0") != rep.chip_id:
        raise AttestationError(
            "the VCEK certificate is for another chip (hwID differs from the report's chip_id)",
            "snp-chip-mismatch",
        )


def _chain(
    key_cert: x509.Certificate,
    chain: Sequence[x509.Certificate],
    signing_key: str,
    at: dt.datetime,
    roots: dict[str, str],
) -> tuple[str, x509.Certificate, x509.Certificate]:
    """Check VCEK/VLEK -> ASK/ASVK -> ARK; return the product line ("Milan"...), ASK, ARK."""
    ask = next((c for c in chain if c.subject == key_cert.issuer), None)
    if ask is None:
        raise AttestationError(
            f"the chain has no certificate for {key_cert.issuer.rfc4514_string()}", "cert-chain"
        )
    ark = next((c for c in chain if c.subject == ask.issuer), None)
    if ark is None:
        raise AttestationError(
            f"the chain has no root for {ask.issuer.rfc4514_string()}", "cert-chain"
        )
    product = next((p for p in roots if common_name(ark) == f"ARK-{p}"), None)
    if product is None or spki_sha256(ark) != roots[product]:
        raise AttestationError(
            f"the chain's root {common_name(ark)!r} is not a pinned AMD root key",
            "cert-untrusted-root",
        )
    intermediate = "SEV-VLEK-" if signing_key == "vlek" else "SEV-"
    if common_name(ask) != intermediate + product:
        raise AttestationError(
            f"a {signing_key.upper()} must chain through {intermediate + product}, not "
            f"{common_name(ask)!r}",
            "cert-chain",
        )
    issued_by(ark, ark, "ARK")
    issued_by(ask, ark, "ASK")
    issued_by(key_cert, ask, signing_key.upper())
    for cert, what in ((ark, "ARK"), (ask, "ASK"), (key_cert, signing_key.upper())):
        check_validity(cert, at, what)
    return product, ask, ark


def verify_report(
    report: bytes | SnpReport,
    key_cert: bytes | x509.Certificate,
    chain: bytes | Iterable[x509.Certificate],
    *,
    at: dt.datetime | None = None,
    roots: dict[str, str] | None = None,
    revocation: SnpRevocation | None = None,
) -> tuple[SnpReport, str]:
    """Verify an SEV-SNP report against AMD's certificate chain.

    Args:
        report: the report's 1184 bytes (or a parsed report).
        key_cert: the VCEK or VLEK certificate (DER or PEM) that signed it.
        chain: the ASK (or ASVK) and ARK certificates (PEM bytes or certificates).
        at: the time the certificates must be valid at (default: now, UTC).
        roots: product -> pinned ARK key hash (default ``AMD_ARK_SPKI_SHA256``).
        revocation: where AMD's CRLs come from; None skips revocation.

    Returns:
        ``(report, product)``; the product line ("Milan", "Genoa", "Turin")
        decides how the TCB fields are read.

    Raises:
        AttestationError: with ``code`` naming the failed check: snp-format,
            cert-format, cert-chain, cert-untrusted-root, cert-expired,
            snp-signature, snp-product-mismatch, snp-tcb-mismatch,
            snp-chip-mismatch, snp-revoked; with *revocation*, also
            snp-crl-missing, snp-crl-unavailable, snp-crl-invalid, snp-crl-stale.
    """
    rep = report if isinstance(report, SnpReport) else SnpReport.parse(report)
    if rep.signing_key == "none":
        raise AttestationError("the SEV-SNP report is unsigned", "snp-signature")
    cert = key_cert if isinstance(key_cert, x509.Certificate) else load_certificates(key_cert)[0]
    certs = load_certificates(chain) if isinstance(chain, bytes) else list(chain)
    at = (at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    product, ask, ark = _chain(cert, certs, rep.signing_key, at, roots or AMD_ARK_SPKI_SHA256)
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp384r1":
        raise AttestationError(
            f"the {rep.signing_key.upper()} key is not ECDSA P-384", "cert-format"
        )
    try:
        public.verify(rep.signature(), rep.raw[:_SIGNED], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError(
            f"the SEV-SNP report's signature does not verify with this {rep.signing_key.upper()}",
            "snp-signature",
        ) from None
    # The product line decides how the TCB and the chip ID are laid out, so the
    # report and the certificate must be for the line the root is.
    _check_product(cert, rep, product, rep.signing_key.upper())
    # The VCEK is derived for one chip at one TCB: its certificate must say so.
    tcb = rep.tcb("reported", product)
    for name, oid in _TCB_OIDS.items():
        want = getattr(tcb, name)
        if want is None:
            continue
        got = _ext_int(cert, oid)
        if got is None:
            raise AttestationError(
                f"the certificate carries no {name} SPL to compare with the report's TCB",
                "snp-tcb-mismatch",
            )
        if got != want:
            raise AttestationError(
                f"the certificate is for {name} SPL {got}, the report's reported TCB has {want}",
                "snp-tcb-mismatch",
            )
    # With MASK_CHIP_ID the chip_id is zeros by the host's choice: the VCEK's
    # signature still binds the chip, the hwID has nothing to compare with.
    if rep.signing_key == "vcek" and not rep.mask_chip_id:
        _check_chip(cert, rep, product)
    if revocation is not None:
        what = "ASVK" if rep.signing_key == "vlek" else "ASK"
        links = [(ask, ark, what), (cert, ask, rep.signing_key.upper())]
        revocation.check(product, rep.signing_key, links, at)
    return rep, product


@dataclass(frozen=True)
class SnpReference:
    """What a verifier expects of a verified report (a policy's reference values).

    Attributes:
        measurements: hex launch measurements accepted (empty: any).
        min_tcb: the lowest reported TCB accepted, per component.
        allow_debug: accept a guest whose policy allows debugging (never in production:
            the host can then read and change guest memory).
        max_vmpl: the highest VMPL that may have requested the report.
        host_data: hex host_data required (empty: any).
        revocation: where AMD's CRLs come from (None: revocation not checked);
            passed to ``verify_report`` by whoever verifies for this policy.
    """

    measurements: tuple[str, ...] = ()
    min_tcb: Tcb | None = None
    allow_debug: bool = False
    max_vmpl: int = 3
    host_data: str = ""
    revocation: SnpRevocation | None = field(default=None, hash=False, repr=False)

    def check(self, rep: SnpReport, product: str, report_data: bytes | None = None) -> None:
        """Refuse a report outside these values.

        Args:
            report_data: the 64 bytes the report must carry (the nonce binding);
                shorter values are zero-padded, as the guest pads them.

        Raises:
            AttestationError: code snp-debug, snp-vmpl, snp-measurement,
                snp-tcb-too-low, snp-host-data or snp-report-data.
        """
        if rep.debug and not self.allow_debug:
            raise AttestationError("the guest's policy allows debugging", "snp-debug")
        if rep.vmpl > self.max_vmpl:
            raise AttestationError(
                f"the report came from VMPL {rep.vmpl}, above {self.max_vmpl}", "snp-vmpl"
            )
        if self.measurements and rep.measurement.hex() not in {
            m.lower() for m in self.measurements
        }:
            raise AttestationError(
                f"measurement {rep.measurement.hex()[:16]}... is not a reference value",
                "snp-measurement",
            )
        if self.min_tcb is not None and not rep.tcb("reported", product).at_least(self.min_tcb):
            raise AttestationError(
                f"reported TCB ({rep.tcb('reported', product)}) is below the minimum "
                f"({self.min_tcb})",
                "snp-tcb-too-low",
            )
        if self.host_data and rep.host_data.hex() != self.host_data.lower():
            raise AttestationError("host_data differs from the reference", "snp-host-data")
        if report_data is not None and rep.report_data != report_data.ljust(64, b"\0"):
            raise AttestationError(
                "report_data does not bind this challenge and key", "snp-report-data"
            )
