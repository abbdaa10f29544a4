# ruff: noqa: F811 (the broker tests' fixtures, imported, are parameters here)
"""The broker's HTTP layer (``enclave/broker/http.py``) on a real uvicorn over TLS.

What FastAPI and uvicorn are trusted with: the client certificate reaching
the routes (through the one subclass of uvicorn's internals, which these
tests fail on if uvicorn changes under it), and every refusal answered as
``{"error": code}`` with its status -- never FastAPI's 422 or an error page.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealstore.enclave.broker import http as broker_http
from sealstore.enclave.broker.config import BrokerConfig
from sealstore.enclave.broker.http import MAX_BODY, _peer_h11_protocol, create_app
from sealstore.enclave.broker.server import Broker
from tests.test_broker import (  # noqa: F401 (fixtures)
    TOKENS,
    Pki,
    Setup,
    _free_port,
    _variant,
    pki,
    setup,
)
from tests.uvicorn_thread import uvicorn_running

CHALLENGE = {"tenant": "acme", "artifact": "minilm"}


@dataclass
class Served:
    broker: Broker
    port: int
    pki: Pki
    scopes: list[dict[str, Any]]  # every HTTP scope uvicorn handed the app

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: dict[str, str] | None = None,
        cert: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        if cert:
            ctx.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post(self, path: str, body: bytes, token: str | None = TOKENS["trainer"]) -> Any:
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        status, headers, data = self.request("POST", path, body, headers=auth)
        assert headers["content-type"] == "application/json", headers
        return status, json.loads(data)


@pytest.fixture
def served(setup: Setup, pki: Pki, tmp_path: Path) -> Iterator[Served]:
    """create_app over a Broker, run by uvicorn with TLS, client certificates optional."""
    broker = Broker(BrokerConfig.load(_variant(setup, tmp_path, lambda d: None)))
    app = create_app(broker)

    @app.get("/typed")
    def typed(n: int) -> dict[str, int]:  # a route with a parameter FastAPI validates
        return {"n": n}

    scopes: list[dict[str, Any]] = []

    async def recorded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scopes.append(scope)
        await app(scope, receive, send)

    port = _free_port()
    config = uvicorn.Config(
        recorded,
        host="127.0.0.1",
        port=port,
        http=_peer_h11_protocol(),
        ssl_certfile=str(pki.server_cert),
        ssl_keyfile=str(pki.server_key),
        ssl_ca_certs=str(pki.ca),
        ssl_cert_reqs=ssl.CERT_OPTIONAL,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    with uvicorn_running(config, "the broker"):
        yield Served(broker, port, pki, scopes)


def test_the_client_certificate_reaches_the_routes(served: Served) -> None:
    """mTLS through uvicorn's h11 protocol: fails if uvicorn's internals change under it."""
    status, _, data = served.request(
        "POST", "/v1/challenge", json.dumps(CHALLENGE).encode(), cert=True
    )
    assert status == 200, data  # node-7, by its certificate alone
    assert "nonce" in json.loads(data)
    der = x509.load_pem_x509_certificate(served.pki.client_cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    scope = served.scopes[-1]
    assert scope["state"]["tls_peer_cert"] == der
    # When uvicorn implements ASGI's TLS extension, the subclass can go (docs/BROKER.md).
    assert "tls" not in (scope.get("extensions") or {}), (
        f"uvicorn {uvicorn.__version__} now puts the TLS extension in the scope: "
        "read the client certificate from it and drop http._peer_h11_protocol"
    )
    # No certificate, no token: nothing in the state, and refused.
    status, _, data = served.request("POST", "/v1/challenge", json.dumps(CHALLENGE).encode())
    assert (status, json.loads(data)) == (401, {"error": "unauthenticated"})
    assert served.scopes[-1]["state"]["tls_peer_cert"] is None


def test_a_changed_uvicorn_stops_the_broker_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    class Changed:  # what an H11Protocol that no longer takes app_state looks like
        def __init__(self, config: Any, server_state: Any) -> None: ...

        def connection_made(self, transport: Any) -> None: ...

    monkeypatch.setattr(broker_http, "H11Protocol", Changed)
    with pytest.raises(RuntimeError, match="H11Protocol changed"):
        _peer_h11_protocol()


def test_refusals_are_a_code_and_a_status(served: Served) -> None:
    """Malformed requests get the broker's one-line refusals, never FastAPI's own answers."""
    assert served.post("/v1/challenge", b"not json") == (400, {"error": "bad-request"})
    assert served.post("/v1/challenge", b"[1, 2]") == (400, {"error": "bad-request"})
    assert served.post("/v1/challenge", b"[" * 5000 + b"]" * 5000) == (
        400,
        {"error": "bad-request"},
    )
    assert served.post("/v1/challenge", b'{"tenant": 5}') == (400, {"error": "bad-request"})
    assert served.post("/v1/standing", b"{}") == (400, {"error": "bad-request"})
    assert served.post("/v1/release", b'{"nonce": 5}') == (400, {"error": "bad-request"})
    big = b'{"tenant": "' + b"a" * MAX_BODY + b'"}'
    assert served.post("/v1/challenge", big) == (413, {"error": "too-large"})
    assert served.post("/v1/challenge", b"{}", token=None) == (401, {"error": "unauthenticated"})
    assert served.post("/v1/challenge", b"{}", token="guessed") == (
        401,
        {"error": "unauthenticated"},
    )
    status, _, data = served.request(
        "POST", "/v1/challenge", b"{}", headers={"Authorization": "Basic dXNlcjpwYXNz"}
    )
    assert (status, json.loads(data)) == (401, {"error": "unauthenticated"})
    # A parameter FastAPI checks itself: 400 and a code, not 422 and its details.
    status, _, data = served.request("GET", "/typed?n=seven")
    assert (status, json.loads(data)) == (400, {"error": "bad-request"})
    assert served.request("GET", "/typed?n=7")[0] == 200
    # The admin routes: authenticated first, then the body.
    assert served.post("/v1/admin/lockdown", b"{}", token=None) == (
        401,
        {"error": "unauthenticated"},
    )
    assert served.post("/v1/admin/lockdown", b"{}") == (400, {"error": "bad-request"})
    assert served.post("/v1/admin/lockdown", b'{"all": true}') == (403, {"error": "not-permitted"})
    # The body is exactly the code: nothing else reaches the caller.
    status, _, data = served.request(
        "POST",
        "/v1/challenge",
        b"not json",
        headers={"Authorization": f"Bearer {TOKENS['trainer']}"},
    )
    assert (status, data) == (400, b'{"error":"bad-request"}')


def test_a_bug_is_a_500_that_says_nothing(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any) -> Any:
        raise ZeroDivisionError("a secret detail")

    monkeypatch.setattr(served.broker, "challenge", broken)
    with caplog.at_level("WARNING", logger="sealstore.broker"):
        status, data = served.post("/v1/challenge", json.dumps(CHALLENGE).encode())
    assert (status, data) == (500, {"error": "internal"})
    text = caplog.text
    assert "internal error on /v1/challenge" in text
    assert "code=internal reason=ZeroDivisionError (a bug in the broker)" in text
    assert "identity=trainer tenant=acme artifact=minilm" in text
    # And the broker still answers.
    monkeypatch.undo()
    status, data = served.post("/v1/challenge", json.dumps(CHALLENGE).encode())
    assert status == 200 and "nonce" in data
