"""The key-release protocol, shared by the broker and its client (no web code here).

One release is two requests over TLS (the RATS background-check model):

1. ``POST /v1/challenge {tenant, artifact}`` -> ``{nonce, expires, evidence, tpm_pcrs}``:
   a fresh 32-byte nonce, single use, bound to the caller's identity and to
   that artifact, and the evidence kinds its policy accepts.
2. The workload makes an ephemeral X25519 key pair and collects evidence
   whose user data is ``binding(nonce, public_key, kind)``: a TPM quote's
   qualifying data, an SEV-SNP or TDX report_data. A kind joined with
   ``+nvidia-gpu`` (``snp+nvidia-gpu``) adds every GPU's attestation report,
   whose SPDM requester nonce is the challenge's nonce itself.
3. ``POST /v1/release {nonce, public_key, evidence, slot, context}`` ->
   ``{suite, sealed}``: the DEK sealed with HPKE (RFC 9180, ``ANSWER_SUITE``)
   to that ephemeral key, so a TLS terminator or proxy on the way never sees
   it, and evidence taken for one key pair is useless with another. HPKE's
   ``info`` is ``answer_info``: the protocol, the challenge's nonce, the
   ephemeral key, tenant and artifact, so an answer opens only for the
   challenge it was made for (a replayed or misdirected answer does not).

The slot the broker opens is an ordinary key slot of one of the tenant's
keys (local keyring, Vault Transit, AWS KMS), wrapped under the artifact's
encryption context plus ``sealstore.release = "TENANT/ARTIFACT"``: a slot made
for one artifact does not open when presented as another's, so a workload
allowed one artifact's key cannot get a second artifact's key by relabelling.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

from sealstore.errors import AuthenticationError, FormatError
from sealstore.format import canonical_json

__all__ = [
    "ANSWER_SUITE",
    "CONTEXT_KEY",
    "EVIDENCE_KINDS",
    "GPU_KIND",
    "SLOT_KIND",
    "answer_info",
    "b64d",
    "b64e",
    "binding",
    "open_answer",
    "parse_kind",
    "scoped_context",
    "seal_answer",
]

PROTOCOL = b"sealstore-release-v1"
SLOT_KIND = "broker+https"
CONTEXT_KEY = "sealstore.release"
EVIDENCE_KINDS = ("tpm", "snp", "tdx")
# GPU evidence is never enough alone: the key goes to the CPU side, and only
# the CPU's evidence binds the ephemeral key. It joins a CPU kind: "snp+nvidia-gpu".
GPU_KIND = "nvidia-gpu"
NONCE_SIZE = 32
# The answer's suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305,
# base mode. Named in every answer, so a client meeting another suite (or the
# sealed box of older brokers) says so instead of failing to decrypt.
ANSWER_SUITE = "hpke-x25519-hkdf-sha256-chacha20poly1305"
_ENC_SIZE = 32


def parse_kind(kind: Any) -> tuple[str, bool]:
    """``"snp"`` -> ``("snp", False)``; ``"snp+nvidia-gpu"`` -> ``("snp", True)``.

    Raises:
        ValueError: not a CPU kind, optionally joined with ``+nvidia-gpu``.
    """
    cpu, plus, gpu = kind.partition("+") if isinstance(kind, str) else ("", "", "")
    if cpu not in EVIDENCE_KINDS or (plus and gpu != GPU_KIND):
        raise ValueError(
            f"unknown kind {kind!r} (known: tpm, snp, tdx, each optionally +{GPU_KIND})"
        )
    return cpu, bool(plus)


def binding(nonce: bytes, public_key: bytes, kind: str) -> bytes:
    """What the evidence must carry: a hash of the protocol, the nonce and the ephemeral key.

    SHA-512 (64 bytes, the whole report_data) for SEV-SNP and TDX; SHA-256
    for a TPM quote, whose qualifying data many TPMs cap at a digest's size.

    For a GPU report (*kind* ``nvidia-gpu``) the nonce itself: the SPDM
    requester nonce is 32 bytes the requester picks freely, so hashing the
    ephemeral key into it would bind nothing a forger could not also compute
    (the key is public). What ties the GPU's evidence to this release is the
    nonce's freshness and the CPU evidence beside it in the same request,
    whose report_data binds the nonce and the key, and whose measured code
    collected the GPU's report.
    """
    if kind == GPU_KIND:
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a GPU report's nonce is {NONCE_SIZE} bytes")
        return nonce
    if kind not in EVIDENCE_KINDS:
        raise ValueError(f"unknown evidence kind {kind!r}")
    msg = PROTOCOL + struct.pack(">H", len(nonce)) + nonce + public_key
    return (hashlib.sha256 if kind == "tpm" else hashlib.sha512)(msg).digest()


def scoped_context(context: Mapping[str, str], tenant: str, artifact: str) -> dict[str, str]:
    """*context* plus the release scope the broker checks a slot against."""
    if CONTEXT_KEY in context:
        raise ValueError(f"the encryption context may not set {CONTEXT_KEY!r} itself")
    return {**context, CONTEXT_KEY: f"{tenant}/{artifact}"}


def b64e(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def b64d(text: Any, what: str) -> bytes:
    """Decode a base64 field of a request or response; FormatError naming it otherwise."""
    if not isinstance(text, str):
        raise FormatError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise FormatError(f"{what} is not valid base64") from None


def _suite() -> hpke.Suite:
    return hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


def answer_info(nonce: bytes, public_key: bytes, tenant: str, artifact: str) -> bytes:
    """HPKE ``info`` of a release answer: it opens only for this challenge and this key."""
    bound = {
        "artifact": artifact,
        "nonce": b64e(nonce),
        "public_key": b64e(public_key),
        "suite": ANSWER_SUITE,
        "tenant": tenant,
    }
    return PROTOCOL + b"/answer\x00" + canonical_json(bound)


def seal_answer(
    dek: bytes, public_key: bytes, *, nonce: bytes, tenant: str, artifact: str
) -> dict[str, str]:
    """The broker's answer: *dek* sealed with HPKE to the workload's ephemeral key.

    Raises:
        ValueError: *public_key* is not an X25519 public key.
    """
    pk = x25519.X25519PublicKey.from_public_bytes(public_key)
    info = answer_info(nonce, public_key, tenant, artifact)
    return {"suite": ANSWER_SUITE, "sealed": b64e(_suite().encrypt(dek, pk, info=info))}


def open_answer(
    answer: Any, secret_key: bytes, *, nonce: bytes, tenant: str, artifact: str
) -> bytes:
    """The DEK from a broker's answer, opened with the ephemeral secret key.

    Raises:
        FormatError: not an answer of ``ANSWER_SUITE`` (another suite, or an
            older broker's sealed box).
        AuthenticationError: it does not open: altered, or made for another
            challenge, key, tenant or artifact.
    """
    if not isinstance(answer, dict):
        raise FormatError("the answer is not a JSON object")
    suite = answer.get("suite")
    if suite != ANSWER_SUITE:
        said = "no suite (an older broker's sealed box)" if suite is None else repr(suite)[:80]
        raise FormatError(f"answered with {said}; this client accepts only {ANSWER_SUITE}")
    sealed = b64d(answer.get("sealed"), "sealed")
    sk = x25519.X25519PrivateKey.from_private_bytes(secret_key)
    public = sk.public_key().public_bytes_raw()
    info = answer_info(nonce, public, tenant, artifact)
    if len(sealed) < _ENC_SIZE + 16:
        raise AuthenticationError("the sealed key does not open")
    try:
        return _suite().decrypt(sealed, sk, info=info)
    except (InvalidTag, ValueError):
        raise AuthenticationError(
            "the sealed key does not open (altered, or made for another challenge)"
        ) from None
