"""AMD's SEV-SNP CRLs: a real one (KDS, Genoa, #9) against the pinned ARK; revocation with a
chain of our own; fetching from a local HTTP server; the broker config and the broker itself."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealstore.enclave.attestation.snp import verify_report
from sealstore.enclave.attestation.snp_crl import SnpRevocation, check_crl, load_crl
from sealstore.enclave.broker.config import BrokerConfig
from sealstore.enclave.broker.reload import Reloader
from sealstore.errors import AttestationError, FormatError
from tests.raw_server import raw_server
from tests.snp_chain import AT, Chain, cert, make_chain, make_crl, vcek_exts
from tests.test_snp_products import real

pytestmark = pytest.mark.filterwarnings("ignore:.*serial number.*")

GENOA_CRL = Path(__file__).parent / "data" / "snp" / "kds" / "genoa_vcek_crl_9.der"
THIS_UPDATE = dt.datetime(2026, 7, 28, 4, 7, 23, tzinfo=dt.UTC)
NEXT_UPDATE = dt.datetime(2026, 9, 9, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def _code(call, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(AttestationError) as err:
        call(*args, **kwargs)
    return err.value.code


# ----------------------------------------------------------------- AMD's own CRL


def test_amds_genoa_crl_verifies_against_the_pinned_ark() -> None:
    crl = load_crl(GENOA_CRL.read_bytes())
    ark = real("Genoa")[2][1]  # pinned: real() checks its key hash
    check_crl(crl, ark, AT, dt.timedelta(0))
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 9
    # It revokes Genoa's first ASK (serial 0x020001) since 2022-10-31; the ASK in use is 0x020002.
    assert [r.serial_number for r in crl] == [0x020001]
    assert real("Genoa")[2][0].serial_number == 0x020002
    pem = crl.public_bytes(serialization.Encoding.PEM)
    check_crl(load_crl(pem), ark, AT, dt.timedelta(0))  # PEM reads as DER does


def test_amds_crl_is_refused_tampered_misattributed_or_stale() -> None:
    ark = real("Genoa")[2][1]
    der = bytearray(GENOA_CRL.read_bytes())
    der[-1] ^= 1
    assert _code(check_crl, load_crl(bytes(der)), ark, AT, dt.timedelta(0)) == "snp-crl-invalid"
    crl = load_crl(GENOA_CRL.read_bytes())
    milan_ark = real("Milan")[2][1]
    assert _code(check_crl, crl, milan_ark, AT, dt.timedelta(0)) == "snp-crl-invalid"
    late = NEXT_UPDATE + dt.timedelta(hours=1)
    assert _code(check_crl, crl, ark, late, dt.timedelta(0)) == "snp-crl-stale"
    check_crl(crl, ark, late, DAY)  # inside the grace
    early = THIS_UPDATE - DAY
    assert _code(check_crl, crl, ark, early, DAY) == "snp-crl-stale"
    assert _code(load_crl, b"not a crl") == "snp-crl-invalid"


def test_real_genoa_evidence_passes_amds_crl() -> None:
    report, vcek, chain = real("Genoa")
    rev = SnpRevocation(files=(GENOA_CRL,))
    _, product = verify_report(report, vcek, chain, at=AT, revocation=rev)
    assert product == "Genoa"
    # Past nextUpdate and its grace the list no longer vouches: fail closed.
    late = NEXT_UPDATE + 2 * DAY
    assert _code(verify_report, report, vcek, chain, at=late, revocation=rev) == "snp-crl-stale"
    lenient = SnpRevocation(files=(GENOA_CRL,), grace=3 * DAY)
    verify_report(report, vcek, chain, at=late, revocation=lenient)


def test_the_ask_amd_revoked_is_refused_by_amds_crl() -> None:
    """Genoa's first ASK is not public; a certificate with its serial stands in for it."""
    ark = real("Genoa")[2][1]
    stand_in = make_chain("Genoa", ask_serial=0x020001).ask
    rev = SnpRevocation(files=(GENOA_CRL,))
    revoked = r"serial 0x20001\) was revoked by ARK-Genoa on 2022-10-31"
    with pytest.raises(AttestationError, match=revoked) as err:
        rev.check("Genoa", "vcek", [(stand_in, ark, "ASK")], AT)
    assert err.value.code == "snp-revoked"
    rev.check("Genoa", "vcek", [(real("Genoa")[2][0], ark, "ASK")], AT)


def test_a_configured_crl_for_another_product_refuses() -> None:
    report, vcek, chain = real("Milan")
    rev = SnpRevocation(files=(GENOA_CRL,))
    with pytest.raises(AttestationError, match="no CRL file is issued by ARK-Milan") as err:
        verify_report(report, vcek, chain, at=AT, revocation=rev)
    assert err.value.code == "snp-crl-missing"
    verify_report(report, vcek, chain, at=AT)  # revocation not configured: not checked


# -------------------------------------------------------- revocation, our own chain


@pytest.fixture(scope="module")
def genoa() -> Chain:
    return make_chain("Genoa", ask_serial=0x020077, vcek_serial=0x55)


def _files(tmp_path: Path, *crls: x509.CertificateRevocationList) -> SnpRevocation:
    paths = []
    for i, crl in enumerate(crls):
        p = tmp_path / f"{i}.crl"
        p.write_bytes(crl.public_bytes(serialization.Encoding.DER))
        paths.append(p)
    return SnpRevocation(files=tuple(paths))


def _verify(c: Chain, rev: SnpRevocation, at: dt.datetime = AT) -> None:
    verify_report(c.report(), c.vcek, c.chain, at=at, roots=c.roots, revocation=rev)


def test_a_revoked_ask_is_refused(genoa: Chain, tmp_path: Path) -> None:
    _verify(genoa, _files(tmp_path, make_crl(genoa.ark, genoa.ark_key, (0x1234,))))
    rev = _files(tmp_path, make_crl(genoa.ark, genoa.ark_key, (0x1234, 0x020077)))
    with pytest.raises(AttestationError, match=r"the ASK certificate .* was revoked") as err:
        _verify(genoa, rev)
    assert err.value.code == "snp-revoked"


def test_a_vcek_is_revoked_by_its_asks_crl(genoa: Chain, tmp_path: Path) -> None:
    ark_crl = make_crl(genoa.ark, genoa.ark_key)
    # An ARK's CRL names what the ARK issued: serial 0x55 there is not this VCEK.
    _verify(genoa, _files(tmp_path, make_crl(genoa.ark, genoa.ark_key, (0x55,))))
    ask_crl = make_crl(genoa.ask, genoa.ask_key, (0x55,))
    with pytest.raises(AttestationError, match=r"the VCEK certificate .* was revoked") as err:
        _verify(genoa, _files(tmp_path, ark_crl, ask_crl))
    assert err.value.code == "snp-revoked"


def test_a_revoked_asvk_is_refused(tmp_path: Path) -> None:
    c = make_chain("Milan", ask_serial=0x0100AA)
    exts = vcek_exts("Milan", c.hwid)
    del exts["4"]  # a VLEK names the cloud (CSP_ID), not a chip
    exts["5"] = b"\x16\x04test"
    vlek = cert("SEV-VLEK", "SEV-VLEK-Milan", c.vcek_key.public_key(), c.ask_key, 7, exts)
    asvk = cert("SEV-VLEK-Milan", "ARK-Milan", c.ask_key.public_key(), c.ark_key, 0x0100AA)
    raw = bytearray(c.report())
    raw[0x48] = 1 << 2  # signed by the VLEK
    report = c.sign(bytes(raw))
    rev = _files(tmp_path, make_crl(c.ark, c.ark_key, (0x0100AA,)))
    with pytest.raises(AttestationError, match="the ASVK certificate") as err:
        verify_report(report, vlek, [asvk, c.ark], at=AT, roots=c.roots, revocation=rev)
    assert err.value.code == "snp-revoked"


@pytest.mark.parametrize(
    ("flaw", "code"),
    [
        ("signed by another key", "snp-crl-invalid"),
        ("PKCS#1 v1.5, not PSS", "snp-crl-invalid"),
        ("a delta CRL", "snp-crl-invalid"),
        ("expired", "snp-crl-stale"),
        ("not yet valid", "snp-crl-stale"),
    ],
)
def test_a_flawed_crl_fails_closed(genoa: Chain, tmp_path: Path, flaw: str, code: str) -> None:
    other = make_chain("Genoa")
    crl = {
        "signed by another key": lambda: make_crl(genoa.ark, other.ark_key),
        "PKCS#1 v1.5, not PSS": lambda: make_crl(genoa.ark, genoa.ark_key, pss=False),
        "a delta CRL": lambda: make_crl(genoa.ark, genoa.ark_key, number=3, delta=True),
        "expired": lambda: make_crl(
            genoa.ark, genoa.ark_key, next_update=AT - dt.timedelta(hours=1)
        ),
        "not yet valid": lambda: make_crl(genoa.ark, genoa.ark_key, this_update=AT + DAY),
    }[flaw]()
    with pytest.raises(AttestationError) as err:
        _verify(genoa, _files(tmp_path, crl))
    assert err.value.code == code, flaw


def test_a_replaced_crl_file_counts_only_in_a_new_revocation(genoa: Chain, tmp_path: Path) -> None:
    """The files are read once, when the SnpRevocation is made: never live (a broker reload
    makes a new one, after checking it; a refused reload leaves the old one in force)."""
    rev = _files(tmp_path, make_crl(genoa.ark, genoa.ark_key))
    _verify(genoa, rev)
    path = rev.files[0]
    path.write_bytes(
        make_crl(genoa.ark, genoa.ark_key, (0x020077,), number=2).public_bytes(
            serialization.Encoding.DER
        )
    )
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    _verify(genoa, rev)  # the running one still judges by what it read
    assert _code(_verify, genoa, SnpRevocation(files=(path,))) == "snp-revoked"
    path.unlink()
    _verify(genoa, rev)
    assert _code(_verify, genoa, SnpRevocation(files=(path,))) == "snp-crl-missing"
    # Bytes handed in (as the broker config does) are what counts, not the file.
    old = make_crl(genoa.ark, genoa.ark_key).public_bytes(serialization.Encoding.DER)
    handed = SnpRevocation(files=(path,), contents=(old,))
    _verify(genoa, handed)
    with pytest.raises(ValueError, match="every CRL file"):
        SnpRevocation(files=(path, path), contents=(old,))


def test_one_source_exactly() -> None:
    with pytest.raises(ValueError, match="not both nor neither"):
        SnpRevocation()
    with pytest.raises(ValueError, match="not both nor neither"):
        SnpRevocation(files=(GENOA_CRL,), url="https://x/{product}")
    with pytest.raises(ValueError, match="http"):
        SnpRevocation(url="file:///etc/{product}")


# ------------------------------------------------------- fetching, a local server


class _Kds(http.server.ThreadingHTTPServer):
    """Serves CRLs by path (``/vcek/v1/Genoa/crl``...), counting requests."""

    def __init__(self) -> None:
        self.crls: dict[str, bytes] = {}
        self.hits: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(self.path)
                body = server.crls.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/pkix-crl")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{{key}}/v1/{{product}}/crl"


@pytest.fixture
def kds() -> Iterator[_Kds]:
    server = _Kds()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()


def test_amds_crl_fetched_over_http_is_verified_and_cached(kds: _Kds, tmp_path: Path) -> None:
    kds.crls["/vcek/v1/Genoa/crl"] = GENOA_CRL.read_bytes()
    report, vcek, chain = real("Genoa")
    rev = SnpRevocation(url=kds.url, cache_dir=tmp_path / "cache", grace=DAY)
    verify_report(report, vcek, chain, at=AT, revocation=rev)
    verify_report(report, vcek, chain, at=AT + DAY, revocation=rev)
    assert kds.hits == ["/vcek/v1/Genoa/crl"]  # fresh until nextUpdate: asked once
    assert (tmp_path / "cache" / "vcek-Genoa.crl").read_bytes() == GENOA_CRL.read_bytes()
    # A restart with the server gone: the kept copy still serves, until nextUpdate + grace.
    kds.crls.clear()
    again = SnpRevocation(url=kds.url, cache_dir=tmp_path / "cache", grace=DAY)
    verify_report(report, vcek, chain, at=AT, revocation=again)
    assert len(kds.hits) == 1
    verify_report(report, vcek, chain, at=NEXT_UPDATE + DAY / 2, revocation=again)
    assert kds.hits[-1] == "/vcek/v1/Genoa/crl"  # past nextUpdate it asked (and got a 404)
    stale = SnpRevocation(url=kds.url, cache_dir=tmp_path / "cache", grace=DAY)
    late = NEXT_UPDATE + 2 * DAY
    assert _code(verify_report, report, vcek, chain, at=late, revocation=stale) == "snp-crl-stale"


def test_an_unreachable_or_lying_server_fails_closed(kds: _Kds, tmp_path: Path) -> None:
    report, vcek, chain = real("Genoa")
    rev = SnpRevocation(url=kds.url)
    for _ in range(2):  # the failure is remembered: the second request does not wait on it
        assert _code(verify_report, report, vcek, chain, at=AT, revocation=rev) == (
            "snp-crl-unavailable"
        )
    assert kds.hits == ["/vcek/v1/Genoa/crl"]
    kds.crls["/vcek/v1/Genoa/crl"] = b"<html>maintenance</html>"
    rev = SnpRevocation(url=kds.url)
    assert _code(verify_report, report, vcek, chain, at=AT, revocation=rev) == "snp-crl-invalid"
    der = bytearray(GENOA_CRL.read_bytes())
    der[-5] ^= 0x40
    kds.crls["/vcek/v1/Genoa/crl"] = bytes(der)
    rev = SnpRevocation(url=kds.url, cache_dir=tmp_path / "cache")
    assert _code(verify_report, report, vcek, chain, at=AT, revocation=rev) == "snp-crl-invalid"
    assert not (tmp_path / "cache").exists()  # nothing unverified is kept
    closed = SnpRevocation(url="http://127.0.0.1:9/{key}/{product}", timeout=2)
    assert _code(verify_report, report, vcek, chain, at=AT, revocation=closed) == (
        "snp-crl-unavailable"
    )


def test_fetching_follows_the_key_and_never_steps_back(kds: _Kds, tmp_path: Path) -> None:
    c = make_chain("Milan", ask_serial=0x0100BB)
    rev = SnpRevocation(url=kds.url, cache_dir=tmp_path)
    newer = make_crl(c.ark, c.ark_key, (0x0100BB,), number=5, next_update=AT + DAY)
    kds.crls["/vcek/v1/Milan/crl"] = newer.public_bytes(serialization.Encoding.DER)
    assert _code(_verify, c, rev) == "snp-revoked"
    # Past its nextUpdate the server replays an older list that does not name the ASK.
    older = make_crl(c.ark, c.ark_key, (), number=4, next_update=AT + 30 * DAY)
    kds.crls["/vcek/v1/Milan/crl"] = older.public_bytes(serialization.Encoding.DER)
    rev = dataclasses.replace(rev, grace=5 * DAY)
    assert _code(_verify, c, rev, AT + 2 * DAY) == "snp-revoked"
    assert kds.hits == ["/vcek/v1/Milan/crl"] * 2


# ------------------------------------------------------------------ the broker config


def _config(tmp_path: Path, snp: dict) -> Path:
    from tests.conftest import PASSPHRASE, make_keyring

    if not (tmp_path / "ring.json").exists():
        make_keyring(tmp_path / "ring.json", passphrase=PASSPHRASE)
    for f in ("tls.pem", "tls.key"):
        (tmp_path / f).write_text("placeholder: only its presence is checked at load\n")
    rule = {
        "measurements": ["00" * 48],
        "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
        **snp,
    }
    doc = {
        "server": {"tls_cert": "tls.pem", "tls_key": "tls.key"},
        "identities": {"cvm": {"token_sha256": "ab" * 32}},
        "tenants": {
            "acme": {
                "keys": [f"local:{tmp_path / 'ring.json'}"],
                "artifacts": {"minilm": {"identities": ["cvm"], "evidence": ["snp"], "snp": rule}},
            }
        },
    }
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "b.yaml"


def _rev(config: Path) -> SnpRevocation | None:
    ref = BrokerConfig.load(config).tenants["acme"].artifacts["minilm"].snp
    assert ref is not None
    return ref.revocation


def test_broker_config_reads_the_crl_settings(tmp_path: Path) -> None:
    (tmp_path / "genoa.crl").write_bytes(GENOA_CRL.read_bytes())
    rev = _rev(_config(tmp_path, {"crl_file": "genoa.crl", "crl_grace": 86400}))
    assert rev is not None and rev.files == (tmp_path / "genoa.crl",) and rev.grace == DAY
    rev = _rev(
        _config(
            tmp_path,
            {"crl_url": "https://kdsintf.amd.com/{key}/v1/{product}/crl", "crl_cache": "crls"},
        )
    )
    assert rev is not None and rev.cache_dir == tmp_path / "crls" and rev.grace == dt.timedelta(0)
    assert _rev(_config(tmp_path, {})) is None


def test_broker_config_reads_each_crl_file_once_as_a_signed_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CRL is a config source (digested, signed, watched), parsed from the very bytes
    digested; a file swapped later changes nothing until a reload loads it."""
    crl = tmp_path / "genoa.crl"
    crl.write_bytes(GENOA_CRL.read_bytes())
    config = _config(tmp_path, {"crl_file": "genoa.crl"})
    reads: list[Path] = []
    real_read = Path.read_bytes

    def counting(self: Path) -> bytes:
        if self == crl:
            reads.append(self)
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    loaded = BrokerConfig.load(config)
    # One read for the content, one for the "changed while it was read" check.
    assert len(reads) == 2
    monkeypatch.undo()
    assert loaded.sources[str(crl)] == hashlib.sha256(GENOA_CRL.read_bytes()).hexdigest()
    rev = loaded.tenants["acme"].artifacts["minilm"].snp.revocation  # type: ignore[union-attr]
    assert rev is not None
    report, vcek, chain = real("Genoa")
    verify_report(report, vcek, chain, at=AT, revocation=rev)
    crl.write_bytes(b"not a CRL any more")  # swapped behind the running config's back
    verify_report(report, vcek, chain, at=AT, revocation=rev)
    with pytest.raises(FormatError, match="crl_file"):
        BrokerConfig.load(config)  # a reload sees it, and refuses it


@pytest.mark.parametrize(
    ("snp", "message"),
    [
        ({"crl_file": "genoa.crl", "crl_url": "https://x/crl"}, "crl_file or crl_url, not both"),
        ({"crl_file": "missing.crl"}, r"crl_file: .*missing.crl is not a file"),
        ({"crl_file": "b.yaml"}, "crl_file: .* is not an X.509 CRL"),
        ({"crl_url": "ftp://x/crl"}, "crl_url: expected an http"),
        ({"crl_url": "https://x/{chip}/crl"}, r"only \{product\} and \{key\}"),
        ({"crl_file": "genoa.crl", "crl_grace": -1}, "crl_grace: expected seconds"),
        ({"crl_grace": 10}, "crl_grace: needs crl_file or crl_url"),
        ({"crl_file": "genoa.crl", "crl_cache": "c"}, "crl_cache: only for crl_url"),
    ],
)
def test_broker_config_crl_errors_name_the_field(tmp_path: Path, snp: dict, message: str) -> None:
    (tmp_path / "genoa.crl").write_bytes(GENOA_CRL.read_bytes())
    with pytest.raises(FormatError, match=message) as err:
        BrokerConfig.load(_config(tmp_path, snp))
    assert "tenants.acme.artifacts.minilm.snp" in str(err.value)


# ------------------------------------------------------------------------ the broker


def test_the_broker_refuses_a_revoked_chain(tmp_path: Path) -> None:
    """A release on SNP evidence from a chain of our own: granted, then refused once the
    rule's CRL file revokes the ASK (snp-revoked), and refused while the CRL is stale."""
    from sealstore.enclave.broker import release
    from sealstore.enclave.broker.client import BrokerKey
    from sealstore.enclave.broker.server import Broker, BrokerRefusal
    from sealstore.keys import DataKey
    from tests.test_broker import CONTEXT, _body

    c = make_chain("Milan", ask_serial=0x010077)
    crl_file = tmp_path / "milan.crl"
    today = dt.datetime.now(dt.UTC)  # the broker checks evidence at the wall-clock time
    window = {"this_update": today - DAY, "next_update": today + 30 * DAY}

    def write(crl: x509.CertificateRevocationList, stamp: float) -> None:
        crl_file.write_bytes(crl.public_bytes(serialization.Encoding.DER))
        os.utime(crl_file, (stamp, stamp))

    write(make_crl(c.ark, c.ark_key, (0x1234,), **window), 1)
    config = _config(tmp_path, {"crl_file": "milan.crl"})
    broker = Broker(BrokerConfig.load(config), snp_roots=c.roots)
    who = broker.config.identities["cvm"]
    slot = BrokerKey(
        f"broker+https://127.0.0.1:1/acme/minilm?key=local:{tmp_path / 'ring.json'}"
    ).wrap(DataKey.generate(), CONTEXT)

    def evidence(bound: bytes) -> dict:
        raw = bytearray(c.report())
        raw[0x50:0x90] = bound
        certs = {
            k: release.b64e(getattr(c, k).public_bytes(serialization.Encoding.DER))
            for k in ("vcek", "ask", "ark")
        }
        return {"kind": "snp", "report": release.b64e(c.sign(bytes(raw))), "certs": certs}

    def attempt() -> dict:
        req, _ = _body(
            broker.challenge(who, "acme", "minilm"), "acme", "minilm", slot.blob, "snp", evidence
        )
        return broker.release(who, req)

    assert "sealed" in attempt()
    reloader = Reloader(broker, lambda: BrokerConfig.load(config))
    write(make_crl(c.ark, c.ark_key, (0x1234, 0x010077), number=2, **window), 2)
    assert "sealed" in attempt()  # the file is not read live: only a reload puts it in force
    assert reloader.reload("sighup") == "applied"
    with pytest.raises(BrokerRefusal) as err:
        attempt()
    assert (err.value.code, err.value.status) == ("snp-revoked", 403)  # the caller's failure
    stale = make_crl(
        c.ark, c.ark_key, number=3, this_update=today - 9 * DAY, next_update=today - DAY
    )
    write(stale, 3)
    assert reloader.reload("sighup") == "applied"  # stale is the broker's problem, not format
    with pytest.raises(BrokerRefusal) as err:
        attempt()
    # The broker's own list is stale: a 503, not counted against the caller.
    assert (err.value.code, err.value.status) == ("snp-crl-stale", 503)


@pytest.mark.parametrize(
    "answer",
    [b"GARBAGE\r\n\r\n", b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n"],
)
def test_a_server_answering_garbage_is_unavailable(answer: bytes) -> None:
    """BadStatusLine / IncompleteRead from a broken KDS: snp-crl-unavailable, not a crash."""
    report, vcek, chain = real("Genoa")
    with raw_server(answer) as port:
        rev = SnpRevocation(url=f"http://127.0.0.1:{port}/{{key}}/{{product}}", timeout=5)
        with pytest.raises(AttestationError) as err:
            verify_report(report, vcek, chain, at=AT, revocation=rev)
    assert err.value.code == "snp-crl-unavailable"
    assert "\n" not in str(err.value)
