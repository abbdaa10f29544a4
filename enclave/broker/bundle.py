"""The broker's signed policy bundle: the config file and every file it names, signed together.

A broker whose config pins ``signing.public_key`` (Ed25519) takes a policy
only with a valid detached signature beside the config file, ``FILE.sig``:

.. code-block:: json

    {"format": "sealstore-broker-bundle/1", "serial": 7, "signed_at": "2026-...Z",
     "key": "<SHA-256 of the raw public key, hex>",
     "files": {"broker.yaml": "<SHA-256 hex>", "pcrs/node7.json": "<SHA-256 hex>"},
     "signature": "<base64 Ed25519 over the canonical JSON of the other fields>"}

One signature over the digests of all the files, not one per file: a file
can then not be swapped for an older signed one of its own (a rollback of the
PCRs alone), and what the broker loads is exactly what was signed together.
``files`` must name exactly the config's sources (``BrokerConfig.sources``);
names are relative to the config's folder (absolute outside it), so a bundle
signed on one host verifies on another. ``serial`` must grow from one
signature to the next: a reload refuses an older one (a replayed bundle).

The signing key signs policy and reference values; it never touches data
keys. The format is JSON of our own because no kept library does detached
signatures over a set of files (minisign or sigstore would add a tool for one
signature and still not bind the set).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealstore.enclave.broker.config import BrokerConfig
from sealstore.errors import FormatError
from sealstore.format import canonical_json

__all__ = ["FORMAT", "key_id", "read_serial", "sign_bundle", "verify_bundle"]

FORMAT = "sealstore-broker-bundle/1"
_DOMAIN = b"sealstore broker bundle v1\n"  # a bundle signature is never valid as anything else


def key_id(public_raw: bytes) -> str:
    """The name a signature gives its key: SHA-256 of the raw public key (hex)."""
    return hashlib.sha256(public_raw).hexdigest()


def _names(config: BrokerConfig) -> dict[str, str]:
    """The sources by the name a signature gives them (relative to the config's folder)."""
    base = config.path.parent
    out = {}
    for path, digest in config.sources.items():
        p = Path(path)
        out[p.relative_to(base).as_posix() if p.is_relative_to(base) else p.as_posix()] = digest
    return out


def sign_bundle(config: BrokerConfig, key: Ed25519PrivateKey, serial: int) -> bytes:
    """The detached signature (JSON bytes) of *config*'s bundle, to write to ``FILE.sig``.

    Args:
        config: the config as loaded (``BrokerConfig.load(path, verify=False)``).
        key: the signer's private key.
        serial: this signature's number; a running broker takes only a greater one.

    Raises:
        ValueError: *serial* is not a positive integer.
    """
    if isinstance(serial, bool) or not isinstance(serial, int) or serial < 1:
        raise ValueError("serial: expected a positive integer")
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    body = {
        "format": FORMAT,
        "serial": serial,
        "signed_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "key": key_id(public),
        "files": _names(config),
    }
    sig = key.sign(_DOMAIN + canonical_json(body))
    return json.dumps({**body, "signature": base64.b64encode(sig).decode()}, indent=1).encode()


def read_serial(path: Path) -> int | None:
    """The serial of the signature at *path* (unverified), or None if there is none."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    serial = doc.get("serial") if isinstance(doc, dict) else None
    return serial if isinstance(serial, int) and not isinstance(serial, bool) else None


def verify_bundle(config: BrokerConfig) -> int:
    """Check the signature beside *config* with its pinned key; return the serial.

    Raises:
        FormatError: no signature, not one of ours, signed by another key, a
            bad signature, or files other than the config's sources (one
            line naming which).
    """
    assert config.signing_key is not None
    where = config.signature_path
    try:
        doc: Any = json.loads(where.read_bytes())
    except FileNotFoundError:
        raise FormatError(
            f"broker config {config.path}: unsigned (no {where.name}) while a "
            "bundle key is pinned (signing.public_key, or serve --bundle-key)"
        ) from None
    except (OSError, ValueError) as exc:
        raise FormatError(f"bundle signature {where}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FormatError(f"bundle signature {where}: not a {FORMAT} signature")
    body = {k: v for k, v in doc.items() if k != "signature"}
    if set(body) != {"format", "serial", "signed_at", "key", "files"}:
        raise FormatError(
            f"bundle signature {where}: fields {sorted(doc)} are not "
            "format, serial, signed_at, key, files, signature"
        )
    if body["key"] != key_id(config.signing_key):
        raise FormatError(
            f"bundle signature {where}: signed by another key than "
            "the pinned one (signing.public_key, or serve --bundle-key)"
        )
    try:
        sig = base64.b64decode(doc.get("signature", ""), validate=True)
        Ed25519PublicKey.from_public_bytes(config.signing_key).verify(
            sig, _DOMAIN + canonical_json(body)
        )
    except (ValueError, TypeError, InvalidSignature):
        raise FormatError(
            f"bundle signature {where}: does not verify (altered, or not made by the pinned key)"
        ) from None
    serial = body["serial"]
    if isinstance(serial, bool) or not isinstance(serial, int) or serial < 1:
        raise FormatError(f"bundle signature {where}: serial is not a positive integer")
    signed, loaded = body["files"], _names(config)
    if not isinstance(signed, dict):
        raise FormatError(f"bundle signature {where}: files is not a mapping")
    for name in sorted(set(signed) | set(loaded)):
        if name not in signed:
            raise FormatError(f"bundle signature {where}: {name} is used but not signed")
        if name not in loaded:
            raise FormatError(f"bundle signature {where}: {name} is signed but not used")
        if signed[name] != loaded[name]:
            raise FormatError(f"bundle signature {where}: {name} is not the signed version")
    return serial
