"""Intel's TDX collateral: TCB info, QE identity and CRLs, checked as Intel's QVL checks them.

A TDX quote that verifies up to the PCK chain proves "a genuine Intel
platform signed this". Whether that platform is *up to date*, whether its
quoting enclave is Intel's, and whether its PCK certificate was revoked is
answered by collateral Intel publishes through its PCS (and caches in a
PCCS), each piece signed under the same pinned Intel SGX Root CA:

* **TCB info** (``tcbInfo``, id "TDX", version 3) for the platform's FMSPC:
  TCB levels, each a set of SGX component SVNs + PCESVN (matched against the
  PCK certificate's SGX extension) and TDX component SVNs (matched against
  the TD report's TEE_TCB_SVN), and a status; the TDX module's signer and
  its per-version levels (``tdxModuleIdentities``).
* **QE identity** (``enclaveIdentity``, id "TD_QE"): the quoting enclave's
  MRSIGNER, ISVPRODID, MISCSELECT and ATTRIBUTES (with masks), its ISVSVN
  levels.
* **CRLs**: the PCK CRL of the CA that issued the PCK (platform or
  processor) and the Root CA CRL (for the intermediates).

The order and the status arithmetic follow Intel's Quote Verification
Library (QVL: ``QuoteVerifier.cpp``, ``TcbLevelCheck.cpp``,
``TdxModuleCheck.cpp``, ``TDRelaunchCheck.cpp``, ``EnclaveReportVerifier.cpp``).

The PCK certificate's SGX extension is read with a few lines of DER parsing
here: cryptography exposes unknown extensions only as bytes, and the
structure (a SEQUENCE of OID/value pairs) is small and fixed, which does not
justify a general ASN.1 dependency.
"""

from __future__ import annotations

import binascii
import datetime as dt
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sealstore.enclave.attestation.certs import check_validity, common_name, issued_by, spki_sha256
from sealstore.errors import AttestationError

if TYPE_CHECKING:
    from sealstore.enclave.attestation.tdx import TdxQuote

__all__ = ["STATUSES", "Collateral", "TcbPolicy", "TcbResult", "appraise", "load_crl", "pck_tcb"]

# Worst last. QVL's TDX statuses; "Revoked" is never acceptable.
STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "TDRelaunchAdvised",
    "TDRelaunchAdvisedConfigurationNeeded",
    "Revoked",
)
# What a TCB level itself may say; the relaunch advice is computed (TDX 1.5).
_LEVEL_STATUSES = tuple(s for s in STATUSES if not s.startswith("TDRelaunch"))
_SGX_EXT = "1.2.840.113741.1.13.1"


@dataclass(frozen=True)
class Collateral:
    """One platform's collateral, as the PCS v4 API returns it (bytes, unparsed).

    Attributes:
        tcb_info: the body of ``/tdx/certification/v4/tcb``: ``{"tcbInfo": ..., "signature": ...}``.
        tcb_info_chain: PEM of its ``TCB-Info-Issuer-Chain`` (TCB Signing cert, root).
        qe_identity: the body of ``/tdx/certification/v4/qe/identity``.
        qe_identity_chain: PEM of its ``SGX-Enclave-Identity-Issuer-Chain``.
        pck_crl: the CRL of the CA that issued the PCK (DER, PEM or hex DER).
        root_crl: the Intel SGX Root CA's CRL (DER, PEM or hex DER).
        on_verified: called by ``appraise`` once all four items verified
            (signatures to the pinned root, freshness): a source caches only then.
    """

    tcb_info: bytes = field(repr=False)
    tcb_info_chain: bytes = field(repr=False)
    qe_identity: bytes = field(repr=False)
    qe_identity_chain: bytes = field(repr=False)
    pck_crl: bytes = field(repr=False)
    root_crl: bytes = field(repr=False)
    on_verified: Callable[[], None] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class TcbPolicy:
    """Which TCB statuses are accepted, and how stale collateral may be.

    Attributes:
        accept: statuses a quote may have (default only "UpToDate"); "Revoked"
            cannot be accepted.
        grace: how long after its ``nextUpdate`` collateral still counts.
        min_evaluation: the lowest ``tcbEvaluationDataNumber`` accepted for TCB
            info and QE identity (0: any), so an old but unexpired copy can be
            refused once Intel published a TCB recovery.
    """

    accept: frozenset[str] = frozenset({"UpToDate"})
    grace: dt.timedelta = dt.timedelta(0)
    min_evaluation: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.accept) - set(STATUSES))
        if unknown:
            raise ValueError(f"unknown TCB status {unknown[0]!r} (known: {', '.join(STATUSES)})")
        if "Revoked" in self.accept:
            raise ValueError("a Revoked TCB cannot be accepted")
        if not self.accept:
            raise ValueError("accept needs at least one TCB status")
        if self.grace < dt.timedelta(0):
            raise ValueError("grace cannot be negative")


@dataclass(frozen=True)
class TcbResult:
    """What the collateral says about the quote's platform.

    Attributes:
        status: the platform's TCB status (one of ``STATUSES``), QE and TDX
            module folded in as QVL does.
        advisory_ids: Intel security advisories (INTEL-SA-...) that apply.
        tcb_date: the matched TCB level's date.
        fmspc: the platform's FMSPC (hex).
        evaluation: the TCB info's ``tcbEvaluationDataNumber``.
    """

    status: str
    advisory_ids: tuple[str, ...]
    tcb_date: str
    fmspc: str
    evaluation: int


@dataclass(frozen=True)
class PckTcb:
    """The SGX extension of a PCK certificate: what TCB info is matched against."""

    fmspc: bytes
    pce_id: bytes
    sgx_svns: tuple[int, ...]  # the 16 SGX TCB component SVNs
    pcesvn: int


# -- the PCK certificate's SGX extension ------------------------------------------


def _der(buf: bytes, off: int) -> tuple[int, bytes, int]:
    """One DER TLV at *off*: (tag, value, offset after it)."""
    if off + 2 > len(buf):
        raise ValueError("truncated")
    tag, n = buf[off], buf[off + 1]
    off += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 3 or off + k > len(buf):
            raise ValueError("bad length")
        n, off = int.from_bytes(buf[off : off + k], "big"), off + k
    if off + n > len(buf):
        raise ValueError("truncated")
    return tag, buf[off : off + n], off + n


def _items(seq: bytes) -> Iterable[tuple[str, int, bytes]]:
    """(OID, value tag, value) of each SEQUENCE { OID, value } in *seq*."""
    off = 0
    while off < len(seq):
        tag, item, off = _der(seq, off)
        tag_o, oid, rest = _der(item, 0)
        tag_v, value, _ = _der(item, rest)
        if tag != 0x30 or tag_o != 0x06:
            raise ValueError("not an OID/value pair")
        yield _oid(oid), tag_v, value


def _oid(raw: bytes) -> str:
    parts, n = [raw[0] // 40, raw[0] % 40], 0
    for b in raw[1:]:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(n)
            n = 0
    return ".".join(map(str, parts))


def pck_tcb(cert: x509.Certificate) -> PckTcb:
    """The FMSPC, PCE-ID and TCB (16 SGX SVNs, PCESVN) of a PCK certificate.

    Raises:
        AttestationError: code cert-format (no SGX extension, or a malformed one).
    """
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(_SGX_EXT)).value
        tag, body, _ = _der(ext.value, 0)  # type: ignore[attr-defined]
        if tag != 0x30:
            raise ValueError("not a SEQUENCE")
        found: dict[str, Any] = {}
        for oid, vtag, value in _items(body):
            if oid == _SGX_EXT + ".2" and vtag == 0x30:
                for sub, stag, sval in _items(value):
                    found[sub] = int.from_bytes(sval, "big") if stag == 0x02 else sval
            else:
                found[oid] = value
        svns = tuple(found[f"{_SGX_EXT}.2.{i}"] for i in range(1, 17))
        return PckTcb(
            fmspc=found[_SGX_EXT + ".4"],
            pce_id=found[_SGX_EXT + ".3"],
            sgx_svns=svns,
            pcesvn=found[_SGX_EXT + ".2.17"],
        )
    except (x509.ExtensionNotFound, ValueError, KeyError, IndexError, TypeError):
        raise AttestationError(
            "the PCK certificate has no readable SGX extension (FMSPC, TCB)", "cert-format"
        ) from None


# -- signed JSON and CRLs ------------------------------------------------------------


def _time(value: Any, what: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(dt.UTC)
    except ValueError:
        raise AttestationError(
            f"{what} is not a date: {value!r}", "tdx-collateral-format"
        ) from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key is given twice")
    return dict(pairs)


def _strict_json(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_no_duplicates)


def _signed_json(raw: bytes, key: str, what: str) -> tuple[dict[str, Any], bytes, bytes]:
    """(the object Intel signed, its exact bytes, the raw r||s signature).

    Intel signs the bytes of the inner object as served, so they are cut out
    of the document, not re-serialised; and the object judged is the one
    parsed from those very bytes. The document must be exactly
    ``{key: {...}, "signature": "hex"}`` without a repeated key, so no second
    copy (nested or repeated) can be judged while another is verified.
    """
    try:
        text = raw.decode("utf-8")
        doc = _strict_json(text)
        if not isinstance(doc, dict) or set(doc) != {key, "signature"}:
            raise ValueError(f"not {{{key!r}, 'signature'}}")
        sig = bytes.fromhex(doc["signature"])
        # The only other member is a hex string: the first '"key"' is the member's name.
        start = text.index(":", text.index(f'"{key}"')) + 1
        start += len(text[start:]) - len(text[start:].lstrip())
        _, end = json.JSONDecoder().raw_decode(text, start)
        body = text[start:end]
        obj = _strict_json(body)
        if not isinstance(obj, dict) or obj != doc[key]:
            raise ValueError("the signed bytes are not the document's object")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise AttestationError(
            f"the {what} is not PCS JSON with a signature", "tdx-collateral-format"
        ) from None
    if len(sig) != 64:
        raise AttestationError(f"the {what}'s signature is not 64 bytes", "tdx-collateral-format")
    return obj, body.encode("utf-8"), sig


def load_crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    """A CRL given as DER, PEM or hex-encoded DER (what a PCCS serves).

    Raises:
        AttestationError: code tdx-collateral-format.
    """
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        stripped = data.strip()
        if stripped and all(c in b"0123456789abcdefABCDEF" for c in stripped):
            data = binascii.unhexlify(stripped)
        return x509.load_der_x509_crl(data)
    except (ValueError, binascii.Error):
        raise AttestationError(f"the {what} is not a CRL", "tdx-collateral-format") from None


def _fresh(
    what: str,
    issued: dt.datetime,
    next_update: dt.datetime | None,
    at: dt.datetime,
    grace: dt.timedelta,
) -> None:
    if issued > at:
        raise AttestationError(
            f"the {what} was issued {issued:%Y-%m-%d %H:%M}, after the verification time "
            f"{at:%Y-%m-%d %H:%M} UTC",
            "tdx-collateral-stale",
        )
    if next_update is None or at > next_update + grace:
        when = f"{next_update:%Y-%m-%d %H:%M} UTC" if next_update else "never (no nextUpdate)"
        raise AttestationError(
            f"the {what} expired: next update due {when}, now {at:%Y-%m-%d %H:%M} UTC",
            "tdx-collateral-stale",
        )


# The subject of Intel's TCB Signing certificate, as in every TCB-Info /
# QE-Identity issuer chain Intel publishes (tests/data/tdx).
TCB_SIGNING_SUBJECT = x509.Name(
    [
        x509.NameAttribute(x509.NameOID.COMMON_NAME, "Intel SGX TCB Signing"),
        x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Intel Corporation"),
        x509.NameAttribute(x509.NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(x509.NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(x509.NameOID.COUNTRY_NAME, "US"),
    ]
)


def _attrs(name: x509.Name) -> list[tuple[str, object]]:
    """The name's (OID, value) pairs in order, whatever string type each is encoded in."""
    return [(a.oid.dotted_string, a.value) for a in name]


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _root_of(pem: bytes, at: dt.datetime, root: str, what: str) -> list[x509.Certificate]:
    """The issuer chain [TCB Signing cert, root] of a collateral item, checked as Intel's QVL.

    Exactly two certificates: the signer, whose subject is Intel's TCB Signing
    name, issued by the pinned, self-signed root, which is a CA. Any other key
    under the root (a PCK's, a platform CA's) cannot sign TCB info or QE identity.
    """
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise AttestationError(
            f"the {what} issuer chain is not PEM", "tdx-collateral-format"
        ) from None
    if len(certs) != 2:
        raise AttestationError(
            f"the {what} issuer chain has {len(certs)} certificates, not the two "
            "[Intel SGX TCB Signing, Intel SGX Root CA]",
            "tdx-collateral-signature",
        )
    signer, top = certs
    if top.issuer != top.subject or spki_sha256(top) != root:
        raise AttestationError(
            f"the {what} issuer chain does not end at Intel's pinned SGX root",
            "tdx-collateral-signature",
        )
    if not _is_ca(top):
        raise AttestationError(
            f"the {what} issuer chain's root is not a CA", "tdx-collateral-signature"
        )
    if _attrs(signer.subject) != _attrs(TCB_SIGNING_SUBJECT) or _attrs(signer.issuer) != _attrs(
        top.subject
    ):
        raise AttestationError(
            f"the {what} is signed by {signer.subject.rfc4514_string()!r}, "
            "not Intel's SGX TCB Signing certificate",
            "tdx-collateral-signature",
        )
    chain = [signer, top]
    try:
        for cert, issuer in ((signer, top), (top, top)):
            issued_by(cert, issuer, common_name(cert) or what)
            check_validity(cert, at, common_name(cert) or what)
    except AttestationError as exc:
        raise AttestationError(f"{what} issuer chain: {exc}", "tdx-collateral-signature") from None
    return chain


def _verify_p256(cert: x509.Certificate, sig: bytes, data: bytes, what: str) -> None:
    key = cert.public_key()
    try:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        rs = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        key.verify(rs, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AttestationError(
            f"the {what}'s signature does not verify with {common_name(cert)!r}",
            "tdx-collateral-signature",
        ) from None


def _check_crl(
    crl: x509.CertificateRevocationList,
    issuer: x509.Certificate,
    what: str,
    at: dt.datetime,
    grace: dt.timedelta,
) -> None:
    if crl.issuer != issuer.subject:
        raise AttestationError(
            f"the {what} is issued by {crl.issuer.rfc4514_string()!r}, not by "
            f"{common_name(issuer)!r}",
            "tdx-collateral-mismatch",
        )
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
        raise AttestationError(
            f"the {what}'s signature does not verify with {common_name(issuer)!r}",
            "tdx-collateral-signature",
        )
    _fresh(what, crl.last_update_utc, crl.next_update_utc, at, grace)


def _not_revoked(crl: x509.CertificateRevocationList, cert: x509.Certificate, what: str) -> None:
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is not None:
        raise AttestationError(
            f"the {common_name(cert) or 'certificate'} (serial {cert.serial_number:x}) is "
            f"revoked in the {what} since {entry.revocation_date_utc:%Y-%m-%d}",
            "tdx-revoked",
        )


# -- appraisal -------------------------------------------------------------------


def appraise(
    quote: TdxQuote,
    pck_chain: list[x509.Certificate],
    collateral: Collateral,
    *,
    at: dt.datetime,
    root: str,
    policy: TcbPolicy,
) -> TcbResult:
    """Check a quote (whose signatures and PCK chain verified) against Intel's collateral.

    Args:
        quote: the parsed quote.
        pck_chain: [PCK, its CA, ..., root], as verified.
        collateral: the platform's collateral (see ``Collateral``).
        at: the verification time: validity, CRLs and ``nextUpdate`` are checked at it.
        root: the pinned root key hash.
        policy: accepted statuses, grace, minimum evaluation number.

    Returns:
        The platform's TCB status and the advisories that apply.

    Raises:
        AttestationError: tdx-collateral-format, tdx-collateral-signature,
            tdx-collateral-stale, tdx-collateral-mismatch, tdx-revoked,
            tdx-qe-identity, tdx-module, tdx-tcb-unsupported, tdx-tcb-status
            (and cert-format for a PCK without its SGX extension).
    """
    pck, ca = pck_chain[0], pck_chain[1]
    root_cert = pck_chain[-1]
    grace = policy.grace

    # Revocation first: a revoked PCK must not get as far as a TCB status.
    root_crl = load_crl(collateral.root_crl, "Root CA CRL")
    _check_crl(root_crl, root_cert, "Root CA CRL", at, grace)
    pck_crl = load_crl(collateral.pck_crl, "PCK CRL")
    _check_crl(pck_crl, ca, "PCK CRL", at, grace)
    _not_revoked(pck_crl, pck, "PCK CRL")
    for inter in pck_chain[1:-1]:
        _not_revoked(root_crl, inter, "Root CA CRL")

    tcb_info = _signed_item(
        collateral.tcb_info,
        collateral.tcb_info_chain,
        "tcbInfo",
        "TCB info",
        root_crl,
        at,
        root,
        policy,
    )
    qe_id = _signed_item(
        collateral.qe_identity,
        collateral.qe_identity_chain,
        "enclaveIdentity",
        "QE identity",
        root_crl,
        at,
        root,
        policy,
    )

    # All four items are Intel's and current: only now may a source keep them.
    if collateral.on_verified is not None:
        collateral.on_verified()

    qe_status, qe_advisories = _qe_identity(quote.qe_report, qe_id)
    platform = pck_tcb(pck)
    return _tcb_level(quote, platform, tcb_info, qe_status, qe_advisories, policy)


def _signed_item(
    raw: bytes,
    chain_pem: bytes,
    key: str,
    what: str,
    root_crl: x509.CertificateRevocationList,
    at: dt.datetime,
    root: str,
    policy: TcbPolicy,
) -> dict[str, Any]:
    obj, body, sig = _signed_json(raw, key, what)
    chain = _root_of(chain_pem, at, root, what)
    for cert in chain[:-1]:
        _not_revoked(root_crl, cert, "Root CA CRL")
    _verify_p256(chain[0], sig, body, what)
    _fresh(
        what,
        _time(obj.get("issueDate"), f"{what} issueDate"),
        _time(obj.get("nextUpdate"), f"{what} nextUpdate"),
        at,
        policy.grace,
    )
    evaluation = obj.get("tcbEvaluationDataNumber")
    if not isinstance(evaluation, int) or evaluation < policy.min_evaluation:
        raise AttestationError(
            f"the {what}'s tcbEvaluationDataNumber {evaluation} is below the policy's "
            f"minimum {policy.min_evaluation}",
            "tdx-collateral-stale",
        )
    return obj


def _hex(obj: dict[str, Any], key: str, what: str) -> bytes:
    try:
        return bytes.fromhex(obj[key])
    except (KeyError, ValueError, TypeError):
        raise AttestationError(f"the {what} lacks a hex {key!r}", "tdx-collateral-format") from None


def _masked(value: bytes, mask: bytes) -> bytes:
    return bytes(a & b for a, b in zip(value, mask, strict=False))


def _levels_status(levels: Any, svn: int, what: str) -> tuple[str, tuple[str, ...]] | None:
    """The status of the first level (highest first) whose isvsvn *svn* reaches."""
    if not isinstance(levels, list):
        raise AttestationError(f"the {what} has no tcbLevels", "tdx-collateral-format")
    try:
        ordered = sorted(levels, key=lambda lv: lv["tcb"]["isvsvn"], reverse=True)
        for level in ordered:
            if svn >= level["tcb"]["isvsvn"]:
                return str(level["tcbStatus"]), tuple(level.get("advisoryIDs", ()))
    except (KeyError, TypeError):
        raise AttestationError(
            f"the {what} has a malformed TCB level", "tdx-collateral-format"
        ) from None
    return None


def _qe_identity(report: bytes, ident: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """Match the QE's SGX report to Intel's TD_QE identity; its status and advisories."""
    if ident.get("id") != "TD_QE" or ident.get("version") != 2:
        raise AttestationError(
            f"the QE identity is {ident.get('id')!r} v{ident.get('version')}, not TD_QE v2",
            "tdx-collateral-mismatch",
        )
    what = "QE identity"
    miscselect, attributes = report[16:20], report[48:64]
    mrsigner, prodid = report[128:160], int.from_bytes(report[256:258], "little")
    isvsvn = int.from_bytes(report[258:260], "little")
    if _masked(miscselect, _hex(ident, "miscselectMask", what)) != _hex(ident, "miscselect", what):
        raise AttestationError(
            "the QE's MISCSELECT does not match Intel's TD_QE", "tdx-qe-identity"
        )
    if _masked(attributes, _hex(ident, "attributesMask", what)) != _hex(ident, "attributes", what):
        raise AttestationError("the QE's ATTRIBUTES do not match Intel's TD_QE", "tdx-qe-identity")
    if mrsigner != _hex(ident, "mrsigner", what):
        raise AttestationError(
            f"the QE's MRSIGNER {mrsigner.hex()[:16]}... is not Intel's", "tdx-qe-identity"
        )
    if prodid != ident.get("isvprodid"):
        raise AttestationError(
            f"the QE's ISVPRODID {prodid} is not TD_QE's {ident.get('isvprodid')}",
            "tdx-qe-identity",
        )
    found = _levels_status(ident.get("tcbLevels"), isvsvn, what)
    if found is None:
        raise AttestationError(
            f"the QE's ISVSVN {isvsvn} has no TCB level in Intel's TD_QE identity",
            "tdx-qe-identity",
        )
    if found[0] not in ("UpToDate", "OutOfDate", "Revoked"):
        raise AttestationError(f"unknown QE TCB status {found[0]!r}", "tdx-collateral-format")
    return found


def _svns(components: Any, what: str) -> list[int]:
    try:
        svns = [int(c["svn"]) for c in components]
    except (KeyError, TypeError, ValueError):
        raise AttestationError(
            f"the TCB info has malformed {what}", "tdx-collateral-format"
        ) from None
    if len(svns) != 16:
        raise AttestationError(f"the TCB info's {what} are not 16", "tdx-collateral-format")
    return svns


def _fold(status: str, other: str) -> str:
    """QVL's convergence of a TCB level's status with the QE's or the TDX module's."""
    if other == "OutOfDate":
        if status in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if status in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    if other == "Revoked":
        return "Revoked"
    return status


def _tcb_level(
    quote: TdxQuote,
    platform: PckTcb,
    info: dict[str, Any],
    qe_status: str,
    qe_advisories: tuple[str, ...],
    policy: TcbPolicy,
) -> TcbResult:
    fmspc = _hex(info, "fmspc", "TCB info")
    if info.get("id") != "TDX" or info.get("version") != 3:
        raise AttestationError(
            f"the TCB info is {info.get('id')!r} v{info.get('version')}, not TDX v3",
            "tdx-collateral-mismatch",
        )
    if fmspc != platform.fmspc or _hex(info, "pceId", "TCB info") != platform.pce_id:
        raise AttestationError(
            f"the TCB info is for FMSPC {fmspc.hex()}, the PCK certificate's is "
            f"{platform.fmspc.hex()}",
            "tdx-collateral-mismatch",
        )
    tee = quote.tee_tcb_svn
    module_status, module_advisories = _tdx_module(quote, info)
    # TEE_TCB_SVN[0:2] are the TDX module's SVN and version; with a version
    # set, the module is judged by tdxModuleIdentities, not by the level.
    first = 2 if tee[1] > 0 else 0
    levels = info.get("tcbLevels")
    if not isinstance(levels, list):
        raise AttestationError("the TCB info has no tcbLevels", "tdx-collateral-format")
    chosen = sgx_level = None
    for level in levels:
        tcb = level.get("tcb") if isinstance(level, dict) else None
        if not isinstance(tcb, dict):
            raise AttestationError("the TCB info has a malformed level", "tdx-collateral-format")
        sgx = _svns(tcb.get("sgxtcbcomponents"), "sgxtcbcomponents")
        if any(p < s for p, s in zip(platform.sgx_svns, sgx, strict=True)):
            continue
        if platform.pcesvn < tcb.get("pcesvn", 1 << 16):
            continue
        sgx_level = sgx_level or level
        tdx = _svns(tcb.get("tdxtcbcomponents"), "tdxtcbcomponents")
        if all(tee[i] >= tdx[i] for i in range(first, 16)):
            chosen = level
            break
    if chosen is None:
        raise AttestationError(
            f"no TCB level of FMSPC {fmspc.hex()} matches this platform's SVNs (SGX "
            f"{'.'.join(map(str, platform.sgx_svns[:8]))}, PCESVN {platform.pcesvn}, TEE "
            f"{tee[:4].hex()}): not supported",
            "tdx-tcb-unsupported",
        )
    status, sgx_status = str(chosen.get("tcbStatus")), str(sgx_level.get("tcbStatus"))
    if status not in _LEVEL_STATUSES or sgx_status not in _LEVEL_STATUSES:
        raise AttestationError(f"unknown TCB status {status!r}", "tdx-collateral-format")
    status = _fold(status, module_status)
    if quote.tee_tcb_svn2 and qe_status == "UpToDate":
        status = _relaunch(quote.tee_tcb_svn2, info, sgx_status, status, module_status)
    status = _fold(status, qe_status)
    advisories = tuple(sorted({*chosen.get("advisoryIDs", ()), *module_advisories, *qe_advisories}))
    result = TcbResult(
        status=status,
        advisory_ids=advisories,
        tcb_date=str(chosen.get("tcbDate", "")),
        fmspc=fmspc.hex(),
        evaluation=int(info.get("tcbEvaluationDataNumber", 0)),
    )
    if status not in policy.accept:
        advice = f" ({', '.join(advisories)})" if advisories else ""
        raise AttestationError(
            f"the platform's TCB is {status}{advice}; accepted: {', '.join(sorted(policy.accept))}",
            "tdx-tcb-status",
        )
    return result


def _relaunch(svn2: bytes, info: dict[str, Any], sgx: str, tdx: str, module: str) -> str:
    """QVL's TD relaunch advice (TDX 1.5): *tdx* unless a relaunch would make it current.

    TEE_TCB_SVN2 is the TDX module the platform runs now; TEE_TCB_SVN the
    one the TD was launched under. A TD out of date only because of its
    launch-time module, on a platform that is current, is told to relaunch.
    """
    if sgx not in (
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
    ):
        return tdx
    if tdx not in ("OutOfDate", "OutOfDateConfigurationNeeded") or module != "OutOfDate":
        return tdx
    latest = _svns(info["tcbLevels"][0]["tcb"].get("tdxtcbcomponents"), "tdxtcbcomponents")
    if svn2[1] == 0:
        module_now = latest[0]
    else:
        levels = _module_identity(info, svn2[1]).get("tcbLevels")
        if not isinstance(levels, list) or not levels:
            raise AttestationError(
                "the TDX module identity has no TCB level", "tdx-tcb-unsupported"
            )
        module_now = max(int(lv["tcb"]["isvsvn"]) for lv in levels)
    if svn2[0] < module_now or svn2[2] < latest[2]:
        return tdx
    config = any("Configuration" in st for st in (sgx, tdx))
    return "TDRelaunchAdvisedConfigurationNeeded" if config else "TDRelaunchAdvised"


def _module_identity(info: dict[str, Any], version: int) -> dict[str, Any]:
    wanted = f"TDX_{version:02X}"
    ids = info.get("tdxModuleIdentities")
    ident = next((m for m in ids or () if str(m.get("id", "")).upper() == wanted), None)
    if not isinstance(ident, dict):
        raise AttestationError(
            f"the TCB info has no identity {wanted} for this TDX module", "tdx-module"
        )
    return ident


def _tdx_module(quote: TdxQuote, info: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """Check the TDX module's signer and attributes; its status from tdxModuleIdentities."""
    svn, version = quote.tee_tcb_svn[0], quote.tee_tcb_svn[1]
    ident: dict[str, Any] | None = info.get("tdxModule")
    if version > 0:
        ident = _module_identity(info, version)
    if not isinstance(ident, dict):
        raise AttestationError("the TCB info has no tdxModule", "tdx-collateral-format")
    if quote.mrsignerseam != _hex(ident, "mrsigner", "TDX module identity"):
        raise AttestationError("the TDX module's MRSIGNERSEAM is not Intel's", "tdx-module")
    attrs, mask = (
        _hex(ident, "attributes", "TDX module"),
        _hex(ident, "attributesMask", "TDX module"),
    )
    if _masked(quote.seam_attributes, mask) != attrs:
        raise AttestationError("the TDX module's SEAMATTRIBUTES do not match", "tdx-module")
    if version == 0:
        return "UpToDate", ()
    found = _levels_status(ident.get("tcbLevels"), svn, "TDX module identity")
    if found is None:
        raise AttestationError(
            f"the TDX module TDX_{version:02X} SVN {svn} has no TCB level: not supported",
            "tdx-tcb-unsupported",
        )
    if found[0] not in ("UpToDate", "OutOfDate", "Revoked"):
        raise AttestationError(
            f"unknown TDX module TCB status {found[0]!r}", "tdx-collateral-format"
        )
    return found
