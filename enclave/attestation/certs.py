"""X.509 helpers the evidence verifiers share: loading, pinned roots, chain links.

Attestation chains are not WebPKI: AMD signs with RSA-PSS, Intel's PCK
certificates carry SGX extensions, both have their own roots, and evidence
is often checked long after it was made. So the checks are explicit: a
named issuer's signature, validity at a time the caller may pin, and a root
accepted only by the hash of its public key.
"""

from __future__ import annotations

import datetime as dt
import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from sealstore.errors import AttestationError

__all__ = ["check_validity", "common_name", "issued_by", "load_certificates", "spki_sha256"]

# What cryptography raises for a certificate it cannot read: not all are ValueErrors
# (a name attribute of the wrong ASN.1 type is a TypeError).
_MALFORMED = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.InvalidVersion,
    x509.UnsupportedGeneralNameType,
)


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in *data*: PEM (one or several) or a single DER certificate.

    Raises:
        AttestationError: not a certificate.
    """
    try:
        if b"-----BEGIN" in data:
            found = x509.load_pem_x509_certificates(data)
        else:
            found = [x509.load_der_x509_certificate(data)]
        for cert in found:
            _parse_fields(cert)
    except _MALFORMED as exc:
        raise AttestationError(f"not an X.509 certificate: {exc}", "cert-format") from None
    return found


def _parse_fields(cert: x509.Certificate) -> None:
    """Read every field the verifiers use now (one of ``_MALFORMED`` if one is bad).

    cryptography parses a certificate's names, extensions and key only when
    they are first read: without this, a caller's certificate with a
    malformed issuer, an extension given twice or an unknown key type raised
    ValueError, DuplicateExtension or UnsupportedAlgorithm from deep in a
    chain check (found by fuzzing, the unknown key type by review).
    """
    _ = (cert.subject, cert.issuer, cert.extensions)
    _ = (cert.not_valid_before_utc, cert.not_valid_after_utc)
    cert.public_key()


def spki_sha256(cert: x509.Certificate) -> str:
    """SHA-256 (hex) of the certificate's SubjectPublicKeyInfo: what a pinned root is."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def common_name(cert: x509.Certificate) -> str:
    """The subject's CN, or "" if it has none."""
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def check_validity(cert: x509.Certificate, at: dt.datetime, what: str) -> None:
    """Refuse *cert* outside its validity period at *at* (code cert-expired)."""
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise AttestationError(
            f"the {what} certificate is valid {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not at {at:%Y-%m-%d %H:%M} UTC",
            "cert-expired",
        )


def issued_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    """Refuse *cert* unless *issuer* signed it and is named as its issuer (code cert-chain)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise AttestationError(
            f"the {what} certificate is not signed by {common_name(issuer) or 'its issuer'}",
            "cert-chain",
        ) from None
