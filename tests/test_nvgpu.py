"""NVIDIA GPU attestation: real reports, certificate chains and RIMs from NVIDIA's repositories.

The samples (tests/data/nvgpu/SOURCES.md) are H100 reports from 2023 and
2025, a Blackwell report, an H100 in protected-PCIe mode, and NVIDIA's signed
RIMs. Tampered variants are made here from them; where a check lies past
the signature (a measurement, a version), the tampered report is re-signed
by a chain of our own that the test pins instead of NVIDIA's root.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from sealstore.enclave.attestation import nvgpu, nvgpu_rim
from sealstore.enclave.attestation.certs import common_name, load_certificates, spki_sha256
from sealstore.enclave.attestation.nvgpu import GpuReference, GpuReport, verify_report
from sealstore.enclave.attestation.nvgpu_rim import Rim, RimMeasurement, load_rim
from sealstore.errors import AttestationError

DATA = Path(__file__).parent / "data" / "nvgpu"
# Inside the validity of the 2023 RIM signers' certificates (they ended mid-2025).
RIM_TIME = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
NONCE_2023 = bytes.fromhex("4cff7f5380ead8fad8ec2c531c110aca4302a88f603792801a8ca29ee151af2e")
NONCE_2025 = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
DRIVER_RIM = "rims/Driver_RIM_test_no_gpu.swidtag"
VBIOS_RIM = "rims/1010_0200_882_96005E0001_test_no_gpu.swidtag"
PROD_VBIOS_RIM = "rims/1010_0200_882_96005E0001_PROD.swidtag"


def sample(name: str) -> tuple[bytes, bytes]:
    """(report, PEM chain) of a sample: hopper-2023, hopper-2025, blackwell, hopper-590."""
    if name == "hopper-590":
        item = json.loads((DATA / "hopper-590" / "evidence_hopper_590_12.json").read_text())[0]
        return base64.b64decode(item["evidence"]), base64.b64decode(item["certificate"])
    files = {
        "hopper-2023": ("attestationReport.txt", "gpuAkCertChain.txt"),
        "hopper-2025": ("hopperAttestationReport.txt", "hopperCertChain.txt"),
        "blackwell": ("blackwellAttestationReport.txt", "blackwellCertChain.txt"),
    }[name]
    folder = DATA / name
    report = bytes.fromhex((folder / files[0]).read_text().strip())
    return report, (folder / files[1]).read_bytes()


def rim(path: str, at: dt.datetime | None = RIM_TIME) -> Rim:
    return load_rim((DATA / path).read_bytes(), Path(path).name, at=at)


@pytest.fixture(scope="module")
def rims() -> tuple[Rim, Rim]:
    return rim(DRIVER_RIM), rim(VBIOS_RIM)


@pytest.fixture(scope="module")
def reference(rims: tuple[Rim, Rim]) -> GpuReference:
    return GpuReference((rims[0],), (rims[1],), min_driver="535.0", min_vbios="96.00.5e.00.00")


# -- real reports ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "driver", "vbios", "nonce", "mode"),
    [
        ("hopper-2023", "545.00", "96.00.5e.00.01", NONCE_2023, None),
        ("hopper-2025", "550.90.07", "96.00.9f.00.01", NONCE_2025, None),
        ("blackwell", "575.32", "97.00.88.00.0f", NONCE_2025, None),
        ("hopper-590", "590.12", "96.00.a5.00.01", None, "ppcie"),
    ],
)
def test_real_reports_verify_to_nvidias_root(name, driver, vbios, nonce, mode) -> None:
    report, chain = sample(name)
    rep = verify_report(report, chain)
    assert (rep.driver_version, rep.vbios_version, rep.feature_flag) == (driver, vbios, mode)
    if nonce is not None:
        assert rep.nonce == nonce
    assert len(rep.measurements) == 64
    assert all(len(v) == 48 for v in rep.measurements.values())
    # The chain ends in the packaged root, which is the pinned one.
    assert spki_sha256(load_certificates(chain)[-1]) == nvgpu.DEVICE_ROOT_SPKI_SHA256


def test_the_2023_report_matches_the_rims_nvidia_signed_for_it(reference: GpuReference) -> None:
    report, chain = sample("hopper-2023")
    rep = verify_report(report, chain)
    assert rep.project == "1010-0200-882" and rep.nvdec0_disabled
    reference.check(rep, NONCE_2023)


def test_the_packaged_roots_are_the_pinned_ones() -> None:
    device, rim_root = nvgpu.device_root(), nvgpu_rim.rim_root()
    assert spki_sha256(device) == nvgpu.DEVICE_ROOT_SPKI_SHA256
    assert spki_sha256(rim_root) == nvgpu_rim.RIM_ROOT_SPKI_SHA256
    # The certificate fingerprints docs/ATTESTATION.md gives.
    der = device.public_bytes(serialization.Encoding.DER)
    assert hashlib.sha256(der).hexdigest().startswith("102bf659d5419614")
    assert common_name(device) == "NVIDIA Device Identity CA"
    der = rim_root.public_bytes(serialization.Encoding.DER)
    assert hashlib.sha256(der).hexdigest().startswith("12977b5115acb038")


# -- tampered reports -----------------------------------------------------------------


def test_a_flipped_measurement_breaks_the_signature() -> None:
    report, chain = sample("hopper-2023")
    rep = GpuReport.parse(report)
    raw = bytearray(report)
    at = raw.find(rep.measurements[5])
    raw[at] ^= 1
    with pytest.raises(AttestationError) as err:
        verify_report(bytes(raw), chain)
    assert err.value.code == "nvgpu-signature"


@pytest.mark.parametrize("where", ["nonce", "opaque", "signature"])
def test_any_flipped_byte_breaks_the_signature(where: str) -> None:
    report, chain = sample("blackwell")
    rep = GpuReport.parse(report)
    raw = bytearray(report)
    at = {"nonce": 10, "opaque": raw.find(b"575.32"), "signature": len(raw) - 5}[where]
    raw[at] ^= 0x80
    with pytest.raises(AttestationError) as err:
        verify_report(bytes(raw), chain)
    assert err.value.code == "nvgpu-signature"
    assert rep.driver_version == "575.32"


def test_a_truncated_report_is_a_format_error() -> None:
    report, chain = sample("hopper-2025")
    for cut in (0, 10, 37, 45, 500, len(report) - 96, len(report) - 1):
        with pytest.raises(AttestationError) as err:
            verify_report(report[:cut], chain)
        assert err.value.code == "nvgpu-format", cut
    with pytest.raises(AttestationError) as err:
        verify_report(report + b"\0", chain)
    assert err.value.code == "nvgpu-format"


def test_fields_that_must_hold_their_values() -> None:
    report, _ = sample("hopper-2023")
    for at, value, message in [
        (0, 0x12, "SPDM version 1.2 is not supported"),
        (1, 0xE1, "is not GET_MEASUREMENTS"),
        (2, 0x00, "did not ask for a signature"),
        (38, 0x61, "do not answer the request"),
        (37 + 4, 63, "announces 63 measurement blocks and holds 64"),
    ]:
        raw = bytearray(report)
        raw[at] = value
        with pytest.raises(AttestationError, match=message) as err:
            GpuReport.parse(bytes(raw))
        assert err.value.code == "nvgpu-format"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=4200))
def test_the_parser_refuses_garbage_cleanly(junk: bytes, cut: int) -> None:
    report, _ = sample("hopper-2023")
    for raw in (junk, report[:cut] + junk):
        try:
            GpuReport.parse(raw)
        except AttestationError as exc:
            assert exc.code == "nvgpu-format"


def test_the_wrong_nonce_is_refused(reference: GpuReference) -> None:
    report, chain = sample("hopper-2023")
    rep = verify_report(report, chain)
    with pytest.raises(AttestationError) as err:
        reference.check(rep, NONCE_2025)
    assert err.value.code == "nvgpu-nonce"


# -- chains ---------------------------------------------------------------------------


def test_a_broken_chain_is_refused() -> None:
    report, pem = sample("hopper-2023")
    chain = load_certificates(pem)
    cases = {
        "cert-untrusted-root": [chain[0], chain[1], chain[2], chain[4]],  # product CA missing
        "cert-chain": [chain[0], chain[2], chain[1], chain[3], chain[4]],  # out of order
    }
    for code, certs in cases.items():
        with pytest.raises(AttestationError) as err:
            verify_report(report, certs)
        assert err.value.code == code
    # Another GPU's leaf (the 2025 sample's) did not sign this report.
    other = load_certificates(sample("hopper-2025")[1])
    with pytest.raises(AttestationError) as err:
        verify_report(report, [other[0], *chain[1:]])
    assert err.value.code in ("cert-chain", "nvgpu-signature")
    with pytest.raises(AttestationError) as err:
        verify_report(report, [])
    assert err.value.code == "cert-chain"


def test_a_damaged_certificate_signature_is_refused() -> None:
    report, pem = sample("hopper-2023")
    chain = load_certificates(pem)
    der = bytearray(chain[1].public_bytes(serialization.Encoding.DER))
    der[-10] ^= 0x01  # inside the issuer's signature
    damaged = x509.load_der_x509_certificate(bytes(der))
    with pytest.raises(AttestationError) as err:
        verify_report(report, [chain[0], damaged, *chain[2:]])
    assert err.value.code == "cert-chain"


class OwnChain:
    """A root and a P-384 attestation key of our own, standing in for NVIDIA's."""

    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        self.key = ec.generate_private_key(ec.SECP384R1())
        self.root = self._cert("own GPU root", self.root_key.public_key(), ca=True)
        self.leaf = self._cert("own GPU attestation key", self.key.public_key(), ca=False)

    def _cert(self, cn: str, public: ec.EllipticCurvePublicKey, *, ca: bool) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "own GPU root")])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(self.root_key, hashes.SHA384())
        )

    def resign(self, report: bytes) -> bytes:
        body = report[: -nvgpu.SIGNATURE_SIZE]
        r, s = decode_dss_signature(self.key.sign(body, ec.ECDSA(hashes.SHA384())))
        return body + r.to_bytes(48, "big") + s.to_bytes(48, "big")

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.leaf, self.root]


def test_nvidias_chain_is_not_trusted_under_another_root_nor_ours_under_nvidias() -> None:
    own = OwnChain()
    report, pem = sample("hopper-2023")
    with pytest.raises(AttestationError) as err:
        verify_report(report, pem, root=own.root)
    assert err.value.code == "cert-untrusted-root"
    resigned = own.resign(report)
    assert verify_report(resigned, own.chain, root=own.root).nonce == NONCE_2023
    with pytest.raises(AttestationError) as err:
        verify_report(resigned, own.chain)  # the default: NVIDIA's pinned root
    assert err.value.code == "cert-untrusted-root"


def test_a_changed_measurement_past_the_signature_is_refused(reference: GpuReference) -> None:
    own = OwnChain()
    report, _ = sample("hopper-2023")
    rep = GpuReport.parse(report)
    raw = bytearray(report)
    at = raw.find(rep.measurements[4])  # RIM index 3: the VBIOS's FSP measurement
    raw[at] ^= 1
    changed = verify_report(own.resign(bytes(raw)), own.chain, root=own.root)
    with pytest.raises(AttestationError, match=r"measurements \[3\]") as err:
        reference.check(changed, NONCE_2023)
    assert err.value.code == "nvgpu-measurement"


# -- reference values -----------------------------------------------------------------


def test_rims_for_another_driver_or_board_are_refused(rims: tuple[Rim, Rim]) -> None:
    report, chain = sample("hopper-2025")  # driver 550.90.07: not what these RIMs measure
    ref = GpuReference((rims[0],), (rims[1],), min_driver="535.0", min_vbios="96.00.5e.00.00")
    with pytest.raises(AttestationError) as err:
        ref.check(verify_report(report, chain), NONCE_2025)
    assert err.value.code == "nvgpu-measurement"
    # The 2023 report against the production VBIOS RIM of the same board and version.
    report, chain = sample("hopper-2023")
    prod = GpuReference((rims[0],), (rim(PROD_VBIOS_RIM),))
    with pytest.raises(AttestationError) as err:
        prod.check(verify_report(report, chain), NONCE_2023)
    assert err.value.code == "nvgpu-measurement"
    # Offered both, the right pair is found.
    both = GpuReference((rims[0],), (rim(PROD_VBIOS_RIM), rims[1]))
    both.check(verify_report(report, chain), NONCE_2023)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"min_driver": "545.1"}, "nvgpu-driver-version"),
        ({"min_driver": "550"}, "nvgpu-driver-version"),
        ({"min_vbios": "96.00.5e.00.02"}, "nvgpu-vbios-version"),
        ({"min_vbios": "96.00.60.00.00"}, "nvgpu-vbios-version"),
        ({"modes": frozenset({"spt"})}, "nvgpu-mode"),  # the 2023 report carries no mode
    ],
)
def test_versions_and_mode(rims: tuple[Rim, Rim], change: dict, code: str) -> None:
    report, chain = sample("hopper-2023")
    rep = verify_report(report, chain)
    GpuReference((rims[0],), (rims[1],), min_driver="545.00", min_vbios="96.00.5e.00.01").check(
        rep, NONCE_2023
    )
    base = {"min_driver": "545.00", "min_vbios": "96.00.5e.00.01"}
    with pytest.raises(AttestationError) as err:
        GpuReference((rims[0],), (rims[1],), **{**base, **change}).check(rep, NONCE_2023)
    assert err.value.code == code


def test_the_mode_the_gpu_signs_is_judged(rims: tuple[Rim, Rim]) -> None:
    report, chain = sample("hopper-590")
    rep = verify_report(report, chain)
    assert rep.feature_flag == "ppcie"
    with pytest.raises(AttestationError) as err:
        GpuReference((rims[0],), (rims[1],), modes=frozenset({"spt", "mpt"})).check(rep, rep.nonce)
    assert err.value.code == "nvgpu-mode"
    # In protected-PCIe mode, but these RIMs are not its driver's: refused on measurements.
    with pytest.raises(AttestationError) as err:
        GpuReference((rims[0],), (rims[1],), modes=frozenset({"ppcie"})).check(rep, rep.nonce)
    assert err.value.code == "nvgpu-measurement"


def test_nvdec0_is_not_compared_while_disabled(rims: tuple[Rim, Rim]) -> None:
    """NVDEC0's index (35) counts only if the report says NVDEC0 is enabled."""
    report, chain = sample("hopper-2023")
    rep = verify_report(report, chain)
    assert rep.nvdec0_disabled
    wrong = dict(rims[0].measurements)
    wrong[35] = RimMeasurement(35, True, (bytes(48),))
    edited = Rim(rims[0].name, rims[0].product, rims[0].version, rims[0].signer, wrong)
    GpuReference((edited,), (rims[1],)).check(rep, NONCE_2023)
    wrong[34] = RimMeasurement(34, True, (bytes(48),))
    with pytest.raises(AttestationError, match=r"\[34\]"):
        GpuReference((edited,), (rims[1],)).check(rep, NONCE_2023)


def test_alternatives_any_of_which_matches(rims: tuple[Rim, Rim]) -> None:
    report, chain = sample("hopper-2023")
    rep = verify_report(report, chain)
    ms = dict(rims[1].measurements)
    real = ms[3]
    ms[3] = RimMeasurement(3, True, (bytes(48), *real.values))
    alt = Rim("alt", "GH100", "x", "s", ms)
    GpuReference((rims[0],), (alt,)).check(rep, NONCE_2023)
    ms[3] = RimMeasurement(3, True, (bytes(48),))
    with pytest.raises(AttestationError):
        GpuReference((rims[0],), (Rim("alt", "GH100", "x", "s", ms),)).check(rep, NONCE_2023)
    # An inactive value is not compared.
    ms[3] = RimMeasurement(3, False, (bytes(48),))
    GpuReference((rims[0],), (Rim("alt", "GH100", "x", "s", ms),)).check(rep, NONCE_2023)


def test_driver_and_vbios_measuring_one_index_conflict(rims: tuple[Rim, Rim]) -> None:
    with pytest.raises(ValueError, match="both measure index"):
        nvgpu.golden(rims[0], rims[0])


# -- RIMs -----------------------------------------------------------------------------


def test_rims_verify_and_parse(rims: tuple[Rim, Rim]) -> None:
    drv, vb = rims
    assert (drv.product, drv.version, vb.version) == ("GH100", "545.00", "96.00.5e.00.01")
    assert len(drv.measurements) == 64 and drv.signer == "HCC RIM L4 Signer"
    assert sorted(i for i, m in vb.measurements.items() if m.active)[:4] == [0, 1, 2, 3]
    current = rim("rims/NV_GPU_DRIVER_GH100_550.144.03.xml", at=None)  # signer valid now
    assert current.version == "550.144.03"


def test_an_expired_rim_signer_is_refused_unless_the_time_is_pinned() -> None:
    with pytest.raises(AttestationError) as err:
        rim(VBIOS_RIM, at=None)
    assert err.value.code == "cert-expired"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("rims/incorrect_signature_driver_rim.xml", "nvgpu-rim-signature"),
        ("rims/incorrect_cert_chain_driver_rim.xml", "cert-untrusted-root"),
    ],
)
def test_nvidias_broken_rims_are_refused(path: str, code: str) -> None:
    with pytest.raises(AttestationError) as err:
        rim(path)
    assert err.value.code == code


def test_an_edited_rim_is_refused() -> None:
    data = (DATA / VBIOS_RIM).read_bytes()
    first = data.index(b'Hash0="') + len(b'Hash0="')
    edited = data[:first] + (b"1" if data[first : first + 1] != b"1" else b"2") + data[first + 1 :]
    with pytest.raises(AttestationError) as err:
        load_rim(edited, "edited", at=RIM_TIME)
    assert err.value.code == "nvgpu-rim-signature"
    # A measurement slipped in outside the signed element is not read.
    sig = data.index(b"<ds:Signature")
    extra = (
        b'<ns0:Resource type="Measurement" index="99" active="True" alternatives="1" '
        b'ns2:Hash0="' + b"00" * 48 + b'" size="48"/>'
    )
    with pytest.raises(AttestationError) as err:
        load_rim(data[:sig] + extra + data[sig:], "slipped", at=RIM_TIME)
    assert err.value.code == "nvgpu-rim-signature"
    stripped = data[: data.index(b"<ds:Signature")] + b"</SoftwareIdentity>"
    with pytest.raises(AttestationError) as err:
        load_rim(stripped, "unsigned", at=RIM_TIME)
    assert err.value.code == "nvgpu-rim-signature"
    with pytest.raises(AttestationError) as err:
        load_rim(b"<not-closed", "junk", at=RIM_TIME)
    assert err.value.code == "nvgpu-rim"


def test_the_file_collector_reads_recorded_evidence(tmp_path: Path) -> None:
    report, chain = sample("hopper-2023")
    f = tmp_path / "gpus.json"
    f.write_text(
        json.dumps(
            [
                {
                    "report": base64.b64encode(report).decode(),
                    "certs": base64.b64encode(chain).decode(),
                }
            ]
        )
    )
    assert nvgpu.file_collector(str(f))(NONCE_2023) == [{"report": report, "certs": chain}]
    f.write_text("[{}]")
    with pytest.raises(AttestationError) as err:
        nvgpu.file_collector(str(f))(NONCE_2023)
    assert err.value.code == "evidence-unavailable"


def test_nvml_collection_needs_pynvml_here() -> None:
    """No CC GPU on the machines these tests run on: NVML collection says so."""
    with pytest.raises(AttestationError) as err:
        nvgpu.collect_nvml(NONCE_2023)
    assert err.value.code == "evidence-unavailable"
