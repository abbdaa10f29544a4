"""A chain of our own shaped like AMD's (ARK -> ASK -> VCEK), for the SEV-SNP tests.

AMD's keys cannot sign test cases, so the checks past the pinned root (hwID
layout, product agreement, revocation) are reached with these, pinned by
passing their ARK's key hash as ``roots``. The real reports in
tests/data/snp show the same code accepting AMD's own.
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from sealstore.enclave.attestation.certs import spki_sha256

OID = "1.3.6.1.4.1.3704.1."
PSS = padding.PSS(padding.MGF1(hashes.SHA384()), 48)
AT = dt.datetime(2026, 8, 14, tzinfo=dt.UTC)

# A TCB of each layout: Milan/Genoa (bl, tee, 4 reserved, snp, ucode), Turin (fmc, bl, tee, snp,
# 3 reserved, ucode), and the certificate extensions that go with it.
TCB_BYTES = {"Milan": bytes([3, 0, 0, 0, 0, 0, 8, 0x73]), "Turin": bytes([1, 2, 1, 4, 0, 0, 0, 81])}
TCB_EXTS = {
    "Milan": {"3.1": 3, "3.2": 0, "3.3": 8, "3.8": 0x73},
    "Turin": {"3.9": 1, "3.1": 2, "3.2": 1, "3.3": 4, "3.8": 81},
}
CPUID = {"Milan": (0x19, 0x01, 0x01), "Genoa": (0x19, 0x11, 0x01), "Turin": (0x1A, 0x02, 0x01)}


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def der_int(v: int) -> bytes:
    body = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")
    return bytes([2, len(body)]) + body


def cert(
    subject: str,
    issuer: str,
    public: object,
    signer: object,
    serial: int,
    exts: dict[str, bytes] | None = None,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(name(issuer))
        .public_key(public)  # type: ignore[arg-type]
        .serial_number(serial)
        .not_valid_before(dt.datetime(2024, 1, 1))
        .not_valid_after(dt.datetime(2030, 1, 1))
    )
    for oid, der in (exts or {}).items():
        b = b.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(OID + oid), der), False
        )
    if isinstance(signer, rsa.RSAPrivateKey):
        return b.sign(signer, hashes.SHA384(), rsa_padding=PSS)
    return b.sign(signer, hashes.SHA384())  # type: ignore[arg-type]


@dataclass
class Chain:
    product: str
    ark_key: rsa.RSAPrivateKey
    ask_key: rsa.RSAPrivateKey
    vcek_key: ec.EllipticCurvePrivateKey
    ark: x509.Certificate
    ask: x509.Certificate
    vcek: x509.Certificate
    hwid: bytes

    @property
    def roots(self) -> dict[str, str]:
        return {self.product: spki_sha256(self.ark)}

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.ask, self.ark]

    def leaf(self, **changes: object) -> x509.Certificate:
        """Another VCEK for the same key, with some extensions changed (None: left out)."""
        exts = vcek_exts(self.product, self.hwid)
        for k, v in changes.items():
            if v is None:
                exts.pop(k, None)
            else:
                exts[k] = v  # type: ignore[assignment]
        return cert(
            "SEV-VCEK",
            f"SEV-{self.product}",
            self.vcek_key.public_key(),
            self.ask_key,
            self.vcek.serial_number,
            exts,
        )

    def report(
        self,
        *,
        chip: bytes | None = None,
        version: int = 5,
        cpuid: tuple[int, int, int] | None = None,
        tcb: bytes | None = None,
    ) -> bytes:
        """A report signed by this chain's VCEK key, chip_id laid out as the product does."""
        raw = bytearray(0x4A0)
        struct.pack_into("<IIQ", raw, 0, version, 0, 0x30000)
        struct.pack_into("<II", raw, 0x30, 0, 1)
        layout = "Turin" if self.product == "Turin" else "Milan"
        raw[0x38:0x40] = raw[0x180:0x188] = tcb or TCB_BYTES[layout]
        if version >= 3:
            raw[0x188:0x18B] = bytes(cpuid or CPUID[self.product])
        raw[0x1A0:0x1E0] = chip if chip is not None else self.hwid.ljust(64, b"\0")
        return self.sign(bytes(raw))

    def sign(self, report: bytes) -> bytes:
        """*report* signed anew by this chain's VCEK key."""
        raw = bytearray(report)
        digest = ec.ECDSA(hashes.SHA384())
        r, s = decode_dss_signature(self.vcek_key.sign(bytes(raw[:0x2A0]), digest))
        raw[0x2A0:0x2E8] = r.to_bytes(72, "little")
        raw[0x2E8:0x330] = s.to_bytes(72, "little")
        return bytes(raw)


def vcek_exts(product: str, hwid: bytes) -> dict[str, bytes]:
    layout = "Turin" if product == "Turin" else "Milan"
    exts = {k: der_int(v) for k, v in TCB_EXTS[layout].items()}
    pname = {"Milan": "Milan-B0"}.get(product, product).encode()
    exts["2"] = bytes([0x16, len(pname)]) + pname
    exts["4"] = hwid  # raw, as AMD's KDS writes it
    return exts


def make_chain(product: str, *, ask_serial: int = 0x77, vcek_serial: int = 0x99) -> Chain:
    ark_key = rsa.generate_private_key(65537, 2048)
    ask_key = rsa.generate_private_key(65537, 2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    hwid = bytes(range(1, 9)) if product == "Turin" else bytes(range(64, 128))
    ark = cert(f"ARK-{product}", f"ARK-{product}", ark_key.public_key(), ark_key, 0x10000)
    ask = cert(f"SEV-{product}", f"ARK-{product}", ask_key.public_key(), ark_key, ask_serial)
    vcek = cert(
        "SEV-VCEK",
        f"SEV-{product}",
        vcek_key.public_key(),
        ask_key,
        vcek_serial,
        vcek_exts(product, hwid),
    )
    return Chain(product, ark_key, ask_key, vcek_key, ark, ask, vcek, hwid)


def make_crl(
    issuer: x509.Certificate,
    key: rsa.RSAPrivateKey,
    revoked: tuple[int, ...] = (),
    *,
    this_update: dt.datetime = dt.datetime(2026, 8, 1, tzinfo=dt.UTC),
    next_update: dt.datetime = dt.datetime(2026, 9, 1, tzinfo=dt.UTC),
    number: int = 1,
    pss: bool = True,
    delta: bool = False,
) -> x509.CertificateRevocationList:
    """A CRL as AMD's KDS makes them (RSASSA-PSS, SHA-384), or a flawed one."""
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), False)
    )
    if delta:
        b = b.add_extension(x509.DeltaCRLIndicator(number - 1), True)
    for serial in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(dt.datetime(2025, 1, 1))
            .build()
        )
    if pss:
        return b.sign(key, hashes.SHA384(), rsa_padding=PSS)
    return b.sign(key, hashes.SHA384())
