"""TDX collateral: real quotes against Intel-signed TCB info, QE identity and CRLs.

The real sets (tests/data/tdx, see SOURCES.md) drive the positive paths and
every check whose input Intel signed. The status arithmetic, revocation and
the QE / TDX-module identity checks need collateral Intel never published
for these platforms: those tests re-sign a real quote's certification data
and an edited copy of its real collateral under a test root of our own,
pinned on purpose.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from sealstore.enclave.attestation.certs import load_certificates, spki_sha256
from sealstore.enclave.attestation.tdx import TdxQuote, verify_quote
from sealstore.enclave.attestation.tdx_collateral import STATUSES, TCB_SIGNING_SUBJECT, TcbPolicy
from sealstore.enclave.attestation.tdx_pccs import CollateralDir
from sealstore.errors import AttestationError
from tests.conftest import shared_data

DATA = Path(__file__).parent / "data" / "tdx"
QUOTES = DATA / "quotes"
TRUSTEE = shared_data() / "attestation" / "tdx" / "trustee"
AT_2023 = dt.datetime(2023, 6, 20, tzinfo=dt.UTC)
AT_2025 = dt.datetime(2025, 6, 25, tzinfo=dt.UTC)
AT_2026 = dt.datetime(2026, 2, 20, tzinfo=dt.UTC)
ANY = TcbPolicy(accept=frozenset(STATUSES[:-1]))
SPR_E4_END = 4935  # where go-tdx-guest's sample quote's signature data ends


def spr_e4(strip: bool = True) -> bytes:
    raw = (QUOTES / "go-tdx-guest_tdx_prod_quote_SPR_E4.dat").read_bytes()
    return raw[:SPR_E4_END] if strip else raw


def code_of(raw: bytes, folder: Path, at: dt.datetime, **kw: Any) -> str:
    with pytest.raises(AttestationError) as err:
        verify_quote(raw, at=at, collateral=CollateralDir(folder), **kw)
    return err.value.code


# -- real quotes, real collateral -------------------------------------------------

REAL_OK = [
    (TRUSTEE / "tdx_quote_4.dat", "go-tdx-guest-2023", AT_2023, "50806f000000", 15),
    (QUOTES / "dcap-qvl_tdx_quote", "dcap-qvl-2025", AT_2025, "b0c06f000000", 17),
    (QUOTES / "go-tdx-guest_quote_v5_sample.dat", "dcap-qvl-2026", AT_2026, "90c06f000000", 18),
]


@pytest.mark.parametrize(("quote", "folder", "at", "fmspc", "evaluation"), REAL_OK)
def test_real_quotes_are_up_to_date(
    quote: Path, folder: str, at: dt.datetime, fmspc: str, evaluation: int
) -> None:
    q = verify_quote(quote.read_bytes(), at=at, collateral=CollateralDir(DATA / folder))
    assert q.tcb is not None
    assert (q.tcb.status, q.tcb.fmspc, q.tcb.evaluation) == ("UpToDate", fmspc, evaluation)
    assert q.tcb.advisory_ids == ()
    # Without collateral nothing is said about the TCB.
    assert verify_quote(quote.read_bytes(), at=at).tcb is None


@pytest.mark.parametrize(
    ("quote", "folder", "at"),
    [
        (None, "go-tdx-guest-2023", AT_2023),  # go-tdx-guest's SPR E4 sample
        (QUOTES / "dcap-qvl_tdx_quote_outdated", "dcap-qvl-2026", AT_2026),
        (TRUSTEE / "tdx_quote_5.dat", "dcap-qvl-2026", AT_2026),
    ],
)
def test_real_quotes_below_every_level_are_unsupported(
    quote: Path | None, folder: str, at: dt.datetime
) -> None:
    raw = spr_e4() if quote is None else quote.read_bytes()
    # The policy accepting everything but Revoked does not help: no level matches.
    assert code_of(raw, DATA / folder, at, policy=ANY) == "tdx-tcb-unsupported"


def test_real_out_of_date_platform() -> None:
    """trustee's quote 6 with trustee's own TCB info: PCESVN 11 < 13, OutOfDate."""
    raw, folder = (TRUSTEE / "tdx_quote_6.dat").read_bytes(), DATA / "trustee-2025"
    at = dt.datetime(2025, 11, 1, tzinfo=dt.UTC)
    # This set's PCK CRL is June 2025's: stale by November without a grace ...
    assert code_of(raw, folder, at) == "tdx-collateral-stale"
    grace = dt.timedelta(days=120)
    # ... and then the platform is OutOfDate, which the default refuses.
    assert code_of(raw, folder, at, policy=TcbPolicy(grace=grace)) == "tdx-tcb-status"
    accept = TcbPolicy(grace=grace, accept=frozenset({"UpToDate", "OutOfDate"}))
    q = verify_quote(raw, at=at, collateral=CollateralDir(folder), policy=accept)
    assert q.tcb is not None
    assert (q.tcb.status, q.tcb.fmspc, q.tcb.tcb_date) == (
        "OutOfDate",
        "00a06d080000",
        "2018-01-04T00:00:00Z",
    )


def test_trailing_bytes() -> None:
    # go-tdx-guest appends text after its sample's signature data: refused,
    # while the same quote without it verifies up to its TCB check.
    with pytest.raises(AttestationError) as err:
        TdxQuote.parse(spr_e4(strip=False))
    assert err.value.code == "tdx-format"
    assert verify_quote(spr_e4(), at=AT_2023).pck_chain
    # An 8000-byte buffer from the quoting library: the quote, then zeros.
    raw = (QUOTES / "go-tdx-guest_cos-113-tdx-quote.dat").read_bytes()
    assert len(raw) == 8000 and raw.endswith(b"\0" * 1000)
    assert verify_quote(raw, at=dt.datetime(2025, 1, 1, tzinfo=dt.UTC)).version == 4
    with pytest.raises(AttestationError) as err:
        TdxQuote.parse(raw[:-1] + b"\1")
    assert err.value.code == "tdx-format"


def _copy(folder: str, tmp_path: Path) -> Path:
    dst = tmp_path / folder
    shutil.copytree(DATA / folder, dst)
    return dst


Q4 = TRUSTEE / "tdx_quote_4.dat"


def test_freshness_and_grace() -> None:
    raw, folder = Q4.read_bytes(), DATA / "go-tdx-guest-2023"
    # The QE identity and the PCK CRL are due 2023-07-08 07:2x.
    late = dt.datetime(2023, 7, 10, tzinfo=dt.UTC)
    assert code_of(raw, folder, late) == "tdx-collateral-stale"
    grace = TcbPolicy(grace=dt.timedelta(days=3))
    assert verify_quote(raw, at=late, collateral=CollateralDir(folder), policy=grace).tcb
    # Collateral issued after the verification time: a clock that is wrong.
    assert code_of(raw, folder, dt.datetime(2023, 6, 10, tzinfo=dt.UTC)) == "tdx-collateral-stale"
    # An older TCB evaluation than the policy wants.
    assert code_of(raw, folder, AT_2023, policy=TcbPolicy(min_evaluation=16)) == (
        "tdx-collateral-stale"
    )


def test_tampered_real_collateral(tmp_path: Path) -> None:
    raw = Q4.read_bytes()
    cases = {
        # one signed character changed in each signed JSON
        "tcb-info-50806f000000.json": (
            b'"tcbEvaluationDataNumber":15',
            b'"tcbEvaluationDataNumber":16',
        ),
        "qe-identity.json": (b'"isvprodid":2', b'"isvprodid":3'),
    }
    for name, (old, new) in cases.items():
        folder = _copy("go-tdx-guest-2023", tmp_path / name)
        p = folder / name
        assert old in p.read_bytes()
        p.write_bytes(p.read_bytes().replace(old, new))
        assert code_of(raw, folder, AT_2023) == "tdx-collateral-signature", name
    # A CRL's signed bytes changed.
    folder = _copy("go-tdx-guest-2023", tmp_path / "crl")
    crl = bytearray((folder / "pck-crl-platform.crl").read_bytes())
    crl[200] ^= 1
    (folder / "pck-crl-platform.crl").write_bytes(bytes(crl))
    assert code_of(raw, folder, AT_2023) in ("tdx-collateral-signature", "tdx-collateral-format")


def test_wrong_real_collateral(tmp_path: Path) -> None:
    raw = Q4.read_bytes()
    # The CRLs swapped: the root's CRL where the platform CA's belongs.
    folder = _copy("go-tdx-guest-2023", tmp_path / "swap")
    root, pck = folder / "root-ca-crl.crl", folder / "pck-crl-platform.crl"
    a, b = root.read_bytes(), pck.read_bytes()
    root.write_bytes(b)
    pck.write_bytes(a)
    assert code_of(raw, folder, AT_2023) == "tdx-collateral-mismatch"
    # Another platform's TCB info (90c06f000000) filed under b0c06f000000.
    folder = _copy("dcap-qvl-2026", tmp_path / "fmspc")
    for suffix in (".json", ".issuer-chain.pem"):
        src = folder / f"tcb-info-90c06f000000{suffix}"
        src.rename(folder / f"tcb-info-b0c06f000000{suffix}")
    other = (QUOTES / "dcap-qvl_tdx_quote").read_bytes()
    assert code_of(other, folder, AT_2026) == "tdx-collateral-mismatch"
    # The TCB info "signed" by the platform CA's chain instead of TCB Signing.
    folder = _copy("go-tdx-guest-2023", tmp_path / "chain")
    ca_chain = load_certificates(TdxQuote.parse(raw).pck_chain)[1:]
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in ca_chain)
    (folder / "tcb-info-50806f000000.issuer-chain.pem").write_bytes(pem)
    assert code_of(raw, folder, AT_2023) == "tdx-collateral-signature"
    # Missing files.
    folder = _copy("go-tdx-guest-2023", tmp_path / "missing")
    (folder / "root-ca-crl.crl").unlink()
    assert code_of(raw, folder, AT_2023) == "tdx-collateral-unavailable"
    # The same collateral is not found for another FMSPC.
    assert (
        code_of((QUOTES / "dcap-qvl_tdx_quote").read_bytes(), DATA / "go-tdx-guest-2023", AT_2025)
        == "tdx-collateral-unavailable"
    )


def test_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="Revoked"):
        TcbPolicy(accept=frozenset({"UpToDate", "Revoked"}))
    with pytest.raises(ValueError, match="unknown TCB status"):
        TcbPolicy(accept=frozenset({"uptodate"}))
    with pytest.raises(ValueError, match="negative"):
        TcbPolicy(grace=dt.timedelta(seconds=-1))


# -- re-signed under a test root: statuses, identities, revocation ------------------


def _name(cn: str) -> x509.Name:
    if cn == "Intel SGX TCB Signing":  # the signer must carry Intel's full name
        return TCB_SIGNING_SUBJECT
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    ext: x509.ExtensionType | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2040, 1, 1, tzinfo=dt.UTC))
    )
    if ext is not None:
        b = b.add_extension(ext, critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _rs(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


class Pki:
    """A test root, platform CA, TCB signer; a real quote re-signed with a test PCK."""

    def __init__(self, quote: bytes) -> None:
        self.root_key, self.ca_key, self.signer_key, self.pck_key = (
            ec.generate_private_key(ec.SECP256R1()) for _ in range(4)
        )
        root_cn, ca_cn = "Intel SGX Root CA", "Intel SGX PCK Platform CA"
        ca = x509.BasicConstraints(ca=True, path_length=1)
        self.root = _cert(root_cn, self.root_key, root_cn, self.root_key, ca)
        self.ca = _cert(ca_cn, self.ca_key, root_cn, self.root_key)
        self.signer = _cert("Intel SGX TCB Signing", self.signer_key, root_cn, self.root_key)
        q = TdxQuote.parse(quote)
        real_pck = load_certificates(q.pck_chain)[0]
        sgx = real_pck.extensions.get_extension_for_oid(
            x509.ObjectIdentifier("1.2.840.113741.1.13.1")
        ).value
        self.pck = _cert("Intel SGX PCK Certificate", self.pck_key, ca_cn, self.ca_key, sgx)
        # The quote's signature covers header and body only, so its
        # certification data can be swapped for ours and the quote still verifies.
        chain = _pem(self.pck, self.ca, self.root)
        qe_sig = _rs(self.pck_key, q.qe_report)
        auth = struct.pack("<H", len(q.qe_auth_data)) + q.qe_auth_data
        cert = q.qe_report + qe_sig + auth + struct.pack("<HI", 5, len(chain)) + chain
        sig = q.signature + q.attestation_key + struct.pack("<HI", 6, len(cert)) + cert
        self.quote = q.signed + struct.pack("<I", len(sig)) + sig
        self.spki = spki_sha256(self.root)

    def crl(
        self,
        issuer: str,
        revoked: tuple[x509.Certificate, ...] = (),
        key: ec.EllipticCurvePrivateKey | None = None,
        next_update: dt.datetime = dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
    ) -> bytes:
        issuer_key = {"root": self.root_key, "ca": self.ca_key}[issuer]
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name((self.root if issuer == "root" else self.ca).subject)
            .last_update(dt.datetime(2023, 1, 1, tzinfo=dt.UTC))
            .next_update(next_update)
        )
        for c in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(c.serial_number)
                .revocation_date(dt.datetime(2023, 2, 1, tzinfo=dt.UTC))
                .build()
            )
        return b.sign(key or issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def write(
        self,
        real: str,
        folder: Path,
        tcb: dict[str, Any] | None = None,
        qe: dict[str, Any] | None = None,
        pck_crl: bytes | None = None,
        root_crl: bytes | None = None,
    ) -> Path:
        """*real*'s collateral, edited by the caller, re-signed by our TCB signer."""
        folder.mkdir(parents=True, exist_ok=True)
        (tcb_path,) = (DATA / real).glob("tcb-info-*.json")
        items = {tcb_path.name: ("tcbInfo", tcb), "qe-identity.json": ("enclaveIdentity", qe)}
        for name, (key, obj) in items.items():
            if obj is None:
                obj = json.loads((DATA / real / name).read_bytes())[key]
            body = json.dumps(obj, separators=(",", ":")).encode()
            sig = _rs(self.signer_key, body).hex()
            doc = b'{"' + key.encode() + b'":' + body + b',"signature":"' + sig.encode() + b'"}'
            (folder / name).write_bytes(doc)
            chain = name.removesuffix(".json") + ".issuer-chain.pem"
            (folder / chain).write_bytes(_pem(self.signer, self.root))
        (folder / "pck-crl-platform.crl").write_bytes(pck_crl or self.crl("ca"))
        (folder / "root-ca-crl.crl").write_bytes(root_crl or self.crl("root"))
        return folder

    def verify(self, folder: Path, at: dt.datetime, policy: TcbPolicy = ANY) -> Any:
        q = verify_quote(
            self.quote, at=at, root=self.spki, collateral=CollateralDir(folder), policy=policy
        )
        return q.tcb

    def code(self, folder: Path, at: dt.datetime, policy: TcbPolicy = ANY) -> str:
        with pytest.raises(AttestationError) as err:
            self.verify(folder, at, policy)
        return err.value.code


def _real(folder: str, key: str) -> dict[str, Any]:
    name = next((DATA / folder).glob("tcb-info-*.json")) if key == "tcbInfo" else None
    path = name or DATA / folder / "qe-identity.json"
    return json.loads(path.read_bytes())[key]


@pytest.fixture(scope="module")
def pki4() -> Pki:
    return Pki(Q4.read_bytes())


def test_resigned_quote_verifies_as_the_real_one(pki4: Pki, tmp_path: Path) -> None:
    folder = pki4.write("go-tdx-guest-2023", tmp_path)
    assert pki4.verify(folder, AT_2023).status == "UpToDate"
    # ... and not under Intel's pinned root.
    with pytest.raises(AttestationError) as err:
        verify_quote(pki4.quote, at=AT_2023, collateral=CollateralDir(folder))
    assert err.value.code == "cert-untrusted-root"


@pytest.mark.parametrize("status", STATUSES)
def test_tcb_level_status_and_policy(pki4: Pki, tmp_path: Path, status: str) -> None:
    tcb = _real("go-tdx-guest-2023", "tcbInfo")
    tcb["tcbLevels"][0]["tcbStatus"] = status
    tcb["tcbLevels"][0]["advisoryIDs"] = ["INTEL-SA-00837", "INTEL-SA-00615"]
    folder = pki4.write("go-tdx-guest-2023", tmp_path, tcb=tcb)
    if status == "Revoked":
        assert pki4.code(folder, AT_2023) == "tdx-tcb-status"
        return
    if status.startswith("TDRelaunch"):  # computed, never a level's own status
        assert pki4.code(folder, AT_2023) == "tdx-collateral-format"
        return
    result = pki4.verify(folder, AT_2023)
    assert result.status == status
    assert result.advisory_ids == ("INTEL-SA-00615", "INTEL-SA-00837")
    only = TcbPolicy(accept=frozenset({status}))
    assert pki4.verify(folder, AT_2023, only).status == status
    if status != "UpToDate":  # the default accepts UpToDate only
        assert pki4.code(folder, AT_2023, TcbPolicy()) == "tdx-tcb-status"


def test_tcb_level_matching(pki4: Pki, tmp_path: Path) -> None:
    # Quote 4: SGX 5.5.13.2.3.1.0.3, PCESVN 11, TEE_TCB_SVN 03.00.05.
    tcb = _real("go-tdx-guest-2023", "tcbInfo")
    first = tcb["tcbLevels"][0]["tcb"]
    for where, index, value in (
        ("sgxtcbcomponents", 2, 14),  # one SGX component above the PCK's
        ("tdxtcbcomponents", 2, 6),  # one TDX component above the TD report's
        ("tdxtcbcomponents", 0, 4),  # the module SVN counts while the version is 0
    ):
        edited = json.loads(json.dumps(tcb))
        edited["tcbLevels"][0]["tcb"][where][index]["svn"] = value
        folder = pki4.write("go-tdx-guest-2023", tmp_path / f"{where}{index}", tcb=edited)
        # Falls to the second level (PCESVN 5): OutOfDate, with its advisories.
        result = pki4.verify(folder, AT_2023)
        assert result.status == "OutOfDate" and "INTEL-SA-00106" in result.advisory_ids
    edited = json.loads(json.dumps(tcb))
    for level in edited["tcbLevels"]:
        level["tcb"]["pcesvn"] = 12
    folder = pki4.write("go-tdx-guest-2023", tmp_path / "pce", tcb=edited)
    assert pki4.code(folder, AT_2023) == "tdx-tcb-unsupported"
    assert first["pcesvn"] == 11
    edited = dict(tcb, fmspc="50806f000001")
    folder = pki4.write("go-tdx-guest-2023", tmp_path / "fmspc", tcb=edited)
    assert pki4.code(folder, AT_2023) == "tdx-collateral-mismatch"
    edited = dict(tcb, id="SGX", version=3)
    folder = pki4.write("go-tdx-guest-2023", tmp_path / "id", tcb=edited)
    assert pki4.code(folder, AT_2023) == "tdx-collateral-mismatch"


def test_qe_identity(pki4: Pki, tmp_path: Path) -> None:
    qe = _real("go-tdx-guest-2023", "enclaveIdentity")  # quote 4's QE: ISVSVN 4
    newer = {"tcb": {"isvsvn": 5}, "tcbDate": "2023-05-01T00:00:00Z", "tcbStatus": "UpToDate"}
    older = dict(qe["tcbLevels"][0], tcbStatus="OutOfDate", advisoryIDs=["INTEL-SA-00999"])
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(qe, tcbLevels=[newer, older]), "OutOfDate"),
        (dict(qe, tcbLevels=[newer, dict(older, tcbStatus="Revoked")]), "Revoked"),
        (dict(qe, tcbLevels=[newer]), "tdx-qe-identity"),  # no level for SVN 4
        (dict(qe, mrsigner="00" * 32), "tdx-qe-identity"),
        (dict(qe, isvprodid=1), "tdx-qe-identity"),
        (dict(qe, attributes="00" * 16), "tdx-qe-identity"),
        (dict(qe, miscselect="01000000"), "tdx-qe-identity"),
        (dict(qe, id="QE"), "tdx-collateral-mismatch"),
    ]
    for i, (edited, want) in enumerate(cases):
        folder = pki4.write("go-tdx-guest-2023", tmp_path / str(i), qe=edited)
        if want == "OutOfDate":
            result = pki4.verify(folder, AT_2023)
            assert result.status == want and result.advisory_ids == ("INTEL-SA-00999",)
        elif want == "Revoked":
            assert pki4.code(folder, AT_2023) == "tdx-tcb-status"
        else:
            assert pki4.code(folder, AT_2023) == want, edited


def test_tdx_module_identity(tmp_path: Path) -> None:
    # go-tdx-guest's v5 sample: TEE_TCB_SVN 0b.01.04, a TDX module version 1, SVN 11.
    pki = Pki((QUOTES / "go-tdx-guest_quote_v5_sample.dat").read_bytes())
    tcb = _real("dcap-qvl-2026", "tcbInfo")
    assert pki.verify(pki.write("dcap-qvl-2026", tmp_path / "as-is"), AT_2026).status == "UpToDate"
    ids = tcb["tdxModuleIdentities"]
    module = next(m for m in ids if m["id"] == "TDX_01")
    cases = [
        (
            # SVN 11 reaches only the OutOfDate level; the module it runs now
            # (13) is behind too, so no relaunch advice (that test is below).
            [
                {"tcb": {"isvsvn": 14}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
                dict(module["tcbLevels"][0], tcbStatus="OutOfDate", advisoryIDs=["INTEL-SA-01111"]),
            ],
            "OutOfDate",
        ),
        (
            [{"tcb": {"isvsvn": 12}, "tcbDate": "2024-11-13T00:00:00Z", "tcbStatus": "UpToDate"}],
            "tdx-tcb-unsupported",
        ),
    ]
    for i, (levels, want) in enumerate(cases):
        edited = dict(tcb, tdxModuleIdentities=[dict(module, tcbLevels=levels)])
        folder = pki.write("dcap-qvl-2026", tmp_path / str(i), tcb=edited)
        if want == "OutOfDate":
            result = pki.verify(folder, AT_2026)
            assert result.status == "OutOfDate" and "INTEL-SA-01111" in result.advisory_ids
        else:
            assert pki.code(folder, AT_2026) == want
    for i, edited in enumerate(
        (
            dict(tcb, tdxModuleIdentities=[m for m in ids if m["id"] != "TDX_01"]),
            dict(tcb, tdxModuleIdentities=[dict(module, mrsigner="11" * 48)]),
            dict(tcb, tdxModuleIdentities=[dict(module, attributes="0100000000000000")]),
        )
    ):
        folder = pki.write("dcap-qvl-2026", tmp_path / f"m{i}", tcb=edited)
        assert pki.code(folder, AT_2026) == "tdx-module"


def test_revocation(pki4: Pki, tmp_path: Path) -> None:
    w = pki4.write
    cases = [
        (
            w("go-tdx-guest-2023", tmp_path / "pck", pck_crl=pki4.crl("ca", (pki4.pck,))),
            "tdx-revoked",
        ),
        (
            w("go-tdx-guest-2023", tmp_path / "ca", root_crl=pki4.crl("root", (pki4.ca,))),
            "tdx-revoked",
        ),
        (
            w("go-tdx-guest-2023", tmp_path / "signer", root_crl=pki4.crl("root", (pki4.signer,))),
            "tdx-revoked",
        ),
        (
            w("go-tdx-guest-2023", tmp_path / "forged", pck_crl=pki4.crl("ca", key=pki4.root_key)),
            "tdx-collateral-signature",
        ),
        (
            w(
                "go-tdx-guest-2023",
                tmp_path / "stale",
                pck_crl=pki4.crl("ca", next_update=dt.datetime(2023, 6, 1, tzinfo=dt.UTC)),
            ),
            "tdx-collateral-stale",
        ),
    ]
    for folder, want in cases:
        assert pki4.code(folder, AT_2023) == want, folder.name
    # A CRL in PEM or hex (as a PCCS serves it) reads as the DER one.
    folder = w("go-tdx-guest-2023", tmp_path / "pem", pck_crl=pki4.crl("ca", (pki4.pck,)))
    der = (folder / "pck-crl-platform.crl").read_bytes()
    pem = x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)
    for form in (pem, der.hex().encode()):
        (folder / "pck-crl-platform.crl").write_bytes(form)
        assert pki4.code(folder, AT_2023) == "tdx-revoked"


def test_only_intels_tcb_signing_cert_signs_collateral(pki4: Pki, tmp_path: Path) -> None:
    """A key that chains to the root but is not the TCB Signing cert cannot sign (as QVL)."""
    cases: list[tuple[str, ec.EllipticCurvePrivateKey, bytes]] = [
        # The PCK's own key, with its real chain PCK -> Platform CA -> root.
        ("pck", pki4.pck_key, _pem(pki4.pck, pki4.ca, pki4.root)),
        # The platform CA's key, a CA directly under the root.
        ("ca", pki4.ca_key, _pem(pki4.ca, pki4.root)),
        # A root-issued cert named only "Intel SGX TCB Signing" (CN, no O/C/ST/L).
        (
            "cn-only",
            pki4.ca_key,
            _pem(
                _cert_named(
                    x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX TCB Signing")]),
                    pki4.ca_key,
                    pki4,
                ),
                pki4.root,
            ),
        ),
        # The right signer, with an extra certificate in the chain.
        ("three", pki4.signer_key, _pem(pki4.signer, pki4.ca, pki4.root)),
    ]
    for name, key, chain in cases:
        folder = pki4.write("go-tdx-guest-2023", tmp_path / name)
        tcb_path = next(folder.glob("tcb-info-*.json"))
        body = json.dumps(_real("go-tdx-guest-2023", "tcbInfo"), separators=(",", ":")).encode()
        sig = _rs(key, body).hex().encode()
        tcb_path.write_bytes(b'{"tcbInfo":' + body + b',"signature":"' + sig + b'"}')
        tcb_path.with_name(tcb_path.name.removesuffix(".json") + ".issuer-chain.pem").write_bytes(
            chain
        )
        assert pki4.code(folder, AT_2023) == "tdx-collateral-signature", name
    # A root that is not marked a CA cannot issue the signer either.
    flat = Pki.__new__(Pki)
    flat.__dict__.update(pki4.__dict__)
    flat.root = _cert("Intel SGX Root CA", pki4.root_key, "Intel SGX Root CA", pki4.root_key)
    folder = flat.write("go-tdx-guest-2023", tmp_path / "flat")
    assert flat.code(folder, AT_2023) == "tdx-collateral-signature"


def _cert_named(subject: x509.Name, key: ec.EllipticCurvePrivateKey, pki: Pki) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(pki.root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2040, 1, 1, tzinfo=dt.UTC))
        .sign(pki.root_key, hashes.SHA256())
    )


# -- the parsers, on hostile input ---------------------------------------------------

REAL_TCB = (DATA / "go-tdx-guest-2023" / "tcb-info-50806f000000.json").read_bytes()


def test_a_second_copy_cannot_ride_along(tmp_path: Path) -> None:
    """The object judged is the one whose bytes were verified, never a neighbour."""
    doc = json.loads(REAL_TCB)
    start = REAL_TCB.index(b":") + 1
    signed = REAL_TCB[start : REAL_TCB.rindex(b',"signature"')]
    evil = dict(doc["tcbInfo"], tcbLevels=[])
    sig = b'"signature":"' + doc["signature"].encode() + b'"'
    forged = [
        b'{"tcbInfo":' + signed + b',"tcbInfo":' + json.dumps(evil).encode() + b"," + sig + b"}",
        b'{"x":{"tcbInfo":'
        + signed
        + b'},"tcbInfo":'
        + json.dumps(evil).encode()
        + b","
        + sig
        + b"}",
        b'{"tcbInfo":' + signed + b"," + sig + b',"tcbLevels":[]}',
    ]
    for i, body in enumerate(forged):
        folder = _copy("go-tdx-guest-2023", tmp_path / str(i))
        (folder / "tcb-info-50806f000000.json").write_bytes(body)
        assert code_of(Q4.read_bytes(), folder, AT_2023) == "tdx-collateral-format", i
    # Whitespace around the signed object is fine: only its own bytes are signed.
    folder = _copy("go-tdx-guest-2023", tmp_path / "spaced")
    spaced = (
        b'{ "tcbInfo" : ' + signed + b' ,\n "signature": "' + doc["signature"].encode() + b'" }'
    )
    (folder / "tcb-info-50806f000000.json").write_bytes(spaced)
    assert verify_quote(Q4.read_bytes(), at=AT_2023, collateral=CollateralDir(folder)).tcb


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_crl_loader_refuses_junk(data: bytes) -> None:
    from sealstore.enclave.attestation.tdx_collateral import load_crl

    try:
        load_crl(data, "CRL")
    except AttestationError as exc:
        assert exc.code == "tdx-collateral-format"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(REAL_TCB) - 1), st.integers(1, 255))
def test_signed_json_survives_any_byte_change(at: int, flip: int) -> None:
    from sealstore.enclave.attestation.tdx_collateral import _signed_json

    raw = bytearray(REAL_TCB)
    raw[at] ^= flip
    try:
        obj, body, sig = _signed_json(bytes(raw), "tcbInfo", "TCB info")
    except AttestationError as exc:
        assert exc.code == "tdx-collateral-format"
        return
    # Parsed: what comes back is exactly the object of the bytes that are verified.
    assert json.loads(body) == obj and len(sig) == 64


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=120))
def test_sgx_extension_parser_refuses_junk(value: bytes) -> None:
    from sealstore.enclave.attestation.tdx_collateral import pck_tcb

    key = ec.generate_private_key(ec.SECP256R1())
    ext = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.840.113741.1.13.1"), value)
    cert = _cert("Intel SGX PCK Certificate", key, "x", key, ext)
    try:
        tcb = pck_tcb(cert)
    except AttestationError as exc:
        assert exc.code == "cert-format"
        return
    assert len(tcb.sgx_svns) == 16


def test_td_relaunch_advice(tmp_path: Path) -> None:
    """go-tdx-guest's v5 sample was launched under module SVN 11 and runs 13 now."""
    pki = Pki((QUOTES / "go-tdx-guest_quote_v5_sample.dat").read_bytes())
    q = TdxQuote.parse(pki.quote)
    assert (q.tee_tcb_svn[:3].hex(), q.tee_tcb_svn2[:3].hex()) == ("0b0104", "0d0104")
    tcb = _real("dcap-qvl-2026", "tcbInfo")
    module = next(m for m in tcb["tdxModuleIdentities"] if m["id"] == "TDX_01")

    def with_module(newest: int, first_status: str = "UpToDate") -> dict[str, Any]:
        levels = [
            {"tcb": {"isvsvn": newest}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
            {"tcb": {"isvsvn": 6}, "tcbDate": "2024-11-13T00:00:00Z", "tcbStatus": "OutOfDate"},
        ]
        edited = json.loads(json.dumps(tcb))
        edited["tdxModuleIdentities"] = [dict(module, tcbLevels=levels)]
        edited["tcbLevels"][0]["tcbStatus"] = first_status
        return edited

    cases = [
        (with_module(13), "TDRelaunchAdvised"),  # the module now is the newest: relaunch
        (with_module(13, "ConfigurationNeeded"), "TDRelaunchAdvisedConfigurationNeeded"),
        (with_module(14), "OutOfDate"),  # even the module now is behind: no advice
    ]
    for i, (edited, want) in enumerate(cases):
        folder = pki.write("dcap-qvl-2026", tmp_path / str(i), tcb=edited)
        assert pki.verify(folder, AT_2026).status == want
        assert pki.code(folder, AT_2026, TcbPolicy()) == "tdx-tcb-status"
    # TD 1.0 bodies carry no TEE_TCB_SVN2 and get no advice.
    assert TdxQuote.parse(Q4.read_bytes()).tee_tcb_svn2 == b""
