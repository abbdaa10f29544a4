# ruff: noqa: F811 (the broker tests' fixtures, imported, are parameters here)
"""The broker against its OpenAPI document: schemathesis on a real running broker.

``sealstore broker serve`` runs with real TLS, bearer tokens, swtpm evidence
and a Redis of this module's own as its state. Schemathesis sends what the
document describes and what it does not (positive and negative data) with a
valid token: no answer may be a 500, and every answer must be one the
document lists, in the shape it lists. Then every refusal the document lists
is reached, route by route, with a request made to get it -- the last of them
(503) by killing the Redis.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from sealstore.enclave.broker.http import MAX_BODY
from sealstore.enclave.broker.openapi import openapi_schema
from tests.test_broker import (  # noqa: F401 (fixtures)
    TOKENS,
    Pki,
    Setup,
    _body,
    _free_port,
    _sha,
    _variant,
    pki,
    setup,
    start_broker,
)
from tests.test_broker_incident import _slot
from tests.test_fail_closed_broker import OwnRedis

SCHEMA = schemathesis.openapi.from_dict(openapi_schema())
BOSS, HOARDER, SPRINTER = (f"{n}-{uuid.uuid4().hex}" for n in ("boss", "hoarder", "sprinter"))
TPM_RULE = {"pcrs": "7,16", "reference_file": "pcrs.json"}


@dataclass
class Served:
    port: int
    folder: Path
    pki: Pki
    redis: OwnRedis
    setup: Setup

    def ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca))

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        source: str | None = None,
    ) -> tuple[int, Any]:
        """One request; *body* a dict (sent as JSON) or raw bytes; from *source* if given."""
        conn = http.client.HTTPSConnection(
            "127.0.0.1",
            self.port,
            context=self.ctx(),
            timeout=30,
            source_address=(source, 0) if source else None,
        )
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw.decode()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def served(setup: Setup, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("schema-broker")
    redis = OwnRedis(folder / "redis-data")
    redis.start()

    def change(d: dict) -> None:
        d["challenge_ttl"] = 30
        d["max_challenges_per_identity"] = 4
        d["state"] = {"url": redis.url, "prefix": f"schema-{uuid.uuid4().hex}:"}
        ids = d["identities"]
        ids["boss"] = {"token_sha256": _sha(BOSS), "roles": {"*": "admin"}}
        ids["hoarder"] = {"token_sha256": _sha(HOARDER), "tpm_ak": "ak.pem"}
        ids["sprinter"] = {"token_sha256": _sha(SPRINTER), "tpm_ak": "ak.pem"}
        d["tenants"]["acme"]["artifacts"]["minilm"]["identities"] += ["hoarder", "sprinter"]
        d["tenants"]["broken"] = {
            "keys": [f"local:{folder / 'no-such-keyring.json'}"],
            "artifacts": {"*": {"identities": ["trainer"], "evidence": ["tpm"], "tpm": TPM_RULE}},
        }
        # Never locked out (schemathesis fails many attestations); throttled from
        # the second release a minute.
        d["detectors"] = {
            "attestation_failures": {"max": 1_000_000},
            "release_rate": {"floor": 1, "throttle": 600},
        }

    config = _variant(setup, folder, change)
    port = _free_port()
    proc = start_broker(config, port, folder / "broker.log", pki.ca)
    try:
        yield Served(port, folder, pki, redis, setup)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except Exception:
            proc.kill()
        redis.stop()


def test_the_document_lists_every_route_and_refusal() -> None:
    doc = openapi_schema()
    ops = {(p, m): op for p, item in doc["paths"].items() for m, op in item.items()}
    assert set(ops) == {
        ("/v1/challenge", "post"),
        ("/v1/release", "post"),
        ("/v1/standing", "post"),
        ("/v1/health", "get"),
        ("/metrics", "get"),
        ("/v1/admin/lockdown", "post"),
        ("/v1/admin/lift", "post"),
        ("/v1/admin/status", "get"),
    }
    for (path, _), op in ops.items():
        codes = set(op["responses"])
        assert "422" not in codes and "500" not in codes, path
        for code in codes - {"200"}:
            ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/Refusal", (path, code)
        if path.startswith("/v1/") and path != "/v1/health":
            assert "401" in codes and op["security"], path
        if op.get("requestBody"):
            assert {"400", "413"} <= codes, path


# One test per operation, each its own pytest item with its own node id: schemathesis's
# own parametrize gives all of them one node id, and pytest-xdist (`make test`) runs one
# item per node id, so seven of the eight operations would never be called.
OPERATIONS = {op.label: op for op in (r.ok() for r in SCHEMA.get_all_operations())}


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_answer_is_a_500_or_undocumented(label: str, served: Served) -> None:
    @given(case=OPERATIONS[label].as_strategy())
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(
            base_url=f"https://127.0.0.1:{served.port}",
            verify=str(served.pki.ca),
            headers={"Authorization": f"Bearer {TOKENS['trainer']}"},
            checks=[
                schemathesis.checks.not_a_server_error,
                schemathesis.checks.status_code_conformance,
                schemathesis.checks.content_type_conformance,
                schemathesis.checks.response_schema_conformance,
            ],
        )

    check()


def test_every_documented_refusal_is_reached(served: Served, tcti: str) -> None:
    """Each (route, status) the document lists is answered to a request made for it."""
    doc = openapi_schema()
    documented = {
        (path, int(code))
        for path, item in doc["paths"].items()
        for op in item.values()
        for code in op["responses"]
        if code != "200"
    }
    methods = {path: next(iter(item)).upper() for path, item in doc["paths"].items()}
    reached: dict[tuple[str, int], Any] = {}

    def call(path: str, body: Any = None, token: str | None = None, **kw: Any) -> tuple:
        status, out = served.call(methods[path], path, body, token, **kw)
        assert status < 500 or status in (502, 503), (path, status, out)
        if status != 200:
            assert isinstance(out, dict) and set(out) == {"error"}, (path, status, out)
            reached[(path, status)] = out["error"]
        return status, out

    trainer = TOKENS["trainer"]
    authenticated = [p for p in methods if p.startswith("/v1/") and p != "/v1/health"]
    posts = [p for p in authenticated if methods[p] == "POST"]
    for path in authenticated:
        assert call(path, {"tenant": "acme"} if path in posts else None)[0] == 401
    for path in posts:
        assert call(path, b"not json", trainer) == (400, {"error": "bad-request"})
        big = b"{" + b" " * MAX_BODY + b"}"
        assert call(path, big, trainer) == (413, {"error": "too-large"})
    never = base64.b64encode(os.urandom(32)).decode()
    for path, body in [
        ("/v1/challenge", {"tenant": "acme", "artifact": "notes"}),
        ("/v1/standing", {"tenant": "globex"}),
        ("/v1/admin/lockdown", {"tenant": "acme"}),
        ("/v1/admin/lift", {"tenant": "acme"}),
        ("/v1/admin/status", None),
    ]:
        assert call(path, body, trainer) == (403, {"error": "not-permitted"}), path
    assert call("/v1/release", {"nonce": never, "public_key": ""}, trainer) == (
        403,
        {"error": "challenge-unknown"},
    )
    # 127.0.0.2 is this host too, but not one of the broker's local peers (127.0.0.1,
    # ::1): a caller the config has not allowed.
    assert call("/metrics", None, None, source="127.0.0.2") == (403, {"error": "remote-disabled"})
    assert served.call("GET", "/metrics")[0] == 200

    # 429: too many challenges outstanding for one identity; a release rate far above usual.
    minilm = {"tenant": "acme", "artifact": "minilm"}
    assert [call("/v1/challenge", minilm, HOARDER)[0] for _ in range(5)] == [200] * 4 + [429]
    blob = _slot(served.setup)

    def release(token: str, tenant: str = "acme") -> tuple[int, Any]:
        status, ch = call("/v1/challenge", {"tenant": tenant, "artifact": "minilm"}, token)
        assert status == 200, ch
        return call("/v1/release", _body(ch, tenant, "minilm", blob)[0], token)

    assert release(SPRINTER)[0] == 200
    assert release(SPRINTER) == (429, {"error": "throttled"})
    # 502: the evidence verifies, the tenant's key service cannot be set up.
    assert release(trainer, "broken") == (502, {"error": "backend-unavailable"})
    # Admin: a scope that is not a string is a bad request even for an admin.
    assert call("/v1/admin/lockdown", {"tenant": 7}, BOSS) == (400, {"error": "bad-request"})
    assert call("/v1/admin/lift", {"tenant": 7}, BOSS) == (400, {"error": "bad-request"})
    status, ch = call("/v1/challenge", minilm, trainer)
    assert status == 200, ch
    held = _body(ch, "acme", "minilm", blob)[0]

    # 503: the shared state is gone; every route that needs it refuses.
    served.redis.kill9()
    for path, body, token in [
        ("/v1/challenge", minilm, trainer),
        ("/v1/standing", {"tenant": "acme"}, trainer),
        ("/v1/release", held, trainer),
        ("/v1/admin/lockdown", {"tenant": "acme"}, BOSS),
        ("/v1/admin/lift", {"tenant": "acme"}, BOSS),
        ("/v1/admin/status", None, BOSS),
    ]:
        assert call(path, body, token) == (503, {"error": "state-unavailable"}), path
    assert set(reached) == documented, (
        f"documented, never reached: {sorted(documented - set(reached))}; "
        f"reached, not documented: {sorted(set(reached) - documented)}"
    )
    assert "internal" not in (served.folder / "broker.log").read_text()
