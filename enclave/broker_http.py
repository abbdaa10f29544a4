"""The broker on the wire: FastAPI routes over ``broker.Broker``, run by uvicorn.

Two routes (``POST /v1/challenge``, ``POST /v1/release``), ``POST
/v1/standing`` (is this identity locked down or out in a tenant: polled by
processes that keep serving after their release), a health check,
``GET /metrics`` (Prometheus), and the admin routes (``POST
/v1/admin/lockdown``, ``POST /v1/admin/lift``, ``GET /v1/admin/status``).
A refusal answers ``{"error": CODE}`` with 400, 401, 403, 413, 429, 502 or
503, and logs the reason. TLS always; client certificates are asked for
when the config has ``client_ca`` and verified by the TLS layer.

The OpenAPI document (``broker_openapi.openapi_schema()``) says, per route,
the body it reads and every refusal it answers; it is not served.

No remote root: the admin routes and the metrics answer only callers on this
host (loopback) unless the config's ``admin.remote`` / ``metrics.remote``
allow more, and the admin routes also need an identity with the admin role.

Each request is decided under one config, the one in force when it arrived
(``Broker.pinned``): a reload (SIGHUP, or a watched file changing: see
``broker_reload``) takes effect for the requests that start after it.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import Callable
from typing import Any

import anyio.to_thread
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from sealstore.enclave.broker import LOCAL_PEERS, Broker, Refused, log
from sealstore.enclave.broker_config import BrokerConfig, Identity
from sealstore.enclave.broker_openapi import (
    AUTH,
    METRICS,
    AdminOut,
    ChallengeOut,
    Health,
    ReleaseOut,
    StandingOut,
    body_doc,
    refusals,
)

__all__ = ["MAX_BODY", "create_app", "parse_body", "serve"]

MAX_BODY = 256 * 1024


def _peer_h11_protocol() -> type:
    """uvicorn's h11 protocol, with the verified client certificate put into the scope state.

    uvicorn does not implement ASGI's TLS extension; the protocol object sees
    the TLS transport, so it copies the peer certificate (DER) into the
    per-connection ``state`` that every request's scope is given a copy of.
    """

    class PeerCertH11(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            obj = transport.get_extra_info("ssl_object")
            der = obj.getpeercert(binary_form=True) if obj is not None else None
            self.app_state = {**self.app_state, "tls_peer_cert": der}

    return PeerCertH11


def _clean(value: Any, limit: int = 300) -> str:
    """A caller-supplied value fit for one log line: escaped, bounded."""
    if value is None:
        return "-"
    text = str(value).encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body: a JSON object (the routes check its fields).

    Raises:
        Refused: ``bad-request`` (400): not JSON, or not an object.
    """
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise Refused("bad-request", "the body is not JSON", 400) from None
    if not isinstance(obj, dict):
        raise Refused("bad-request", "the body is not a JSON object", 400)
    return obj


def create_app(broker: Broker) -> Any:
    """The FastAPI application over *broker*."""
    # No schema or docs pages are served: openapi_schema() makes the document.
    app = FastAPI(
        title="sealstore key-release broker",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    class OneConfig:
        """Pins each request, in its own task, to the config in force when it arrived:
        the worker threads that decide it get a copy of this context, so the
        authentication and the decision see one config even if a reload lands
        between them. (Plain ASGI: BaseHTTPMiddleware would wrap every body.)"""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            with broker.pinned():
                await self.app(scope, receive, send)

    app.add_middleware(OneConfig)

    def who(request: Request) -> Identity:
        auth = request.headers.get("authorization")
        bearer = None
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Refused("unauthenticated", "Authorization is not a bearer token", 401)
            bearer = token.strip()
        return broker.authenticate(bearer, getattr(request.state, "tls_peer_cert", None))

    async def body(request: Request) -> dict[str, Any]:
        # A release request is a few KiB (an SNP report and its chain ~6 KiB).
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            raise Refused("too-large", f"a body of {_clean(size)} bytes", 413)
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY:
                raise Refused("too-large", f"a body over {MAX_BODY} bytes", 413)
        return parse_body(raw)

    def refuse(request: Request, exc: Refused, ident: Identity | None, what: dict) -> JSONResponse:
        log.warning(
            "refused %s: identity=%s tenant=%s artifact=%s code=%s reason=%s peer=%s",
            request.url.path,
            ident.name if ident else "-",
            _clean(what.get("tenant")),
            _clean(what.get("artifact")),
            exc.code,
            _clean(exc.reason),
            request.client.host if request.client else "-",
        )
        # (An expired token is audited by the broker itself, under its identity.)
        if (
            ident is None
            and exc.code != "token-expired"
            and request.url.path in ("/v1/challenge", "/v1/release")
        ):
            # Unauthenticated attempts are audited too (who: "-").
            broker._record(
                request.url.path.rsplit("/", 1)[-1],
                "-",
                what.get("tenant"),
                what.get("artifact"),
                "denied",
                exc.code,
                exc.reason,
            )
        return JSONResponse({"error": exc.code}, status_code=exc.status)

    def local_only(request: Request, allowed: bool, what: str) -> None:
        peer = request.client.host if request.client else None
        if not allowed and peer not in LOCAL_PEERS:
            raise Refused(
                "remote-disabled",
                f"{what} from {_clean(peer)}: not enabled in the config for callers on other hosts",
            )

    # Not response_class=PlainTextResponse: that would list the JSON refusal as text too.
    @app.get("/metrics", responses={200: METRICS, **refusals(403)})
    def metrics(request: Request) -> Any:
        try:
            local_only(request, broker.config.metrics_remote, "metrics")
        except Refused as exc:
            return refuse(request, exc, None, {})
        return PlainTextResponse(broker.metrics.render(), media_type="text/plain; version=0.0.4")

    async def admin(request: Request, action: str) -> Any:
        ident, req = None, {}
        try:
            local_only(request, broker.config.admin_remote, "admin")
            ident = who(request)
            req = await body(request) if request.method == "POST" else {}
            scope = "*" if req.get("all") is True else req.get("tenant")
            reason = req.get("reason") if isinstance(req.get("reason"), str) else ""
            if action == "status":
                out = await anyio.to_thread.run_sync(broker.status, ident)
            elif action == "lift" and isinstance(req.get("identity"), str):
                out = await anyio.to_thread.run_sync(
                    lambda: broker.lift(ident, identity=req["identity"])
                )
            elif not isinstance(scope, str):
                raise Refused("bad-request", "name a tenant or all: true", 400)
            elif action == "lockdown":
                out = await anyio.to_thread.run_sync(broker.lockdown, ident, scope, reason)
            else:
                out = await anyio.to_thread.run_sync(broker.lift, ident, scope)
        except Refused as exc:
            return refuse(request, exc, ident, req)
        except Exception as exc:
            return internal(request, exc, ident, req)
        log.warning("admin %s by %s: %s", action, ident.name, _clean(req))
        return out

    @app.post(
        "/v1/admin/lockdown",
        responses={200: {"model": AdminOut}, **refusals(400, 401, 403, 413, 503)},
        openapi_extra=body_doc("lockdown"),
    )
    async def admin_lockdown(request: Request) -> Any:
        return await admin(request, "lockdown")

    @app.post(
        "/v1/admin/lift",
        responses={200: {"model": AdminOut}, **refusals(400, 401, 403, 413, 503)},
        openapi_extra=body_doc("lift"),
    )
    async def admin_lift(request: Request) -> Any:
        return await admin(request, "lift")

    @app.get(
        "/v1/admin/status",
        responses={200: {"model": AdminOut}, **refusals(401, 403, 503)},
        openapi_extra=AUTH,
    )
    async def admin_status(request: Request) -> Any:
        return await admin(request, "status")

    @app.get("/v1/health", responses={200: {"model": Health}})
    def health() -> dict[str, str]:
        return {"status": "ok"}

    def internal(request: Request, exc: Exception, ident: Identity | None, what: dict) -> Any:
        # Fail closed, and tell the caller nothing: the class name goes to the log.
        failed = Refused("internal", f"{exc.__class__.__name__} (a bug in the broker)", 500)
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return refuse(request, failed, ident, what)

    @app.post(
        "/v1/challenge",
        responses={200: {"model": ChallengeOut}, **refusals(400, 401, 403, 413, 429, 503)},
        openapi_extra=body_doc("challenge"),
    )
    async def challenge(request: Request) -> Any:
        ident, req = None, {}
        try:
            ident = who(request)
            req = await body(request)
            # The shared state may be a Redis round trip: off the event loop.
            return await anyio.to_thread.run_sync(
                broker.challenge, ident, req.get("tenant"), req.get("artifact")
            )
        except Refused as exc:
            return refuse(request, exc, ident, req)
        except Exception as exc:
            return internal(request, exc, ident, req)

    @app.post(
        "/v1/standing",
        responses={200: {"model": StandingOut}, **refusals(400, 401, 403, 413, 503)},
        openapi_extra=body_doc("standing"),
    )
    async def standing(request: Request) -> Any:
        ident, req = None, {}
        try:
            ident = who(request)
            req = await body(request)
            return await anyio.to_thread.run_sync(broker.standing, ident, req.get("tenant"))
        except Refused as exc:
            return refuse(request, exc, ident, req)
        except Exception as exc:
            return internal(request, exc, ident, req)

    @app.post(
        "/v1/release",
        responses={200: {"model": ReleaseOut}, **refusals(400, 401, 403, 413, 429, 502, 503)},
        openapi_extra=body_doc("release"),
    )
    async def release_key(request: Request) -> Any:
        ident, req = None, {}
        try:
            ident = who(request)
            req = await body(request)
            # Key services are blocking clients: keep them off the event loop.
            out = await anyio.to_thread.run_sync(broker.release, ident, req)
        except Refused as exc:
            return refuse(request, exc, ident, req)
        except Exception as exc:
            return internal(request, exc, ident, req)
        log.info(
            "released: identity=%s tenant=%s artifact=%s kind=%s",
            ident.name,
            req.get("tenant"),
            req.get("artifact"),
            req["evidence"]["kind"],
        )
        return out

    return app


def serve(
    config: BrokerConfig,
    *,
    log_level: str = "info",
    load: Callable[[], BrokerConfig] | None = None,
) -> None:
    """Run the broker until interrupted (TLS always; client certificates if ``client_ca``).

    Args:
        config: the config to start with.
        log_level: uvicorn's.
        load: how to read the config again on SIGHUP or a change of its files
            (default: ``BrokerConfig.load`` of the same file).
    """
    from sealstore.enclave.broker_reload import Reloader

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    for warning in config.warnings:
        log.warning("config: %s", warning)
    reqs = ssl.CERT_NONE
    if config.client_ca is not None:
        reqs = ssl.CERT_REQUIRED if config.require_client_cert else ssl.CERT_OPTIONAL
    broker = Broker(config)
    broker.state.ping()  # a shared state that is down: fail at start, loudly
    log.info(
        "state: %s; audit log: %s (stream %s, key %s)",
        config.state_url or "in-process",
        config.audit_log,
        broker.audit.stream,
        broker.audit.signer.signing_key_id,
    )
    reloader = Reloader(broker, load or (lambda: BrokerConfig.load(config.path)))
    reloader.record_start()
    restore = reloader.install_sighup()
    reloader.start()
    log.info(
        "config %s (digest %s%s); reload on SIGHUP%s",
        config.path,
        config.digest[:16],
        f", signed bundle serial {config.bundle_serial}" if config.bundle_serial else "",
        f" and every {config.reload_interval:g} s a file changed" if config.reload_watch else "",
    )
    try:
        uvicorn.run(
            create_app(broker),
            host=config.host,
            port=config.port,
            http=_peer_h11_protocol(),
            ssl_certfile=os.fspath(config.tls_cert),
            ssl_keyfile=os.fspath(config.tls_key),
            ssl_ca_certs=None if config.client_ca is None else os.fspath(config.client_ca),
            ssl_cert_reqs=reqs,
            log_level=log_level,
            access_log=False,
            server_header=False,
        )
    finally:
        reloader.stop()
        restore()
