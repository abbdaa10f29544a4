"""NVIDIA's reference integrity manifests (RIMs) for GPU attestation: load and verify them.

A RIM is an ISO/IEC 19770-2 SWID tag (XML) that NVIDIA publishes per driver
release and per board VBIOS. Each ``Resource type="Measurement"`` holds the
reference values of one measurement index: ``active`` (whether it is to be
compared), ``alternatives`` (how many values are acceptable) and the values
``Hash0``..``HashN-1`` (SHA-384, hex) in the xmlenc#sha384 namespace.

The file is signed with XML-DSig (enveloped, ECDSA P-384, exclusive-free
C14N 1.1) by an NVIDIA RIM signer whose certificate chain, carried in the
signature's KeyInfo, ends in NVIDIA's CoRIM signing Root CA; that root ships
with sealstore (``nvidia-roots/rim_signing_root.pem``) and is pinned by its key
hash. The signature is checked with signxml (the XML canonicalisation and
reference processing are its work); the chain with the same checks as the
GPU's own. Measurements are read from the XML that signxml says was signed,
never from the file as given, so content outside the signature cannot
smuggle values in. Not checked offline: the signer's revocation (OCSP).
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass, field

from cryptography import x509

from sealstore.enclave.attestation.certs import common_name
from sealstore.errors import AttestationError

__all__ = ["RIM_ROOT_SPKI_SHA256", "Rim", "RimMeasurement", "load_rim", "rim_root"]

# SHA-256 of the SubjectPublicKeyInfo of NVIDIA's CoRIM signing Root CA.
RIM_ROOT_SPKI_SHA256 = "dec1dc316477aa851eebdf51327ae9f864bc8d89254657ed1e7eb9168af1e1a3"

_SWID = "{http://standards.iso.org/iso/19770/-2/2015/schema.xsd}"
_SHA384 = "{http://www.w3.org/2001/04/xmlenc#sha384}"
_DS = "{http://www.w3.org/2000/09/xmldsig#}"
_DIGEST_SIZE = 48


@dataclass(frozen=True)
class RimMeasurement:
    index: int
    active: bool
    values: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True)
class Rim:
    """A verified RIM: its name (the file's), product, version and measurements by index."""

    name: str
    product: str
    version: str
    signer: str
    measurements: dict[int, RimMeasurement] = field(repr=False)


def rim_root() -> x509.Certificate:
    """NVIDIA's CoRIM signing Root CA, as shipped in the package (checked against the pin)."""
    from sealstore.enclave.attestation.nvgpu import _packaged

    return _packaged("rim_signing_root.pem", RIM_ROOT_SPKI_SHA256)


def _bad(name: str, message: str, code: str = "nvgpu-rim") -> AttestationError:
    return AttestationError(f"RIM {name}: {message}", code)


def load_rim(
    data: bytes,
    name: str,
    *,
    at: dt.datetime | None = None,
    root: x509.Certificate | None = None,
) -> Rim:
    """Verify a RIM's signature and chain, then read its measurements.

    Args:
        data: the SWID tag's bytes.
        name: what to call it in messages (its file name).
        at: when the signer's certificates must be valid (default: now, UTC).
            RIM signer certificates live about two years; a RIM kept since
            then is checked at a time inside its signer's validity.
        root: the trust anchor (default: NVIDIA's CoRIM signing Root CA,
            packaged and pinned).

    Returns:
        The RIM, as signed.

    Raises:
        AttestationError: nvgpu-rim (not a RIM, no signature, bad values),
            nvgpu-rim-signature, cert-chain, cert-untrusted-root, cert-expired.
    """
    from lxml import etree
    from signxml import DigestAlgorithm, SignatureConfiguration, SignatureMethod, XMLVerifier
    from signxml.exceptions import InvalidInput, InvalidSignature

    from sealstore.enclave.attestation.nvgpu import verify_chain

    at = (at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    try:
        parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
        doc = etree.fromstring(data, parser=parser)
    except etree.XMLSyntaxError as exc:
        raise _bad(name, f"not XML: {exc}") from None
    found = doc.findall(f".//{_DS}X509Certificate")
    if not found:
        raise _bad(
            name,
            "has no signature certificates (an unsigned RIM is not accepted)",
            "nvgpu-rim-signature",
        )
    try:
        chain = [x509.load_der_x509_certificate(base64.b64decode(c.text or "")) for c in found]
    except ValueError as exc:
        raise _bad(name, f"a signature certificate does not parse: {exc}", "cert-format") from None
    verify_chain(chain, at, root or rim_root(), f"RIM {name} signing")
    config = SignatureConfiguration(
        signature_methods=frozenset({SignatureMethod.ECDSA_SHA384}),
        digest_algorithms=frozenset({DigestAlgorithm.SHA384}),
        verification_time=at,
    )
    try:
        signed = XMLVerifier().verify(data, x509_cert=chain[0], expect_config=config).signed_xml
    except (InvalidSignature, InvalidInput) as exc:
        why = str(exc).strip().rstrip(":").strip()
        raise _bad(
            name,
            f"the signature does not verify ({why or type(exc).__name__})",
            "nvgpu-rim-signature",
        ) from None
    if signed is None or signed.tag != f"{_SWID}SoftwareIdentity":
        raise _bad(name, "the signed element is not a SWID tag", "nvgpu-rim-signature")
    meta = signed.find(f"{_SWID}Meta")
    measurements: dict[int, RimMeasurement] = {}
    for res in signed.iter(f"{_SWID}Resource"):
        if res.get("type") != "Measurement":
            continue
        m = _measurement(res.attrib, name)
        if m.index in measurements:
            raise _bad(name, f"measurement index {m.index} appears twice")
        measurements[m.index] = m
    if not measurements:
        raise _bad(name, "holds no measurements")
    return Rim(
        name=name,
        product=signed.get("name", ""),
        version=(meta.get("colloquialVersion", "") if meta is not None else "").lower(),
        signer=common_name(chain[0]),
        measurements=measurements,
    )


def _measurement(attrib: dict, name: str) -> RimMeasurement:
    try:
        index = int(attrib["index"])
        count = int(attrib["alternatives"])
        size = int(attrib.get("size", _DIGEST_SIZE))
        active = {"True": True, "False": False}[attrib["active"]]
        values = tuple(bytes.fromhex(attrib[f"{_SHA384}Hash{i}"]) for i in range(count))
    except (KeyError, ValueError) as exc:
        raise _bad(name, f"a measurement is malformed ({exc})") from None
    if index < 0 or count < 1 or size != _DIGEST_SIZE or any(len(v) != size for v in values):
        raise _bad(name, f"measurement {index} is malformed")
    return RimMeasurement(index, active, values)
