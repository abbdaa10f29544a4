"""The key-release broker's OpenAPI document: each route's body and its refusals.

Documentation only. The routes (``http``) read their bodies
themselves (``parse_body``), so that a bad field is a refusal with a code,
never FastAPI's 422: the request schemas here reach the document through
``openapi_extra``, and the models are ``responses=``, not
``response_model=`` (which would filter what a route returns).

The document is made in the process by :func:`openapi_schema` and not
served (no ``/openapi.json``, no docs pages): the broker's only clients are
sealstore's own, and a service that holds keys answers nothing it does not
need to. Made from the routes the broker runs, it cannot drift from them;
the tests check a running broker against it (docs/FUZZING.md).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["AUTH", "METRICS", "REFUSALS", "Refusal", "body_doc", "openapi_schema", "refusals"]

# The routes read their bodies themselves (``parse_body``), so that a bad field
# is a refusal with a code, never FastAPI's 422: the request schemas below only
# document, through ``openapi_extra``, and the models are ``responses=``, not
# ``response_model=`` (which would filter what a route returns).


class Refusal(BaseModel):
    """Every refusal: a code only; the reason goes to the broker's log."""

    error: str = Field(pattern=r"^[a-z0-9-]+$", description="what was refused, see the status")


class ChallengeOut(BaseModel):
    nonce: str = Field(description="32 random bytes, base64; single use")
    expires: float = Field(description="seconds since the epoch")
    evidence: list[str] = Field(description="the evidence kinds the artifact's rule accepts")
    tpm_pcrs: str | None = Field(None, description="the PCRs a TPM quote must cover")


class ReleaseOut(BaseModel):
    sealed: str = Field(description="the data key in a NaCl sealed box to public_key, base64")


class StandingOut(BaseModel):
    standing: str = Field(description="ok, locked-down or locked-out")
    reason: str


class AdminOut(BaseModel):
    lockdowns: dict[str, str]
    lockouts: dict[str, str]
    lifted: bool | None = None


class Health(BaseModel):
    status: str


_ATTESTATION = (
    "the verifier's own codes: tpm-*, snp-*, tdx-*, cert-* (docs/ATTESTATION.md), "
    "evidence-format, evidence-kind"
)
# status -> the codes a route may answer with it. Each route lists the statuses
# it can reach; tests/test_broker_schema.py reaches each one on a running broker.
REFUSALS: dict[int, str] = {
    400: "bad-request: the body is not a JSON object, or a field is missing or malformed",
    401: "unauthenticated: no bearer token or client certificate, or one naming no identity",
    403: "not-permitted, locked-down, locked-out, remote-disabled; on a release also "
    "challenge-unknown, challenge-mismatch, challenge-expired, key-unavailable and " + _ATTESTATION,
    413: "too-large: a body over 256 KiB",
    429: "throttled (releases far above the identity's usual rate), busy (too many "
    "challenges outstanding for this identity)",
    502: "backend-unavailable: the tenant's key service cannot be set up",
    503: "state-unavailable (the shared state or the audit log cannot be read), "
    "audit-unavailable (a decision could not be recorded), busy (too many challenges)",
}


def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=`` for these refusal statuses."""
    return {code: {"model": Refusal, "description": REFUSALS[code]} for code in statuses}


_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}
_B64 = {"type": "string", "contentEncoding": "base64"}
# GPU evidence joins a CPU kind ("snp+nvidia-gpu"): one report and chain per GPU.
_GPUS = {
    "type": "array",
    "minItems": 1,
    "maxItems": 64,
    "items": {
        "type": "object",
        "required": ["report", "certs"],
        "properties": {"report": _B64, "certs": _B64},
    },
}
_EVIDENCE = {
    "oneOf": [
        {
            "type": "object",
            "required": ["kind", "attest", "signature", "pcrs"],
            "properties": {
                "kind": {"enum": ["tpm", "tpm+nvidia-gpu"]},
                "nvidia-gpu": _GPUS,
                "attest": _B64,
                "signature": _B64,
                "pcrs": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        {
            "type": "object",
            "required": ["kind", "report", "certs"],
            "properties": {
                "kind": {"enum": ["snp", "snp+nvidia-gpu"]},
                "nvidia-gpu": _GPUS,
                "report": _B64,
                "certs": {"type": "object", "additionalProperties": _B64},
            },
        },
        {
            "type": "object",
            "required": ["kind", "quote"],
            "properties": {
                "kind": {"enum": ["tdx", "tdx+nvidia-gpu"]},
                "nvidia-gpu": _GPUS,
                "quote": _B64,
            },
        },
    ]
}
_BODIES: dict[str, dict[str, Any]] = {
    "challenge": {
        "type": "object",
        "required": ["tenant", "artifact"],
        "properties": {"tenant": _NAME, "artifact": _NAME},
    },
    "standing": {"type": "object", "required": ["tenant"], "properties": {"tenant": _NAME}},
    "release": {
        "type": "object",
        "required": ["tenant", "artifact", "nonce", "public_key", "evidence", "slot", "context"],
        "properties": {
            "tenant": _NAME,
            "artifact": _NAME,
            "nonce": _B64,
            "public_key": _B64,
            "evidence": _EVIDENCE,
            "slot": {
                "type": "object",
                "required": ["kind", "key_id", "blob"],
                "properties": {
                    "kind": {"type": "string"},
                    "key_id": {"type": "string"},
                    "blob": _B64,
                },
            },
            "context": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "lockdown": {
        "type": "object",
        "properties": {"tenant": _NAME, "all": {"type": "boolean"}, "reason": {"type": "string"}},
    },
    "lift": {
        "type": "object",
        "properties": {"tenant": _NAME, "all": {"type": "boolean"}, "identity": {"type": "string"}},
    },
}


def body_doc(name: str) -> dict[str, Any]:
    """A route's ``openapi_extra``: the JSON body *name* it reads, and who may call it."""
    schema = _BODIES[name]
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        **AUTH,
    }


METRICS = {
    "description": "Prometheus text exposition",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}
AUTH = {"security": [{"bearer": []}, {"mtls": []}]}


def openapi_schema() -> dict[str, Any]:
    """The broker's OpenAPI 3.1 document, made in this process (the broker does not serve it).

    Returns:
        The document as a dict: every route, the body it reads, what it answers.
    """
    # The routes are only declared here: no handler runs, so no Broker is needed.
    from sealstore.enclave.broker.http import create_app

    doc = create_app(None).openapi()  # type: ignore[arg-type]
    # FastAPI lists JSON for every 200; the metrics are text only.
    doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"].pop("application/json")
    doc.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer"},
        "mtls": {"type": "mutualTLS"},
    }
    return doc
