"""The broker on the wire: FastAPI routes over ``broker.Broker``, run by uvicorn.

Two routes (``POST /v1/challenge``, ``POST /v1/release``), ``POST
/v1/standing`` (is this identity locked down or out in a tenant: polled by
processes that keep serving after their release), a health check,
``GET /metrics`` (Prometheus), and the admin routes (``POST
/v1/admin/lockdown``, ``POST /v1/admin/lift``, ``GET /v1/admin/status``).
A refusal answers ``{"error": CODE}`` with 400, 401, 403, 413, 429, 502 or
503, and logs the reason. TLS always; client certificates are asked for
when the config has ``client_ca`` and verified by the TLS layer.

The OpenAPI document (``openapi.openapi_schema()``) says, per route,
the body it reads and every refusal it answers; it is not served.

No remote root: the admin routes and the metrics answer only callers on this
host (loopback) unless the config's ``admin.remote`` / ``metrics.remote``
allow more, and the admin routes also need an identity with the admin role.

Each request is decided under one config, the one in force when it arrived
(``Broker.pinned``): a reload (SIGHUP, or a watched file changing: see
``reload``) takes effect for the requests that start after it.
"""

from __future__ import annotations

import inspect
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio.to_thread
import uvicorn
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from sealstore.enclave.broker.config import BrokerConfig, Identity
from sealstore.enclave.broker.openapi import (
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
from sealstore.enclave.broker.server import LOCAL_PEERS, Broker, BrokerRefusal, log

__all__ = [
    "MAX_BODY",
    "AdminIn",
    "ChallengeIn",
    "ReleaseIn",
    "RequestBody",
    "StandingIn",
    "create_app",
    "parse_body",
    "peer_certificate",
    "serve",
]

MAX_BODY = 256 * 1024
# Where the connection's verified client certificate (DER) is in each request's state.
_PEER_CERT = "tls_peer_cert"


def _peer_h11_protocol() -> type:
    """uvicorn's h11 protocol, with the verified client certificate put into the scope state.

    uvicorn (0.55) does not implement ASGI's TLS extension (``scope["extensions"]["tls"]``),
    and offers no public way to reach the TLS connection from a request. The
    protocol object sees the transport: this subclass copies the peer
    certificate into the per-connection ``app_state``, of which every request's
    scope gets a copy (``request.state``). The one place that leans on uvicorn's
    internals (docs/BROKER.md; ``tests/test_broker_http.py`` fails if they change).

    Raises:
        RuntimeError: uvicorn's ``H11Protocol`` no longer takes an ``app_state``
            or lacks ``connection_made``: the certificate would not reach the
            routes (mTLS callers refused), so the broker does not start.
    """
    params = inspect.signature(H11Protocol.__init__).parameters
    if "app_state" not in params or "connection_made" not in vars(H11Protocol):
        raise RuntimeError(
            f"uvicorn {uvicorn.__version__}: H11Protocol changed (no app_state or "
            "connection_made); the broker cannot read client certificates with it"
        )

    class PeerCertH11(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            obj = transport.get_extra_info("ssl_object")
            der = obj.getpeercert(binary_form=True) if obj is not None else None
            self.app_state = {**self.app_state, _PEER_CERT: der}

    return PeerCertH11


def peer_certificate(request: Request) -> bytes | None:
    """The client certificate (DER) the TLS layer verified on this request's connection."""
    return getattr(request.state, _PEER_CERT, None)


def _clean(value: Any, limit: int = 300) -> str:
    """A caller-supplied value fit for one log line: escaped, bounded."""
    if value is None:
        return "-"
    text = str(value).encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


# -- request bodies -------------------------------------------------------------


class RequestBody(BaseModel):
    """A request body: a JSON object, every field kept.

    The fields are not typed here: the broker checks each one, in its own
    order and with its own code (a lockdown answers before a malformed name,
    an unknown nonce before a malformed tenant), and audits the refusal. The
    schemas the routes document are in ``openapi``.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    def fields(self) -> dict[str, Any]:
        """The body as the caller sent it (only the fields it has)."""
        return self.model_dump(exclude_unset=True)


class ChallengeIn(RequestBody):
    tenant: Any = None
    artifact: Any = None


class StandingIn(RequestBody):
    tenant: Any = None


class ReleaseIn(RequestBody):
    tenant: Any = None
    artifact: Any = None
    nonce: Any = None
    public_key: Any = None
    evidence: Any = None
    slot: Any = None
    context: Any = None


class AdminIn(RequestBody):
    tenant: Any = None
    all: Any = None
    reason: Any = None
    identity: Any = None

    @property
    def scope(self) -> Any:
        """What a lockdown or lift names: ``"*"`` for ``all: true``, else the tenant."""
        return "*" if self.all is True else self.tenant


_B = TypeVar("_B", bound=RequestBody)


def parse_body(raw: bytes, model: type[_B]) -> _B:
    """A request body: a JSON object (UTF-8), as *model* (a :class:`RequestBody`).

    Raises:
        BrokerRefusal: ``bad-request`` (400): not JSON, or not an object.
    """
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        what = "JSON" if exc.errors()[0]["type"] == "json_invalid" else "a JSON object"
        raise BrokerRefusal("bad-request", f"the body is not {what}", 400) from None


def _body(model: type[_B]) -> Callable[[Request], Awaitable[_B]]:
    """A dependency: the request's body as *model* (at most ``MAX_BODY`` bytes read)."""

    async def read(request: Request) -> _B:
        # A release request is a few KiB (an SNP report and its chain ~6 KiB).
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            raise BrokerRefusal("too-large", f"a body of {_clean(size)} bytes", 413)
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY:
                raise BrokerRefusal("too-large", f"a body over {MAX_BODY} bytes", 413)
        body = parse_body(raw, model)
        request.state.body = body  # for the refusal's log line and audit record
        return body

    return read


ChallengeBody = Annotated[ChallengeIn, Depends(_body(ChallengeIn))]
StandingBody = Annotated[StandingIn, Depends(_body(StandingIn))]
ReleaseBody = Annotated[ReleaseIn, Depends(_body(ReleaseIn))]
AdminBody = Annotated[AdminIn, Depends(_body(AdminIn))]


# -- who is asking ----------------------------------------------------------------


def _broker(request: Request) -> Broker:
    return request.app.state.broker


def _local_only(request: Request, allowed: bool, what: str) -> None:
    peer = request.client.host if request.client else None
    if not allowed and peer not in LOCAL_PEERS:
        raise BrokerRefusal(
            "remote-disabled",
            f"{what} from {_clean(peer)}: not enabled in the config for callers on other hosts",
        )


async def caller(request: Request) -> Identity:
    """A dependency: the identity of a bearer token and/or the verified client certificate.

    Raises:
        BrokerRefusal: ``unauthenticated`` (401): an Authorization that is not a bearer
            token, or what ``Broker.authenticate`` refuses.
    """
    auth = request.headers.get("authorization")
    bearer = None
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise BrokerRefusal("unauthenticated", "Authorization is not a bearer token", 401)
        bearer = token.strip()
    ident = _broker(request).authenticate(bearer, peer_certificate(request))
    request.state.ident = ident  # for the refusal's log line
    return ident


async def admin_caller(request: Request) -> Identity:
    """A dependency: an admin route's caller, on this host unless ``admin.remote``."""
    _local_only(request, _broker(request).config.admin_remote, "admin")
    return await caller(request)


Caller = Annotated[Identity, Depends(caller)]
Admin = Annotated[Identity, Depends(admin_caller)]


# -- refusals -------------------------------------------------------------------


def _refuse(request: Request, exc: BrokerRefusal) -> JSONResponse:
    """``{"error": code}`` with the refusal's status; who asked, for what and why to the log."""
    ident: Identity | None = getattr(request.state, "ident", None)
    body = getattr(request.state, "body", None)
    tenant, artifact = getattr(body, "tenant", None), getattr(body, "artifact", None)
    log.warning(
        "refused %s: identity=%s tenant=%s artifact=%s code=%s reason=%s peer=%s",
        request.url.path,
        ident.name if ident else "-",
        _clean(tenant),
        _clean(artifact),
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
        _broker(request)._record(
            request.url.path.rsplit("/", 1)[-1],
            "-",
            tenant,
            artifact,
            "denied",
            exc.code,
            exc.reason,
        )
    return JSONResponse({"error": exc.code}, status_code=exc.status)


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BrokerRefusal)
    return _refuse(request, exc)


async def _malformed(request: Request, exc: Exception) -> Response:
    # Not FastAPI's 422 with the validation errors: a code, like every refusal.
    return _refuse(request, BrokerRefusal("bad-request", f"the request: {exc}", 400))


class _FailClosed(APIRoute):
    """Every route: an exception that is not a refusal is a bug, answered 500 ``internal``.

    The caller learns nothing (the class name goes to the log, with the
    traceback); the answer is an ordinary refusal, not the server's error page.
    """

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def fail_closed(request: Request) -> Response:
            try:
                return await handler(request)
            except (BrokerRefusal, HTTPException, RequestValidationError):
                raise
            except Exception as exc:
                log.error("internal error on %s", request.url.path, exc_info=exc)
                name = exc.__class__.__name__
                raise BrokerRefusal("internal", f"{name} (a bug in the broker)", 500) from None

        return fail_closed


# -- the routes -------------------------------------------------------------------


def create_app(broker: Broker) -> Any:
    """The FastAPI application over *broker*."""
    # No schema or docs pages are served: openapi_schema() makes the document.
    app = FastAPI(
        title="sealstore key-release broker",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        exception_handlers={BrokerRefusal: _refused, RequestValidationError: _malformed},
    )
    app.state.broker = broker
    app.router.route_class = _FailClosed

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

    # Not response_class=PlainTextResponse: that would list the JSON refusal as text too.
    @app.get("/metrics", responses={200: METRICS, **refusals(403)})
    def metrics(request: Request) -> Any:
        _local_only(request, broker.config.metrics_remote, "metrics")
        return PlainTextResponse(broker.metrics.render(), media_type="text/plain; version=0.0.4")

    def admin_done(action: str, ident: Identity, req: AdminIn | None, out: Any) -> Any:
        log.warning(
            "admin %s by %s: %s", action, ident.name, _clean({} if req is None else req.fields())
        )
        return out

    @app.post(
        "/v1/admin/lockdown",
        responses={200: {"model": AdminOut}, **refusals(400, 401, 403, 413, 503)},
        openapi_extra=body_doc("lockdown"),
    )
    async def admin_lockdown(ident: Admin, req: AdminBody) -> Any:
        scope = req.scope
        if not isinstance(scope, str):
            raise BrokerRefusal("bad-request", "name a tenant or all: true", 400)
        reason = req.reason if isinstance(req.reason, str) else ""
        out = await anyio.to_thread.run_sync(broker.lockdown, ident, scope, reason)
        return admin_done("lockdown", ident, req, out)

    @app.post(
        "/v1/admin/lift",
        responses={200: {"model": AdminOut}, **refusals(400, 401, 403, 413, 503)},
        openapi_extra=body_doc("lift"),
    )
    async def admin_lift(ident: Admin, req: AdminBody) -> Any:
        identity, scope = req.identity, req.scope
        if isinstance(identity, str):
            out = await anyio.to_thread.run_sync(lambda: broker.lift(ident, identity=identity))
        elif not isinstance(scope, str):
            raise BrokerRefusal("bad-request", "name a tenant or all: true", 400)
        else:
            out = await anyio.to_thread.run_sync(broker.lift, ident, scope)
        return admin_done("lift", ident, req, out)

    @app.get(
        "/v1/admin/status",
        responses={200: {"model": AdminOut}, **refusals(401, 403, 503)},
        openapi_extra=AUTH,
    )
    async def admin_status(ident: Admin) -> Any:
        return admin_done(
            "status", ident, None, await anyio.to_thread.run_sync(broker.status, ident)
        )

    @app.get("/v1/health", responses={200: {"model": Health}})
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(
        "/v1/challenge",
        responses={200: {"model": ChallengeOut}, **refusals(400, 401, 403, 413, 429, 503)},
        openapi_extra=body_doc("challenge"),
    )
    async def challenge(ident: Caller, req: ChallengeBody) -> Any:
        # The shared state may be a Redis round trip: off the event loop.
        return await anyio.to_thread.run_sync(broker.challenge, ident, req.tenant, req.artifact)

    @app.post(
        "/v1/standing",
        responses={200: {"model": StandingOut}, **refusals(400, 401, 403, 413, 503)},
        openapi_extra=body_doc("standing"),
    )
    async def standing(ident: Caller, req: StandingBody) -> Any:
        return await anyio.to_thread.run_sync(broker.standing, ident, req.tenant)

    @app.post(
        "/v1/release",
        responses={200: {"model": ReleaseOut}, **refusals(400, 401, 403, 413, 429, 502, 503)},
        openapi_extra=body_doc("release"),
    )
    async def release_key(ident: Caller, req: ReleaseBody) -> Any:
        # Key services are blocking clients: keep them off the event loop.
        out = await anyio.to_thread.run_sync(broker.release, ident, req.fields())
        log.info(
            "released: identity=%s tenant=%s artifact=%s kind=%s",
            ident.name,
            req.tenant,
            req.artifact,
            req.evidence["kind"],
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
    from sealstore.enclave.broker.reload import Reloader

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
