"""Intel TDX quotes (DCAP quote format v4 and v5): parse them and verify what can be offline.

A quote is a header, a TD report body (the TD's measurements: MRTD, RTMR0-3,
report_data...) and signature data: an ECDSA P-256 signature over header and
body by an *attestation key*, that key, and certification data -- the
Quoting Enclave's own SGX report, signed by the platform's PCK key, which
binds the attestation key (its report_data holds SHA-256(key || QE auth
data)), and the PCK certificate chain up to Intel's SGX root.

``verify_quote`` checks, without network access:

1. the quote signature with the attestation key it carries;
2. the QE report binds that attestation key;
3. the QE report's signature with the PCK certificate's key;
4. the PCK chain (PCK -> platform/processor CA -> Intel SGX Root CA), with
   the root pinned by its public key hash, at a pinnable time.

Given a collateral source (``tdx_pccs``: files or a PCCS), it then checks
what only Intel's collateral can say (``tdx_collateral``): the PCK and root
CRLs, the QE against Intel's TD_QE identity, and the platform's TCB level
(SGX components, PCESVN, TEE_TCB_SVN, the TDX module) against the TCB info
for its FMSPC, each piece signed under the same pinned root and fresh. The
status found (and its advisories) is in ``TdxQuote.tcb``; a status the
policy does not accept is refused.

Bytes after the signature data: zeros are accepted (quotes come in
fixed-size buffers, e.g. 8000 bytes from the TDX quoting library); anything
else is refused (``tdx-format``). Intel's QVL and go-tdx-guest ignore
trailing bytes of any value; nothing signs them and no real flow we know of
fills them, so the stricter choice costs nothing and leaves no room to
smuggle data alongside a verified quote.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import struct
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sealstore.enclave.attestation import tdx_collateral, tdx_pccs
from sealstore.enclave.attestation.certs import (
    check_validity,
    common_name,
    issued_by,
    load_certificates,
    spki_sha256,
)
from sealstore.errors import AttestationError

__all__ = ["INTEL_SGX_ROOT_SPKI_SHA256", "TdxQuote", "TdxReference", "verify_quote"]

# SHA-256 of the SubjectPublicKeyInfo of "Intel SGX Root CA" (valid 2018-05-21 to
# 2049-12-31), the root of every PCK chain; Intel publishes the certificate at
# certificates.trustedservices.intel.com (Intel_SGX_Provisioning_Certification_RootCA).
INTEL_SGX_ROOT_SPKI_SHA256 = "a0af031289f5d5d4132f9186068a7fc13628633ba235777472e29b6b6c67a49e"

_HEADER = 48
_TD10_BODY = 584  # TDX 1.0 TD report body
_TD15_BODY = 648  # TDX 1.5: + tee_tcb_svn2, mrservicetd
_TEE_TDX = 0x81
_ECDSA_P256 = 2
_QE_REPORT = 384
TD_ATTR_DEBUG = 1  # TDATTRIBUTES.TUD.DEBUG: the host can read and change the TD


def _take(buf: bytes, off: int, n: int, what: str) -> bytes:
    if off + n > len(buf):
        raise AttestationError(f"the TDX quote ends inside its {what}", "tdx-format")
    return buf[off : off + n]


def _raw_sig(rs: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(rs[:32], "big"), int.from_bytes(rs[32:], "big"))


def _p256(xy: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + xy)
    except ValueError:
        raise AttestationError(
            "the quote's attestation key is not a P-256 point", "tdx-format"
        ) from None


@dataclass(frozen=True)
class TdxQuote:
    """A parsed TDX quote: the TD report fields and the signature data."""

    raw: bytes = field(repr=False)
    version: int
    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes  # TDX 1.5 bodies: the module running now (b"" for TDX 1.0)
    signed: bytes = field(repr=False)  # header + body: what the attestation key signs
    signature: bytes = field(repr=False)
    attestation_key: bytes = field(repr=False)
    qe_report: bytes = field(repr=False)
    qe_report_signature: bytes = field(repr=False)
    qe_auth_data: bytes = field(repr=False)
    pck_chain: bytes = field(repr=False)  # PEM
    # What Intel's collateral says of the platform: set by verify_quote when
    # given collateral, else None.
    tcb: tdx_collateral.TcbResult | None = None

    @classmethod
    def parse(cls, data: bytes) -> TdxQuote:
        """Parse quote v4 or v5 bytes (trailing zero padding, as configfs gives, is allowed).

        Raises:
            AttestationError: code tdx-format.
        """
        q = bytes(data)
        version, key_type, tee = struct.unpack_from("<HHI", _take(q, 0, 8, "header"))
        if version not in (4, 5):
            raise AttestationError(f"TDX quote version {version} is not supported", "tdx-format")
        if tee != _TEE_TDX:
            raise AttestationError(f"the quote is for TEE type {tee:#x}, not TDX", "tdx-format")
        if key_type != _ECDSA_P256:
            raise AttestationError(
                f"attestation key type {key_type} is not ECDSA P-256", "tdx-format"
            )
        off, size = _HEADER, _TD10_BODY
        if version == 5:
            body_type, size = struct.unpack("<HI", _take(q, _HEADER, 6, "body descriptor"))
            if (body_type, size) not in ((2, _TD10_BODY), (3, _TD15_BODY)):
                raise AttestationError(
                    f"quote v5 body type {body_type} of {size} bytes is not a TD report",
                    "tdx-format",
                )
            off += 6
        body = _take(q, off, size, "TD report")
        end = off + size
        (sig_len,) = struct.unpack("<I", _take(q, end, 4, "signature length"))
        sig = _take(q, end + 4, sig_len, "signature data")
        if q[end + 4 + sig_len :].strip(b"\0"):
            raise AttestationError("bytes follow the TDX quote's signature data", "tdx-format")
        cert_type, cert_len = struct.unpack("<HI", _take(sig, 128, 6, "certification data"))
        if cert_type != 6:
            raise AttestationError(
                f"certification data type {cert_type} is not a QE report (6)", "tdx-format"
            )
        cert = _take(sig, 134, cert_len, "certification data")
        (auth_len,) = struct.unpack("<H", _take(cert, _QE_REPORT + 64, 2, "QE auth data"))
        auth = _take(cert, _QE_REPORT + 66, auth_len, "QE auth data")
        inner = _QE_REPORT + 66 + auth_len
        pck_type, pck_len = struct.unpack("<HI", _take(cert, inner, 6, "PCK data"))
        if pck_type != 5:
            raise AttestationError(
                f"PCK certification data type {pck_type} is not a PEM chain (5)", "tdx-format"
            )
        return cls(
            raw=q,
            version=version,
            tee_tcb_svn=body[0:16],
            mrseam=body[16:64],
            mrsignerseam=body[64:112],
            seam_attributes=body[112:120],
            td_attributes=body[120:128],
            xfam=body[128:136],
            mrtd=body[136:184],
            mrconfigid=body[184:232],
            mrowner=body[232:280],
            mrownerconfig=body[280:328],
            rtmrs=(body[328:376], body[376:424], body[424:472], body[472:520]),
            report_data=body[520:584],
            tee_tcb_svn2=body[584:600],
            signed=q[:end],
            signature=sig[:64],
            attestation_key=sig[64:128],
            qe_report=cert[:_QE_REPORT],
            qe_report_signature=cert[_QE_REPORT : _QE_REPORT + 64],
            qe_auth_data=auth,
            pck_chain=_take(cert, inner + 6, pck_len, "PCK chain").rstrip(b"\0"),
        )

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes[0] & TD_ATTR_DEBUG)


def verify_quote(
    quote: bytes | TdxQuote,
    *,
    at: dt.datetime | None = None,
    root: str | None = None,
    collateral: tdx_pccs.CollateralSource | None = None,
    policy: tdx_collateral.TcbPolicy | None = None,
) -> TdxQuote:
    """Verify a TDX quote's signatures and PCK chain, and with *collateral* its TCB.

    Args:
        at: the verification time: the PCK chain's validity and, with
            collateral, the CRLs' and collateral's freshness (default: now, UTC).
        root: the pinned root key hash (default ``INTEL_SGX_ROOT_SPKI_SHA256``).
        collateral: where Intel's collateral for the platform comes from
            (``tdx_pccs.CollateralDir`` or ``tdx_pccs.Pccs``); None checks only
            what the quote carries (see the module doc).
        policy: accepted TCB statuses and the grace for stale collateral
            (default: only UpToDate, no grace).

    Returns:
        The parsed quote; with collateral, ``.tcb`` holds the platform's status.

    Raises:
        AttestationError: code tdx-format, tdx-signature, tdx-qe-binding,
            tdx-qe-signature, cert-chain, cert-untrusted-root or cert-expired;
            with collateral also those of ``tdx_collateral.appraise`` and
            tdx-collateral-unavailable.
    """
    q = quote if isinstance(quote, TdxQuote) else TdxQuote.parse(quote)
    try:
        _p256(q.attestation_key).verify(_raw_sig(q.signature), q.signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AttestationError(
            "the TDX quote's signature does not verify with its attestation key", "tdx-signature"
        ) from None
    # The QE vouches for the attestation key in its own report's report_data.
    binding = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest()
    if q.qe_report[320:352] != binding or q.qe_report[352:384].strip(b"\0"):
        raise AttestationError(
            "the QE report does not bind the quote's attestation key", "tdx-qe-binding"
        )
    certs = load_certificates(q.pck_chain)
    pck = certs[0]
    at = (at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    root = root or INTEL_SGX_ROOT_SPKI_SHA256
    chain = _pck_chain(pck, certs, at, root)
    public = pck.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise AttestationError("the PCK key is not ECDSA", "cert-format")
    try:
        public.verify(_raw_sig(q.qe_report_signature), q.qe_report, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AttestationError(
            "the QE report's signature does not verify with the PCK certificate", "tdx-qe-signature"
        ) from None
    if collateral is None:
        return q
    ca = _PCK_CAS.get(common_name(chain[1]))
    if ca is None or len(chain) != 3:
        raise AttestationError(
            f"the PCK is issued by {common_name(chain[1])!r}, not Intel's platform or processor CA",
            "cert-chain",
        )
    fmspc = tdx_collateral.pck_tcb(pck).fmspc.hex()
    items = collateral.collateral(fmspc, ca, at)
    result = tdx_collateral.appraise(
        q, chain, items, at=at, root=root, policy=policy or tdx_collateral.TcbPolicy()
    )
    return dataclasses.replace(q, tcb=result)


_PCK_CAS = {"Intel SGX PCK Platform CA": "platform", "Intel SGX PCK Processor CA": "processor"}


def _pck_chain(
    pck: x509.Certificate, certs: list[x509.Certificate], at: dt.datetime, root: str
) -> list[x509.Certificate]:
    chain = [pck]
    while chain[-1].issuer != chain[-1].subject:
        issuer = next((c for c in certs if c.subject == chain[-1].issuer), None)
        if issuer is None or len(chain) > 4:
            raise AttestationError(
                f"the PCK chain has no issuer for {common_name(chain[-1])!r}", "cert-chain"
            )
        chain.append(issuer)
    if spki_sha256(chain[-1]) != root:
        raise AttestationError(
            f"the PCK chain's root {common_name(chain[-1])!r} is not Intel's pinned SGX root",
            "cert-untrusted-root",
        )
    for cert, issuer in zip(chain, chain[1:] + chain[-1:], strict=True):
        issued_by(cert, issuer, common_name(cert) or "PCK chain")
        check_validity(cert, at, common_name(cert) or "PCK chain")
    return chain


@dataclass(frozen=True)
class TdxReference:
    """Reference values for a verified TDX quote (hex strings; empty: any).

    Attributes:
        mrtd: accepted MRTDs (the TD's initial image).
        rtmrs: per RTMR index, the accepted values.
        mrconfigid: required MRCONFIGID.
        allow_debug: accept a TD with the DEBUG attribute (never in production).
        collateral: where Intel's collateral comes from (None: the quote alone).
        policy: the accepted TCB statuses and grace, with collateral.
    """

    mrtd: tuple[str, ...] = ()
    rtmrs: dict[int, tuple[str, ...]] = field(default_factory=dict)
    mrconfigid: str = ""
    allow_debug: bool = False
    collateral: tdx_pccs.CollateralSource | None = field(default=None, compare=False)
    policy: tdx_collateral.TcbPolicy = field(default_factory=tdx_collateral.TcbPolicy)

    def check(self, q: TdxQuote, report_data: bytes | None = None) -> None:
        """Refuse a quote outside these values.

        Raises:
            AttestationError: code tdx-debug, tdx-mrtd, tdx-rtmr, tdx-mrconfigid,
                tdx-report-data.
        """
        if q.debug and not self.allow_debug:
            raise AttestationError("the TD has the DEBUG attribute", "tdx-debug")
        if self.mrtd and q.mrtd.hex() not in {m.lower() for m in self.mrtd}:
            raise AttestationError(
                f"MRTD {q.mrtd.hex()[:16]}... is not a reference value", "tdx-mrtd"
            )
        for index, allowed in self.rtmrs.items():
            if q.rtmrs[index].hex() not in {v.lower() for v in allowed}:
                raise AttestationError(f"RTMR{index} is not a reference value", "tdx-rtmr")
        if self.mrconfigid and q.mrconfigid.hex() != self.mrconfigid.lower():
            raise AttestationError("MRCONFIGID differs from the reference", "tdx-mrconfigid")
        if report_data is not None and q.report_data != report_data.ljust(64, b"\0"):
            raise AttestationError(
                "report_data does not bind this challenge and key", "tdx-report-data"
            )
