"""Ed25519-signed documents: manifests, tags, store config, snapshots, checkpoints.

A signer is anything with a ``signing_key_id`` (``"ed25519:" + base64(public
key)``) and ``sign(message) -> bytes``; the local keyring is one.

Documents are written as DSSE envelopes (Dead Simple Signing Envelope,
secure-systems-lab/dsse): the document's exact bytes are the payload, and the
signature is over ``PAE(payloadType, payload)``. Each kind of document has a
payload type of its own (:func:`payload_type`), so a signature on one kind is
never valid for another; a reader checks the signature over the payload bytes
first and only then parses them, so a verifier in another language needs no
canonical JSON of its own (docs/FORMAT.md, Appendix C).

Documents written before DSSE (the *old form*: ``signer`` and ``signature``
fields inside the JSON, Ed25519 over ``b"sealstore/v1/" + domain + b"\\x00" +
canonical JSON``) still verify, for as long as stores, backups and audit logs
hold them; nothing writes them any more. The two forms cannot stand in for each
other: PAE starts ``DSSEv1 ``, the old message ``sealstore/v1/``.

Written here rather than with securesystemslib's ``dsse.Envelope``: PAE is one
line, and the library would bring its key model (and, for the CLI, its import
time) to every read of a manifest; the tests check every envelope against
securesystemslib.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sealstore.errors import AuthenticationError, FormatError
from sealstore.format import canonical_json

__all__ = [
    "Signer",
    "claimed_body",
    "is_envelope",
    "key_id_for",
    "pae",
    "payload_type",
    "public_key_bytes",
    "sign_document",
    "signer_ids",
    "unverified_fields",
    "verify_document",
]

PREFIX = "ed25519:"
#: The fields of a DSSE envelope, exactly: anything more or less is not one.
ENVELOPE_FIELDS = frozenset({"payload", "payloadType", "signatures"})
#: More signatures than this on one envelope is refused before any is checked.
MAX_SIGNATURES = 16
_DOMAIN = re.compile(r"[a-z][a-z0-9-]{0,63}")


@runtime_checkable
class Signer(Protocol):
    """Signs messages with an Ed25519 key it keeps to itself."""

    @property
    def signing_key_id(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


def key_id_for(public: bytes) -> str:
    """The key id of a 32-byte Ed25519 public key."""
    if len(public) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return PREFIX + base64.b64encode(public).decode("ascii")


def public_key_bytes(key_id: str) -> bytes:
    """The public key a key id names.

    Raises:
        FormatError: not an ``ed25519:`` key id.
    """
    if not isinstance(key_id, str) or not key_id.startswith(PREFIX):
        raise FormatError(f"not an Ed25519 key id: {str(key_id)[:80]!r}")
    try:
        raw = base64.b64decode(key_id[len(PREFIX) :].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise FormatError("malformed Ed25519 key id") from None
    if len(raw) != 32:
        raise FormatError("malformed Ed25519 key id")
    return raw


def payload_type(domain: str) -> str:
    """The DSSE payload type of the kind *domain*: ``application/vnd.sealstore.DOMAIN+json``.

    Raises:
        ValueError: *domain* is not lower-case letters, digits and ``-``.
    """
    if not isinstance(domain, str) or not _DOMAIN.fullmatch(domain):
        raise ValueError(f"bad document kind {str(domain)[:40]!r}")
    return f"application/vnd.sealstore.{domain}+json"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding, the bytes a signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def is_envelope(doc: Mapping[str, Any]) -> bool:
    """Whether *doc* is a DSSE envelope (its fields exactly ``payload``, ``payloadType``,
    ``signatures``); an old-form document with a field of that name is not one."""
    return set(doc) == ENVELOPE_FIELDS


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("not a string")
    return base64.b64decode(value.encode("ascii"), validate=True)


def sign_document(domain: str, body: Mapping[str, Any], signer: Signer) -> dict[str, Any]:
    """A DSSE envelope over *body*'s canonical JSON, signed by *signer*.

    A ``signer`` field in *body* (a body read back from a verified document)
    is left out: the envelope's ``keyid`` names the signer.

    Returns:
        ``{"payload": ..., "payloadType": ..., "signatures": [{"keyid": ..., "sig": ...}]}``.

    Raises:
        ValueError: *body* already carries a signature, or *domain* is malformed.
    """
    if "signature" in body or is_envelope(body):
        raise ValueError("document is already signed")
    kind = payload_type(domain)
    payload = canonical_json({k: v for k, v in body.items() if k != "signer"})
    sig = signer.sign(pae(kind, payload))
    return {
        "payload": _b64(payload),
        "payloadType": kind,
        "signatures": [{"keyid": signer.signing_key_id, "sig": _b64(sig)}],
    }


def signer_ids(doc: Mapping[str, Any]) -> list[str]:
    """The key ids *doc* says signed it (unverified: a hint for choosing keys)."""
    if is_envelope(doc):
        sigs = doc.get("signatures")
        if not isinstance(sigs, list):
            return []
        return [s["keyid"] for s in sigs if isinstance(s, dict) and isinstance(s.get("keyid"), str)]
    signer = doc.get("signer")
    return [signer] if isinstance(signer, str) else []


def verify_document(
    domain: str, doc: Mapping[str, Any], trusted: Iterable[str], *, what: str
) -> dict[str, Any]:
    """Check *doc*'s signature against the *trusted* key ids; return the body.

    *doc* is a DSSE envelope of *domain*'s payload type, or an old-form
    document of *domain*. An envelope is accepted when a signature by a
    trusted key verifies and no signature by a trusted key fails; signatures
    by other keys are ignored.

    Returns:
        The document's fields, with ``signer`` set to the trusted key id that
        signed it.

    Raises:
        AuthenticationError: unsigned, signed by a key not in *trusted*, of
            another kind, or the signature does not verify (the document was
            edited).
        FormatError: the payload is not a JSON object.
    """
    keys = set(trusted)
    if is_envelope(doc):
        return _verify_envelope(domain, doc, keys, what)
    return _verify_old(domain, doc, keys, what)


def claimed_body(domain: str, doc: Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """*doc*'s fields, before deciding whether its signer is trusted.

    For looking up which keys to trust (a store config names its own root).
    An envelope's signature is still checked first, against the keys it names;
    an old-form document is returned as it is (the old form's fields are
    readable without a signature). Follow with :func:`verify_document`.

    Raises:
        AuthenticationError, FormatError: as :func:`verify_document`.
    """
    if is_envelope(doc):
        return _verify_envelope(domain, doc, set(signer_ids(doc)), what)
    return {k: v for k, v in doc.items() if k != "signature"}


def unverified_fields(doc: Mapping[str, Any]) -> dict[str, Any]:
    """*doc*'s fields without checking any signature: only for a hint that can
    make a check stricter, never looser (a damaged state's serial as a floor).

    Raises:
        FormatError: an envelope whose payload is not a JSON object.
    """
    if not is_envelope(doc):
        return {k: v for k, v in doc.items() if k != "signature"}
    try:
        payload = _unb64(doc["payload"])
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise FormatError("malformed DSSE payload") from None
    return _parse_payload(payload, "DSSE payload")


def _verify_envelope(
    domain: str, env: Mapping[str, Any], trusted: set[str], what: str
) -> dict[str, Any]:
    kind = payload_type(domain)
    if env["payloadType"] != kind:
        raise AuthenticationError(
            f"{what}: payload type {str(env['payloadType'])[:80]!r} is not {kind}"
        )
    try:
        payload = _unb64(env["payload"])
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise AuthenticationError(f"{what}: malformed DSSE payload") from None
    sigs = env["signatures"]
    if not isinstance(sigs, list) or not sigs:
        raise AuthenticationError(f"{what} is not signed")
    if len(sigs) > MAX_SIGNATURES:
        raise AuthenticationError(f"{what} has {len(sigs)} signatures (at most {MAX_SIGNATURES})")
    if not all(isinstance(s, dict) and isinstance(s.get("keyid"), str) for s in sigs):
        raise AuthenticationError(f"{what}: a DSSE signature without a keyid")
    keyids = [s["keyid"] for s in sigs]
    if len(set(keyids)) != len(keyids):
        raise AuthenticationError(f"{what}: two signatures by one key")
    mine = [s for s in sigs if s["keyid"] in trusted]
    if not mine:
        raise AuthenticationError(f"{what} is signed by an untrusted key {_shown(keyids[0])}")
    message = pae(kind, payload)
    # Every signature by a trusted key must verify: one that fails means the
    # envelope was edited, and it is refused even if another one holds.
    for s in mine:
        _check(s["keyid"], s.get("sig"), message, what)
    return dict(_parse_payload(payload, what), signer=mine[0]["keyid"])


def _shown(key_id: str) -> str:
    """A key id read from a document, fit for a one-line message: printable, at most 80."""
    text = key_id if key_id.isprintable() else repr(key_id)
    return text if len(text) <= 80 else text[:77] + "..."


def _verify_old(
    domain: str, doc: Mapping[str, Any], trusted: set[str], what: str
) -> dict[str, Any]:
    signer, sig = doc.get("signer"), doc.get("signature")
    if not isinstance(signer, str) or not isinstance(sig, str):
        raise AuthenticationError(f"{what} is not signed")
    if signer not in trusted:
        raise AuthenticationError(f"{what} is signed by an untrusted key {_shown(signer)}")
    body = {k: v for k, v in doc.items() if k != "signature"}
    payload_type(domain)
    message = b"sealstore/v1/" + domain.encode() + b"\x00" + canonical_json(body)
    _check(signer, sig, message, what)
    return body


def _check(key_id: str, sig: Any, message: bytes, what: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public_key_bytes(key_id)).verify(_unb64(sig), message)
    except (InvalidSignature, binascii.Error, UnicodeEncodeError, ValueError, FormatError):
        raise AuthenticationError(f"{what}: signature does not verify (edited?)") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice")
    return out


def _parse_payload(payload: bytes, what: str) -> dict[str, Any]:
    """The signed bytes, parsed as they are: strict UTF-8 JSON, one object, no repeated key."""
    try:
        body = json.loads(
            payload.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
        )
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{what}: its signed payload is not valid JSON") from None
    if not isinstance(body, dict):
        raise FormatError(f"{what}: its signed payload is not a JSON object")
    if "signer" in body or "signature" in body:
        raise FormatError(f"{what}: its signed payload has a signer or signature field")
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
