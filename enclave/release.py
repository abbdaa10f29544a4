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
   ``{sealed}``: the DEK in a NaCl sealed box to that ephemeral key, so a
   TLS terminator or proxy on the way never sees it, and evidence taken for
   one key pair is useless with another.

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

from sealstore.errors import FormatError

__all__ = [
    "CONTEXT_KEY",
    "EVIDENCE_KINDS",
    "GPU_KIND",
    "SLOT_KIND",
    "b64d",
    "b64e",
    "binding",
    "parse_kind",
    "scoped_context",
]

PROTOCOL = b"sealstore-release-v1"
SLOT_KIND = "broker+https"
CONTEXT_KEY = "sealstore.release"
EVIDENCE_KINDS = ("tpm", "snp", "tdx")
# GPU evidence is never enough alone: the key goes to the CPU side, and only
# the CPU's evidence binds the ephemeral key. It joins a CPU kind: "snp+nvidia-gpu".
GPU_KIND = "nvidia-gpu"
NONCE_SIZE = 32


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
