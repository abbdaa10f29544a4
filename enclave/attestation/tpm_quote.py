"""TPM 2.0 quote evidence: an attestation key, quotes over PCRs, and their verifier.

The attestation key (AK) is a restricted ECDSA P-256 signing key created as
a primary in the endorsement hierarchy: the same template gives the same key
on the same TPM every time (it derives from the endorsement seed), so the
verifier registers the AK's public key once (``ak_public``) and nothing has
to be persisted in the TPM. A restricted key signs only structures the TPM
made itself, so a quote cannot be forged by asking the AK to sign bytes.

``quote(nonce, policy)`` returns the signed TPMS_ATTEST, the signature and
the PCR values. ``verify_quote`` checks, in this order: the signature with
the registered AK; the structure (magic, type QUOTE); the verifier's nonce
in extraData; the PCR selection is the one asked for; the PCR digest equals
SHA-256 of the reported values; the values equal the reference values.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sealstore.enclave.attestation import tpm
from sealstore.errors import AttestationError, BackendError

__all__ = ["QuoteInfo", "TpmQuote", "ak_public", "quote", "verify_quote"]

_MAGIC = 0xFF544347  # TPM_GENERATED_VALUE
_ST_ATTEST_QUOTE = 0x8018


@dataclass(frozen=True)
class TpmQuote:
    """What a workload sends: the TPM-signed attestation, its signature (DER), the PCR values."""

    attest: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    pcrs: dict[int, bytes]
    bank: str = "sha256"


@dataclass(frozen=True)
class QuoteInfo:
    """A verified quote's facts (clock and counters show reboots and suspends)."""

    pcrs: dict[int, bytes]
    clock: int
    reset_count: int
    restart_count: int
    firmware_version: int
    signer_name: bytes


def _ak_template() -> object:
    from tpm2_pytss import TPM2B_PUBLIC, TPMA_OBJECT

    attrs = (
        TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.SIGN_ENCRYPT
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
    )
    return TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attrs, nameAlg="sha256")


def _with_ak(ectx: object, fn: object) -> object:
    from tpm2_pytss import ESYS_TR, TPM2B_SENSITIVE_CREATE

    handle, public = ectx.create_primary(
        TPM2B_SENSITIVE_CREATE(), _ak_template(), ESYS_TR.ENDORSEMENT
    )[:2]
    try:
        return fn(handle, public)
    finally:
        ectx.flush_context(handle)


def ak_public(tcti: str | None = None) -> bytes:
    """The attestation key's public key (PEM): what a verifier registers for this machine.

    Raises:
        BackendError: no TPM, or it refused.
    """
    from tpm2_pytss import TSS2_Exception

    try:
        with tpm.connect(tcti) as ectx:
            return _with_ak(ectx, lambda _h, public: bytes(public.to_pem()))
    except TSS2_Exception as exc:
        raise BackendError(f"the TPM could not create its attestation key: {exc}") from None


def quote(nonce: bytes, policy: tpm.PcrPolicy, tcti: str | None = None) -> TpmQuote:
    """Quote *policy*'s PCRs with the verifier's *nonce* (at most 64 bytes).

    Raises:
        BackendError: no TPM, or it refused.
    """
    from tpm2_pytss import TPM2_ALG, TPMT_SIG_SCHEME, TSS2_Exception

    if len(nonce) > 64:
        raise ValueError("a quote nonce is at most 64 bytes")
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.any.hashAlg = TPM2_ALG.SHA256

    def sign(handle: object, _public: object) -> tuple[bytes, bytes]:
        attest, sig = ectx.quote(handle, policy.spec, nonce, scheme)
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        return bytes(attest), encode_dss_signature(r, s)

    try:
        with tpm.connect(tcti) as ectx:
            attest, signature = _with_ak(ectx, sign)
            values = tpm.read_pcrs(ectx, policy)
    except TSS2_Exception as exc:
        raise BackendError(f"the TPM could not quote: {exc}") from None
    return TpmQuote(attest, signature, values, policy.bank)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise AttestationError(
                "the TPM quote's attestation structure is truncated", "tpm-format"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def sized(self) -> bytes:
        return self.take(self.unpack(">H")[0])


def verify_quote(
    q: TpmQuote,
    ak_pem: bytes,
    nonce: bytes,
    policy: tpm.PcrPolicy,
    reference: Mapping[int, bytes] | None = None,
) -> QuoteInfo:
    """Verify a quote against the registered AK, the nonce issued, and reference PCR values.

    Args:
        ak_pem: the AK public key registered for this machine (``ak_public``).
        nonce: the challenge the verifier issued for this quote.
        policy: the PCR selection asked for.
        reference: expected PCR values (index -> digest); PCRs not named are
            reported but not checked.

    Raises:
        AttestationError: code tpm-signature, tpm-format, tpm-nonce,
            tpm-selection, tpm-pcr-digest or tpm-pcr-mismatch.
    """
    try:
        key = serialization.load_pem_public_key(ak_pem)
    except ValueError:
        raise AttestationError("the registered AK is not a PEM public key", "tpm-format") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AttestationError("the registered AK is not an ECDSA key", "tpm-format")
    try:
        key.verify(q.signature, q.attest, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AttestationError(
            "the quote's signature does not verify with the registered AK", "tpm-signature"
        ) from None
    r = _Reader(q.attest)
    magic, kind = r.unpack(">IH")
    if magic != _MAGIC or kind != _ST_ATTEST_QUOTE:
        raise AttestationError("the signed structure is not a TPM quote", "tpm-format")
    signer = r.sized()
    extra = r.sized()
    clock, resets, restarts, _safe, firmware = r.unpack(">QIIBQ")
    if not hmac.compare_digest(extra, nonce):
        raise AttestationError("the quote does not carry this challenge's nonce", "tpm-nonce")
    (count,) = r.unpack(">I")
    selection = struct.pack(">I", count)
    for _ in range(count):
        alg, size = r.unpack(">HB")
        selection += struct.pack(">HB", alg, size) + r.take(size)
    if selection != policy.selection():
        raise AttestationError(f"the quote is not over PCRs {policy.spec}", "tpm-selection")
    pcr_digest = r.sized()
    if sorted(q.pcrs) != list(policy.pcrs):
        raise AttestationError(f"the values sent are not PCRs {policy.spec}", "tpm-selection")
    values = b"".join(q.pcrs[p] for p in policy.pcrs)
    if not hmac.compare_digest(hashlib.sha256(values).digest(), pcr_digest):
        raise AttestationError(
            "the PCR values sent are not the ones the TPM quoted", "tpm-pcr-digest"
        )
    for index, want in (reference or {}).items():
        if index not in q.pcrs or q.pcrs[index] != want:
            raise AttestationError(f"PCR {index} is not its reference value", "tpm-pcr-mismatch")
    return QuoteInfo(dict(q.pcrs), clock, resets, restarts, firmware, signer)
