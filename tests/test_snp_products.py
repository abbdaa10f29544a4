"""SEV-SNP per product line: real Milan, Genoa and Turin reports; hwID layouts; product agreement.

Turin's VCEK certifies an 8-byte hwID and its reports carry it in CHIP_ID
followed by 56 zero bytes; Milan and Genoa certify all 64 bytes. The real
reports come from microsoft/TEE-Attestation-Verification (tests/data/snp,
SOURCES.md); the tampered and mis-laid-out variants from a chain of our own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from sealstore.enclave.attestation.certs import load_certificates, spki_sha256
from sealstore.enclave.attestation.snp import (
    AMD_ARK_SPKI_SHA256,
    SnpReport,
    Tcb,
    cpuid_product,
    verify_report,
)
from sealstore.errors import AttestationError
from tests.conftest import shared_data
from tests.snp_chain import AT, CPUID, OID, Chain, der_int, make_chain

pytestmark = pytest.mark.filterwarnings("ignore:.*serial number.*")

DATA = Path(__file__).parent / "data" / "snp" / "microsoft"
ROOTS = shared_data() / "attestation" / "snp" / "amd-roots"
ARK_FILE = {
    "Milan": "ask_ark_milan.pem",
    "Genoa": "ask_ark_genoa.pem",
    "Turin": "ask_ark_turin_vcek.pem",
}


def real(product: str) -> tuple[bytes, x509.Certificate, list[x509.Certificate]]:
    """The real report of *product*, its VCEK, and its ASK + the pinned ARK."""
    p = product.lower()
    vcek = load_certificates((DATA / f"{p}_vcek.pem").read_bytes())[0]
    ask = load_certificates((DATA / f"{p}_ask.pem").read_bytes())[0]
    ark = load_certificates((ROOTS / ARK_FILE[product]).read_bytes())[-1]
    assert spki_sha256(ark) == AMD_ARK_SPKI_SHA256[product]
    return (DATA / f"{p}_attestation_report.bin").read_bytes(), vcek, [ask, ark]


@pytest.mark.parametrize("product", ["Milan", "Genoa", "Turin"])
def test_real_reports_of_each_product_line_verify(product: str) -> None:
    report, vcek, chain = real(product)
    rep, got = verify_report(report, vcek, chain, at=AT)
    assert got == product
    assert cpuid_product(*rep.cpuid[:2]) == product


def test_the_real_turin_report_binds_its_8_byte_hwid() -> None:
    report, vcek, chain = real("Turin")
    rep, _ = verify_report(report, vcek, chain, at=AT)
    hwid = vcek.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID + "4")).value.value
    assert len(hwid) == 8 and rep.chip_id == hwid + bytes(56)
    assert rep.chip_id[:8].hex() == "59790fb1c39f35c1"
    # Turin's TCB layout: what AMD's KDS URL for this VCEK names (fmc=1 bl=1 tee=1 snp=4 ucode=81).
    assert rep.tcb("reported", "Turin") == Tcb(bootloader=1, tee=1, snp=4, microcode=81, fmc=1)
    assert rep.version == 5 and rep.cpuid == (0x1A, 0x02, 0x01)


@pytest.mark.parametrize(
    ("offset", "why"),
    [
        (0x1A0, "chip_id's hwID"),
        (0x1A8, "chip_id's zero tail"),
        (0x189, "CPUID model"),
        (0x180, "reported TCB"),
        (0x90, "measurement"),
    ],
)
def test_a_tampered_real_turin_report_is_refused(offset: int, why: str) -> None:
    report, vcek, chain = real("Turin")
    bad = bytearray(report)
    bad[offset] ^= 0x01
    with pytest.raises(AttestationError) as err:
        verify_report(bytes(bad), vcek, chain, at=AT)
    assert err.value.code == "snp-signature", why


def test_real_turin_evidence_with_another_products_chain_is_refused() -> None:
    report, vcek, _ = real("Turin")
    _, _, genoa_chain = real("Genoa")
    with pytest.raises(AttestationError) as err:
        verify_report(report, vcek, genoa_chain, at=AT)
    assert err.value.code == "cert-chain"
    # Another real Turin VCEK (virtee/sev's, another chip) did not sign this report.
    other = (shared_data() / "attestation" / "snp" / "virtee" / "vcek_turin.der").read_bytes()
    with pytest.raises(AttestationError) as err:
        verify_report(report, other, real("Turin")[2], at=AT)
    assert err.value.code == "snp-signature"


# ------------------------------------------------ the layouts, with a chain of our own


@pytest.fixture(scope="module")
def turin() -> Chain:
    return make_chain("Turin")


@pytest.fixture(scope="module")
def milan() -> Chain:
    return make_chain("Milan")


def _refused(c: Chain, report: bytes, vcek: x509.Certificate | None = None) -> AttestationError:
    with pytest.raises(AttestationError) as err:
        verify_report(report, vcek or c.vcek, c.chain, at=AT, roots=c.roots)
    return err.value


def test_our_chains_verify_as_the_real_ones_do(turin: Chain, milan: Chain) -> None:
    for c in (turin, milan):
        rep, product = verify_report(c.report(), c.vcek, c.chain, at=AT, roots=c.roots)
        assert product == c.product
    rep, _ = verify_report(
        turin.report(version=2), turin.vcek, turin.chain, at=AT, roots=turin.roots
    )
    assert rep.cpuid == (0, 0, 0)  # a v2 report has no CPUID: the root alone names the line


def test_turin_chip_id_must_be_the_hwid_then_zeros(turin: Chain) -> None:
    tail = bytearray(turin.hwid.ljust(64, b"\0"))
    tail[40] = 1
    for chip in (bytes(tail), bytes(8) + bytes(56), turin.hwid * 8):
        err = _refused(turin, turin.report(chip=chip))
        assert err.code == "snp-chip-mismatch" and "another chip" in str(err)


def test_the_hwid_size_must_be_the_products(turin: Chain, milan: Chain) -> None:
    # A 64-byte hwID under Turin's root, an 8-byte one under Milan's: refused, whatever
    # chip_id says (here the layout the certificate would suggest).
    long_hwid = bytes(range(64))
    err = _refused(turin, turin.report(chip=long_hwid), turin.leaf(**{"4": long_hwid}))
    assert err.code == "snp-chip-mismatch" and "Turin VCEK's hwID is 8 bytes" in str(err)
    short = bytes(range(8))
    err = _refused(milan, milan.report(chip=short + bytes(56)), milan.leaf(**{"4": short}))
    assert err.code == "snp-chip-mismatch" and "Milan VCEK's hwID is 64 bytes" in str(err)
    err = _refused(turin, turin.report(), turin.leaf(**{"4": None}))
    assert err.code == "snp-chip-mismatch" and "no hwID" in str(err)


def test_a_wrapped_hwid_is_read_like_a_raw_one(turin: Chain, milan: Chain) -> None:
    for c in (turin, milan):
        wrapped = bytes([4, len(c.hwid)]) + c.hwid
        verify_report(c.report(), c.leaf(**{"4": wrapped}), c.chain, at=AT, roots=c.roots)


def test_masked_chip_id_skips_the_hwid(turin: Chain) -> None:
    raw = bytearray(turin.report(chip=bytes(64)))
    raw[0x48] |= 2  # MASK_CHIP_ID
    masked = turin.sign(bytes(raw))
    rep, _ = verify_report(masked, turin.vcek, turin.chain, at=AT, roots=turin.roots)
    assert rep.mask_chip_id


def test_report_certificate_and_root_must_name_one_product(turin: Chain, milan: Chain) -> None:
    err = _refused(turin, turin.report(cpuid=CPUID["Milan"]))
    assert err.code == "snp-product-mismatch" and "is Milan, its root is for Turin" in str(err)
    err = _refused(milan, milan.report(cpuid=CPUID["Genoa"]))
    assert err.code == "snp-product-mismatch"
    err = _refused(turin, turin.report(cpuid=(0x1A, 0x50, 0)))  # a later family member
    assert err.code == "snp-product-mismatch" and "no known SEV-SNP product" in str(err)
    err = _refused(turin, turin.report(), turin.leaf(**{"2": b"\x16\x08Milan-B0"}))
    assert err.code == "snp-product-mismatch" and "'Milan-B0'" in str(err)
    err = _refused(turin, turin.report(), turin.leaf(**{"2": b"\x0c\x05Turin"}))
    assert err.code == "cert-format"


def test_turin_tcb_must_match_the_certificate_fmc_included(turin: Chain) -> None:
    err = _refused(turin, turin.report(), turin.leaf(**{"3.9": der_int(2)}))
    assert err.code == "snp-tcb-mismatch" and "fmc SPL 2" in str(err)
    err = _refused(turin, turin.report(), turin.leaf(**{"3.9": None}))
    assert err.code == "snp-tcb-mismatch" and "no fmc SPL" in str(err)


def test_cpuid_products() -> None:
    assert [
        cpuid_product(f, m)
        for f, m in [(0x19, 0x01), (0x19, 0x11), (0x19, 0xA0), (0x1A, 0x02), (0x1A, 0x11)]
    ] == ["Milan", "Genoa", "Genoa", "Turin", "Turin"]
    assert cpuid_product(0x1A, 0x50) is None and cpuid_product(0x17, 0x31) is None
    assert SnpReport.parse(real("Genoa")[0]).cpuid[:2] == (0x19, 0x11)
