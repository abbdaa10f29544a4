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
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from sealstore.errors import AttestationError

__all__ = ["check_validity", "common_name", "issued_by", "load_certificates", "spki_sha256"]


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in *data*: PEM (one or several) or a single DER certificate.

    Raises:
        AttestationError: not a certificate.
    """
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise AttestationError(f"not an X.509 certificate: {exc}", "cert-format") from None


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
    except (ValueError, TypeError, InvalidSignature):
        raise AttestationError(
            f"the {what} certificate is not signed by {common_name(issuer) or 'its issuer'}",
            "cert-chain",
        ) from None
