"""TDX collateral fetched from a PCCS: a local HTTPS server serving the real collateral files.

There is no PCCS package to run, so the test serves the four PCS v4
endpoints itself, the way Intel's PCCS answers them (issuer chains
URL-encoded in headers, the root CRL as hex), from the real collateral in
tests/data/tdx.
"""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sealstore.enclave.attestation.tdx import verify_quote
from sealstore.enclave.attestation.tdx_collateral import TcbPolicy
from sealstore.enclave.attestation.tdx_pccs import Pccs
from sealstore.errors import AttestationError
from tests.conftest import shared_data
from tests.raw_server import raw_server

SET = Path(__file__).parent / "data" / "tdx" / "go-tdx-guest-2023"
QUOTE = shared_data() / "attestation" / "tdx" / "trustee" / "tdx_quote_4.dat"
AT = dt.datetime(2023, 6, 20, tzinfo=dt.UTC)


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str]
    omit_chain = False
    override: dict[str, bytes] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.hits.append(self.path)
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        chain = None
        if url.path == "/tdx/certification/v4/tcb":
            name = f"tcb-info-{query['fmspc'][0]}"
            body = _read(f"{name}.json")
            chain = ("TCB-Info-Issuer-Chain", _read(f"{name}.issuer-chain.pem"))
        elif url.path == "/tdx/certification/v4/qe/identity":
            body = _read("qe-identity.json")
            chain = ("SGX-Enclave-Identity-Issuer-Chain", _read("qe-identity.issuer-chain.pem"))
        elif url.path == "/sgx/certification/v4/pckcrl" and query.get("encoding") == ["der"]:
            body = _read(f"pck-crl-{query['ca'][0]}.crl")
        elif url.path == "/sgx/certification/v4/rootcacrl":
            body = _read("root-ca-crl.crl")
            body = body.hex().encode() if body is not None else None  # as a PCCS serves it
        else:
            body = None
        body = self.override.get(url.path, body)
        if body is None or (chain is not None and chain[1] is None):
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        if chain is not None and not self.omit_chain:
            assert chain[1] is not None
            self.send_header(chain[0], urllib.parse.quote(chain[1].decode()))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _read(name: str) -> bytes | None:
    p = SET / name
    return p.read_bytes() if p.is_file() else None


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pccs.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("pccs-tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture
def pccs(tls: tuple[Path, Path]) -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_fetched_and_cached_until_next_update(
    pccs: tuple[str, type[_Handler]], tls: tuple[Path, Path]
) -> None:
    url, handler = pccs
    source = Pccs(url, ca_file=tls[0])
    q = verify_quote(QUOTE.read_bytes(), at=AT, collateral=source)
    assert q.tcb is not None and q.tcb.status == "UpToDate"
    assert sorted(urllib.parse.urlsplit(h).path for h in handler.hits) == [
        "/sgx/certification/v4/pckcrl",
        "/sgx/certification/v4/rootcacrl",
        "/tdx/certification/v4/qe/identity",
        "/tdx/certification/v4/tcb",
    ]
    assert "/tdx/certification/v4/tcb?fmspc=50806f000000" in handler.hits
    # Again, a day later: everything is still current, nothing is fetched.
    verify_quote(QUOTE.read_bytes(), at=AT + dt.timedelta(days=1), collateral=source)
    assert len(handler.hits) == 4
    # Past the QE identity's and the PCK CRL's nextUpdate (2023-07-08): those
    # two are fetched again (the PCCS still has the same, so they are stale).
    late = dt.datetime(2023, 7, 10, tzinfo=dt.UTC)
    with pytest.raises(AttestationError) as err:
        verify_quote(QUOTE.read_bytes(), at=late, collateral=source)
    assert err.value.code == "tdx-collateral-stale"
    again = sorted(urllib.parse.urlsplit(h).path for h in handler.hits[4:])
    assert again == ["/sgx/certification/v4/pckcrl", "/tdx/certification/v4/qe/identity"]
    grace = TcbPolicy(grace=dt.timedelta(days=3))
    assert verify_quote(QUOTE.read_bytes(), at=late, collateral=source, policy=grace).tcb


def test_pccs_failures(pccs: tuple[str, type[_Handler]], tls: tuple[Path, Path]) -> None:
    url, handler = pccs
    raw = QUOTE.read_bytes()

    def code(source: Pccs) -> str:
        with pytest.raises(AttestationError) as err:
            verify_quote(raw, at=AT, collateral=source)
        return err.value.code

    # The server's certificate is not trusted without its CA file.
    assert code(Pccs(url)) == "tdx-collateral-unavailable"
    # Nothing listens there.
    assert code(Pccs("http://127.0.0.1:9", timeout=2)) == "tdx-collateral-unavailable"
    # A 404 (this PCCS knows no such path).
    assert code(Pccs(url + "/nothing", ca_file=tls[0])) == "tdx-collateral-unavailable"
    # A response without its issuer chain header.
    handler.omit_chain = True
    assert code(Pccs(url, ca_file=tls[0])) == "tdx-collateral-format"
    with pytest.raises(ValueError, match="PCCS URL"):
        Pccs("ftp://pccs")


@pytest.mark.parametrize(
    "answer",
    [
        b"GARBAGE\r\n\r\n",  # BadStatusLine
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n",  # too many headers
    ],
)
def test_a_server_answering_garbage_is_unavailable(answer: bytes) -> None:
    """Not HTTP at all: http.client raises HTTPException, refused as unavailable (not a 500)."""
    with raw_server(answer) as port:
        source = Pccs(f"http://127.0.0.1:{port}", timeout=5)
        with pytest.raises(AttestationError) as err:
            verify_quote(QUOTE.read_bytes(), at=AT, collateral=source)
    assert err.value.code == "tdx-collateral-unavailable"
    assert "\n" not in str(err.value)


def test_only_verified_answers_are_cached(
    pccs: tuple[str, type[_Handler]], tls: tuple[Path, Path]
) -> None:
    """A forged answer (nextUpdate 9999) is refused and not kept: the real one is asked next."""
    url, handler = pccs
    source = Pccs(url, ca_file=tls[0])
    real = SET / "tcb-info-50806f000000.json"
    forged = real.read_bytes().replace(b'"nextUpdate":"2023-07-', b'"nextUpdate":"9999-07-')
    assert forged != real.read_bytes()
    handler.override = {"/tdx/certification/v4/tcb": forged}
    with pytest.raises(AttestationError) as err:
        verify_quote(QUOTE.read_bytes(), at=AT, collateral=source)
    assert err.value.code == "tdx-collateral-signature"
    handler.override = {}
    q = verify_quote(QUOTE.read_bytes(), at=AT, collateral=source)
    assert q.tcb is not None and q.tcb.status == "UpToDate"
    tcb_hits = [h for h in handler.hits if h.startswith("/tdx/certification/v4/tcb")]
    assert len(tcb_hits) == 2  # the forged one was not served from the cache
    # Once verified, the set is cached: nothing more is fetched.
    n = len(handler.hits)
    verify_quote(QUOTE.read_bytes(), at=AT, collateral=source)
    assert len(handler.hits) == n
