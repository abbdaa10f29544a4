"""SEV-SNP and TDX evidence: the real reports and quotes in ../shared/data, and negatives."""

from __future__ import annotations

import binascii
import datetime as dt
import struct
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from sealstore.enclave.attestation import tsm
from sealstore.enclave.attestation.certs import spki_sha256
from sealstore.enclave.attestation.snp import SnpReference, Tcb, verify_report
from sealstore.enclave.attestation.tdx import TdxQuote, TdxReference, verify_quote
from sealstore.errors import AttestationError
from tests.conftest import shared_data

pytestmark = pytest.mark.filterwarnings("ignore:.*serial number.*")

SNP = shared_data() / "attestation" / "snp"
TDX = shared_data() / "attestation" / "tdx" / "trustee"
ROOTS = SNP / "amd-roots"
AT = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)  # inside every sample certificate's validity

# report, signing certificate, chain: each a real report with the certificate that signed it.
MILAN, MILAN_VLEK = "amd-roots/ask_ark_milan.pem", "amd-roots/ask_ark_milan_vlek.pem"
SAMPLES = {
    "go-sev-guest": ("go-sev-guest/attestation.bin", "go-sev-guest/vcek.testcer", MILAN),
    "trustee": ("trustee/test-report.bin", "trustee/test-vcek.der", MILAN),
    "trustee-vlek": ("trustee/test-vlek-report.bin", "trustee/test-vlek.der", MILAN_VLEK),
    "virtee": ("virtee/report_milan.hex", "virtee/vcek_milan.der", "virtee/cert_chain_milan"),
}


def report_bytes(name: str) -> bytes:
    data = (SNP / name).read_bytes()
    return binascii.unhexlify(data.strip()) if name.endswith(".hex") else data


def sample(key: str) -> tuple[bytes, bytes, bytes]:
    rep, cert, chain = SAMPLES[key]
    return report_bytes(rep), (SNP / cert).read_bytes(), (SNP / chain).read_bytes()


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_real_reports_verify(key: str) -> None:
    report, cert, chain = sample(key)
    rep, product = verify_report(report, cert, chain, at=AT)
    assert product == "Milan"
    assert rep.signing_key == ("vlek" if "vlek" in key else "vcek")
    assert len(rep.measurement) == 48 and len(rep.report_data) == 64


def test_report_fields() -> None:
    rep, product = verify_report(*sample("go-sev-guest"), at=AT)
    assert rep.version == 2 and rep.vmpl == 0 and rep.debug  # policy 0xb0000 has DEBUG set
    assert rep.tcb("reported", product) == Tcb(bootloader=2, tee=0, snp=5, microcode=0x44)
    assert rep.report_data[:5] == bytes([1, 2, 3, 4, 5])
    vlek, _ = verify_report(*sample("trustee-vlek"), at=AT)
    assert vlek.version == 3 and vlek.cpuid == (0x19, 1, 1) and vlek.vmpl == 1


@pytest.mark.parametrize("offset", [0x08, 0x50, 0x90, 0x180, 0x1A0, 0x29F, 0x2A0, 0x2E8])
def test_a_flipped_byte_is_refused(offset: int) -> None:
    report, cert, chain = sample("trustee")
    bad = bytearray(report)
    bad[offset] ^= 0x01
    with pytest.raises(AttestationError) as err:
        verify_report(bytes(bad), cert, chain, at=AT)
    assert err.value.code in ("snp-signature", "snp-format")


@pytest.mark.parametrize("cert", ["test-vcek-invalid-legacy.der", "test-vcek-invalid-new.der"])
def test_invalid_vceks_are_refused(cert: str) -> None:
    report, _, chain = sample("trustee")
    with pytest.raises(AttestationError, match="not signed by SEV-Milan") as err:
        verify_report(report, (SNP / "trustee" / cert).read_bytes(), chain, at=AT)
    assert err.value.code == "cert-chain"


def test_the_wrong_chain_or_key_is_refused() -> None:
    report, cert, _ = sample("trustee")
    genoa = (ROOTS / "ask_ark_genoa.pem").read_bytes()
    with pytest.raises(AttestationError, match="no certificate for CN=SEV-Milan"):
        verify_report(report, cert, genoa, at=AT)
    # A VCEK presented for a VLEK-signed report: the VLEK chain is required.
    vlek_report, _, _ = sample("trustee-vlek")
    milan = (ROOTS / "ask_ark_milan.pem").read_bytes()
    with pytest.raises(AttestationError, match="must chain through SEV-VLEK-Milan"):
        verify_report(vlek_report, (SNP / "trustee/test-vcek.der").read_bytes(), milan, at=AT)
    # Another chip's VCEK, correctly chained: the signature does not verify.
    other = (SNP / "go-sev-guest/vcek.testcer").read_bytes()
    with pytest.raises(AttestationError) as err:
        verify_report(report, other, milan, at=AT)
    assert err.value.code == "snp-signature"


def test_expired_certificates_are_refused_at_the_current_time() -> None:
    report, cert, chain = sample("trustee-vlek")  # the VLEK expired on 2025-12-10
    verify_report(report, cert, chain, at=AT)
    with pytest.raises(AttestationError, match="valid 2024-12-10 to 2025-12-10") as err:
        verify_report(report, cert, chain, at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert err.value.code == "cert-expired"


def test_turin_chain_is_pinned() -> None:
    ask, ark = x509.load_pem_x509_certificates((ROOTS / "ask_ark_turin_vcek.pem").read_bytes())
    vcek = x509.load_der_x509_certificate((SNP / "virtee/vcek_turin.der").read_bytes())
    vcek.verify_directly_issued_by(ask)  # the sample is what AMD issued
    from sealstore.enclave.attestation.snp import AMD_ARK_SPKI_SHA256

    assert spki_sha256(ark) == AMD_ARK_SPKI_SHA256["Turin"]
    assert Tcb.unpack(bytes([1, 2, 3, 4, 0, 0, 0, 9]), "Turin") == Tcb(2, 3, 4, 9, fmc=1)


def test_reference_values() -> None:
    rep, product = verify_report(*sample("trustee"), at=AT)
    ok = SnpReference(
        measurements=(rep.measurement.hex().upper(),),
        min_tcb=Tcb(bootloader=3, tee=0, snp=8, microcode=115),
    )
    ok.check(rep, product, rep.report_data)
    cases = {
        "snp-measurement": SnpReference(measurements=("00" * 48,)),
        "snp-tcb-too-low": SnpReference(min_tcb=Tcb(bootloader=3, tee=0, snp=9, microcode=0)),
        "snp-vmpl": SnpReference(max_vmpl=-1),
        "snp-host-data": SnpReference(host_data="11" * 32),
    }
    for code, ref in cases.items():
        with pytest.raises(AttestationError) as err:
            ref.check(rep, product)
        assert err.value.code == code
    with pytest.raises(AttestationError) as err:
        SnpReference().check(rep, product, b"another nonce")
    assert err.value.code == "snp-report-data"
    debug, product = verify_report(*sample("go-sev-guest"), at=AT)
    with pytest.raises(AttestationError, match="debugging") as err:
        SnpReference().check(debug, product)
    SnpReference(allow_debug=True).check(debug, product)


def test_malformed_reports_are_refused() -> None:
    report, cert, chain = sample("trustee")
    for bad, match in [
        (report[:-1], "1184 bytes, not 1183"),
        (struct.pack("<I", 9) + report[4:], "version 9"),
        (report[:0x34] + struct.pack("<I", 2) + report[0x38:], "signature algorithm 2"),
    ]:
        with pytest.raises(AttestationError, match=match):
            verify_report(bad, cert, chain, at=AT)
    with pytest.raises(AttestationError, match=r"not an X\.509"):
        verify_report(report, b"not a certificate", chain, at=AT)


# ------------------------------------------------------------- a chain of our own, pinned


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str, issuer: str, public: object, signer: object, exts: dict[str, bytes] | None = None
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public)
        .serial_number(1)
        .not_valid_before(dt.datetime(2024, 1, 1))
        .not_valid_after(dt.datetime(2030, 1, 1))
    )
    for oid, der in (exts or {}).items():
        b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), der), False)
    pss = padding.PSS(padding.MGF1(hashes.SHA384()), 48)
    return b.sign(signer, hashes.SHA384(), rsa_padding=pss)  # type: ignore[arg-type]


def make_own_chain() -> dict:
    """An ARK / ASK / VCEK of our own named like Milan's, to reach the checks past the chain."""
    ark_key = rsa.generate_private_key(65537, 2048)
    ask_key = rsa.generate_private_key(65537, 2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    chip = bytes(range(64))
    oid = "1.3.6.1.4.1.3704.1."
    exts = {
        oid + "3.1": b"\x02\x01\x03",
        oid + "3.2": b"\x02\x01\x00",
        oid + "3.3": b"\x02\x01\x08",
        oid + "3.8": b"\x02\x01\x73",
        oid + "4": b"\x04\x40" + chip,
    }
    ark = _cert("ARK-Milan", "ARK-Milan", ark_key.public_key(), ark_key)
    ask = _cert("SEV-Milan", "ARK-Milan", ask_key.public_key(), ark_key)
    vcek = _cert("SEV-VCEK", "SEV-Milan", vcek_key.public_key(), ask_key, exts)
    return {
        "ark": ark,
        "ask": ask,
        "vcek": vcek,
        "key": vcek_key,
        "chip": chip,
        "roots": {"Milan": spki_sha256(ark)},
    }


@pytest.fixture(scope="module")
def own_chain() -> dict:
    return make_own_chain()


def _signed_report(key: ec.EllipticCurvePrivateKey, chip: bytes, tcb: bytes) -> bytes:
    raw = bytearray(0x4A0)
    struct.pack_into("<IIQ", raw, 0, 2, 0, 0x30000)
    struct.pack_into("<II", raw, 0x30, 0, 1)
    raw[0x38:0x40] = raw[0x180:0x188] = tcb
    raw[0x1A0:0x1E0] = chip
    r, s = decode_dss_signature(key.sign(bytes(raw[:0x2A0]), ec.ECDSA(hashes.SHA384())))
    raw[0x2A0:0x2E8] = r.to_bytes(72, "little")
    raw[0x2E8:0x330] = s.to_bytes(72, "little")
    return bytes(raw)


def test_a_chain_with_an_unpinned_root_is_refused(own_chain: dict) -> None:
    report = _signed_report(own_chain["key"], own_chain["chip"], bytes([3, 0, 0, 0, 0, 0, 8, 0x73]))
    chain = [own_chain["ask"], own_chain["ark"]]
    with pytest.raises(AttestationError, match="'ARK-Milan' is not a pinned AMD root") as err:
        verify_report(report, own_chain["vcek"], chain, at=AT)
    assert err.value.code == "cert-untrusted-root"
    rep, _ = verify_report(report, own_chain["vcek"], chain, at=AT, roots=own_chain["roots"])
    assert rep.chip_id == own_chain["chip"]


def test_the_vcek_must_match_the_chip_and_tcb(own_chain: dict) -> None:
    chain, roots = [own_chain["ask"], own_chain["ark"]], own_chain["roots"]
    newer = _signed_report(own_chain["key"], own_chain["chip"], bytes([3, 0, 0, 0, 0, 0, 9, 0x73]))
    with pytest.raises(AttestationError, match="snp SPL 8, the report's reported TCB has 9"):
        verify_report(newer, own_chain["vcek"], chain, at=AT, roots=roots)
    other = _signed_report(own_chain["key"], bytes(64), bytes([3, 0, 0, 0, 0, 0, 8, 0x73]))
    with pytest.raises(AttestationError, match="another chip") as err:
        verify_report(other, own_chain["vcek"], chain, at=AT, roots=roots)
    assert err.value.code == "snp-chip-mismatch"


# ------------------------------------------------------------------------------ TDX

QUOTES = sorted(p.name for p in TDX.iterdir())


@pytest.mark.parametrize("name", QUOTES)
def test_real_tdx_quotes_verify(name: str) -> None:
    q = verify_quote((TDX / name).read_bytes(), at=AT)
    assert q.version in (4, 5) and len(q.mrtd) == 48 and len(q.rtmrs) == 4
    assert q.version == (5 if name == "tdx_quote_5.dat" else 4)


@pytest.mark.parametrize("offset", [10, 60, 200, 560, 640])
def test_tdx_flipped_bytes_are_refused(offset: int) -> None:
    bad = bytearray((TDX / "tdx_quote_4.dat").read_bytes())
    bad[offset] ^= 1
    with pytest.raises(AttestationError) as err:
        verify_quote(bytes(bad), at=AT)
    assert err.value.code in ("tdx-signature", "tdx-format")


def test_tdx_signature_data_tampering_is_refused() -> None:
    raw = (TDX / "tdx_quote_6.dat").read_bytes()
    q = TdxQuote.parse(raw)
    sig_data = len(q.signed) + 4
    qe_report = sig_data + 128 + 6
    for offset, code in [
        (sig_data + 3, "tdx-signature"),  # the signature
        (sig_data + 70, "tdx-format"),  # the attestation key: off the curve
        (qe_report + 330, "tdx-qe-binding"),  # the QE report's report_data
        (qe_report + 10, "tdx-qe-signature"),  # the QE report itself
        (qe_report + 384 + 3, "tdx-qe-signature"),  # the QE report's signature
    ]:
        bad = bytearray(raw)
        bad[offset] ^= 1
        with pytest.raises(AttestationError) as err:
            verify_quote(bytes(bad), at=AT)
        assert err.value.code == code, offset
    with pytest.raises(AttestationError, match="bytes follow"):
        TdxQuote.parse(raw + b"\1")
    with pytest.raises(AttestationError, match="ends inside"):
        TdxQuote.parse(raw[:1000])


def test_tdx_root_is_pinned_and_time_checked() -> None:
    raw = (TDX / "tdx_quote_5.dat").read_bytes()
    with pytest.raises(AttestationError, match="not Intel's pinned SGX root"):
        verify_quote(raw, at=AT, root="00" * 32)
    with pytest.raises(AttestationError) as err:
        verify_quote(raw, at=dt.datetime(2050, 1, 1, tzinfo=dt.UTC))
    assert err.value.code == "cert-expired"  # even the root ends 2049-12-31


def test_tdx_reference_values() -> None:
    debug = verify_quote((TDX / "tdx_quote_4.dat").read_bytes(), at=AT)
    with pytest.raises(AttestationError, match="DEBUG"):
        TdxReference().check(debug)
    q = verify_quote((TDX / "tdx_quote_5.dat").read_bytes(), at=AT)
    TdxReference(mrtd=(q.mrtd.hex(),), rtmrs={0: (q.rtmrs[0].hex(),)}).check(q, q.report_data)
    for ref, code in [
        (TdxReference(mrtd=("00" * 48,)), "tdx-mrtd"),
        (TdxReference(rtmrs={2: ("ff" * 48,)}), "tdx-rtmr"),
        (TdxReference(mrconfigid="11" * 48), "tdx-mrconfigid"),
    ]:
        with pytest.raises(AttestationError) as err:
            ref.check(q)
        assert err.value.code == code
    with pytest.raises(AttestationError) as err:
        TdxReference().check(q, b"nonce")
    assert err.value.code == "tdx-report-data"


# ------------------------------------------------------------------ configfs-tsm


def _cert_table(certs: dict[str, bytes]) -> bytes:
    guids = {v: k for k, v in tsm.CERT_GUIDS.items()}
    head = 24 * (len(certs) + 1)
    table, blobs, off = b"", b"", head
    for name, der in certs.items():
        table += uuid.UUID(guids[name]).bytes_le + struct.pack("<II", off, len(der))
        blobs += der
        off += len(der)
    return table + bytes(24) + blobs


def _tsm_folder(root: Path, provider: str, outblob: bytes, auxblob: bytes = b"") -> None:
    entry = root / "req"
    entry.mkdir(parents=True)
    (entry / "provider").write_text(provider + "\n")
    (entry / "outblob").write_bytes(outblob)
    (entry / "generation").write_text("1\n")
    if auxblob:
        (entry / "auxblob").write_bytes(auxblob)


def test_collect_snp_through_configfs_tsm(tmp_path: Path) -> None:
    report, vcek, chain = sample("trustee")
    ask, ark = x509.load_pem_x509_certificates(chain)
    from cryptography.hazmat.primitives.serialization import Encoding

    der = Encoding.DER
    certs = {"vcek": vcek, "ask": ask.public_bytes(der), "ark": ark.public_bytes(der)}
    _tsm_folder(tmp_path, "sev_guest", report, _cert_table(certs))
    ev = tsm.collect(b"nonce", root=tmp_path, entry="req")
    assert ev.kind == "snp" and ev.blob == report and ev.certs == certs
    assert (tmp_path / "req" / "inblob").read_bytes() == b"nonce".ljust(64, b"\0")
    chain_certs = [x509.load_der_x509_certificate(ev.certs[k]) for k in ("ask", "ark")]
    verify_report(ev.blob, ev.certs["vcek"], chain_certs, at=AT)


def test_collect_tdx_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quote = (TDX / "tdx_quote_5.dat").read_bytes()
    tmp_path = tmp_path / "tsm"
    _tsm_folder(tmp_path, "tdx_guest", quote)
    monkeypatch.setenv("SEALSTORE_TSM_ROOT", str(tmp_path))
    ev = tsm.collect(b"n", entry="req")
    assert ev.kind == "tdx" and verify_quote(ev.blob, at=AT).version == 5
    with pytest.raises(AttestationError, match="no configfs-tsm") as err:
        tsm.collect(b"n", root=tmp_path / "absent")
    assert err.value.code == "tsm-unavailable"
    with pytest.raises(AttestationError, match="cannot read"):
        tsm.collect(b"n", root=tmp_path)  # a fresh request folder, with nothing behind it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["req"]  # and it was removed
    (tmp_path / "req" / "provider").write_text("arm_cca_guest\n")
    with pytest.raises(AttestationError, match="'arm_cca_guest' is not supported"):
        tsm.collect(b"n", entry="req")
    with pytest.raises(ValueError):
        tsm.collect(bytes(65), entry="req")
    with pytest.raises(AttestationError, match="no terminating entry"):
        tsm.parse_cert_table(uuid.uuid4().bytes_le + bytes(8))
    with pytest.raises(AttestationError, match="points past"):
        tsm.parse_cert_table(bytes(range(24)) + bytes(24))
