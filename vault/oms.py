"""OpenSSF Model Signing (OMS) v1.0 signatures over a version's plaintext files.

An OMS signature is a Sigstore bundle (``application/vnd.dev.sigstore.bundle.v0.3+json``)
holding a DSSE envelope whose payload is an in-toto Statement v1 with the
predicate ``https://model_signing/signature/v1.0``: one SHA-256 per file of
the model (``predicate.resources``), a subject digest that is the SHA-256 of
those digests concatenated in path order, and the serialization settings the
verifier re-hashes the folder with (``method: files``, ``hash_type: sha256``,
``ignore_paths``). The ``model_signing`` package (``model_signing sign key`` /
``verify key``) writes and reads exactly this.

Written here, not through ``model_signing``'s API, on purpose:

* a push already computes every file's SHA-256 while it seals it (the
  manifest and the BoM record them); the statement is built from those
  digests, so signing costs one ECDSA signature and no second read of a
  100 GiB model, where ``model_signing``'s API would hash the folder again
  (and could not sign files pushed from memory at all);
* ``model_signing`` pulls in sigstore, tuf, pyOpenSSL and protobuf models
  (and pyOpenSSL's own pin on ``cryptography``) for what is, with a key, one
  ECDSA signature over the DSSE pre-authentication encoding -- ``cryptography``
  already does that.

The real ``model_signing`` verifies what this module writes, and this module
verifies what ``model_signing`` writes: ``tests/test_oms.py`` runs both ways.
Supported: signatures made with an EC private key (P-256, P-384, P-521, the
curves ``model_signing`` accepts), bare or with its X.509 certificate chain
(``model_signing sign|verify certificate``: the chain is verified to the
caller's roots with ``cryptography.x509.verification``), ``method: files``
with SHA-256 (its default). Not supported, refused with one line: keyless
(Sigstore, Fulcio + Rekor) bundles, the ``shards`` method, other hash types.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from sealstore.errors import AuthenticationError, FormatError

__all__ = [
    "DEFAULT_SIGNATURE",
    "GIT_PATHS",
    "OmsSignature",
    "PlaintextDigest",
    "Roots",
    "load_certificates",
    "load_private_key",
    "load_public_key",
    "load_trust",
    "sign",
    "verify",
    "verify_stream",
]

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
#: The file name ``model_signing`` reads and writes by default.
DEFAULT_SIGNATURE = "model.sig"
#: What ``model_signing`` leaves out of a signature by default (``--ignore-git-paths``).
GIT_PATHS = (".git", ".github", ".gitattributes", ".gitignore")
_MAX_BUNDLE = 16 << 20
_CURVES = {"secp256r1": 256, "secp384r1": 384, "secp521r1": 521}


def _hash_for(key: Any) -> Any:
    from cryptography.hazmat.primitives import hashes

    bits = _CURVES.get(key.curve.name)
    if bits is None:
        raise ValueError(
            f"OMS signing key: unsupported curve {key.curve.name} (use P-256, P-384 or P-521)"
        )
    return {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[bits]


def _read_pem(key: str | os.PathLike[str] | bytes, what: str) -> bytes:
    if isinstance(key, bytes):
        return key
    try:
        with open(key, "rb") as fp:
            return fp.read(1 << 20)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {os.fspath(key)} does not exist") from None


def load_private_key(key: str | os.PathLike[str] | bytes, password: bytes | None = None) -> Any:
    """An EC private key (PEM file or bytes) to sign with.

    Raises:
        ValueError: not a PEM EC private key of a supported curve, or a wrong password.
        FileNotFoundError: no such file.
    """
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read_pem(key, "OMS signing key")
    try:
        priv = load_pem_private_key(data, password)
    except (ValueError, TypeError):
        # Never the key bytes or the password in the message.
        raise ValueError(
            "OMS signing key: not a PEM private key, or it needs a password "
            "($SEALSTORE_SIGN_KEY_PASSWORD)"
        ) from None
    if not isinstance(priv, ec.EllipticCurvePrivateKey):
        raise ValueError("OMS signing key: not an EC key (model_signing signs with EC keys)")
    _hash_for(priv)
    return priv


def load_public_key(key: str | os.PathLike[str] | bytes | Any) -> Any:
    """An EC public key (PEM SubjectPublicKeyInfo file or bytes) to verify with.

    A ``cryptography`` EC public key object is taken as it is.

    Raises:
        ValueError: not a PEM EC public key of a supported curve. FileNotFoundError.
    """
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if isinstance(key, ec.EllipticCurvePublicKey):
        _hash_for(key)
        return key
    data = _read_pem(key, "OMS public key")
    try:
        pub = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ValueError("OMS public key: not a PEM public key") from None
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise ValueError("OMS public key: not an EC key")
    _hash_for(pub)
    return pub


@dataclass(frozen=True)
class Roots:
    """Trusted root certificates, for signatures made with a certificate
    (``model_signing sign certificate``)."""

    certificates: tuple[Any, ...]


def load_trust(trust: str | os.PathLike[str] | bytes | Any) -> Any:
    """What a signature is verified with: an EC public key, or :class:`Roots`.

    A PEM file (or bytes) holding ``CERTIFICATE`` blocks is read as the trusted
    root certificates (as ``model_signing verify certificate
    --certificate_chain``); anything else as an EC public key.

    Raises:
        ValueError: neither. FileNotFoundError.
    """
    from cryptography import x509

    if isinstance(trust, Roots):
        return trust
    if isinstance(trust, (str, os.PathLike, bytes)):
        data = _read_pem(trust, "OMS public key or root certificates")
        if b"-----BEGIN CERTIFICATE-----" in data:
            try:
                return Roots(tuple(x509.load_pem_x509_certificates(data)))
            except ValueError:
                raise ValueError("OMS root certificates: not PEM certificates") from None
        trust = data
    return load_public_key(trust)


def load_certificates(pem: str | os.PathLike[str] | bytes) -> tuple[Any, ...]:
    """The certificates of a PEM file (or bytes), in order.

    Raises:
        ValueError: none, or one that does not parse. FileNotFoundError.
    """
    from cryptography import x509

    try:
        certs = tuple(x509.load_pem_x509_certificates(_read_pem(pem, "OMS certificate file")))
    except ValueError:
        raise ValueError("OMS certificates: not a PEM file of certificates") from None
    return certs


def _signing_certificate(chain: list[Any], roots: Roots, where: str) -> Any:
    """The leaf's public key once the chain verifies to *roots*, at the leaf's
    not-before time (the signing time, as ``model_signing`` takes it), and the
    leaf may sign (key usage digitalSignature, or extended key usage codeSigning)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from cryptography.x509.verification import (
        ExtensionPolicy,
        PolicyBuilder,
        Store,
        VerificationError,
    )

    leaf = chain[0]
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots.certificates)))
        .time(leaf.not_valid_before_utc)
        # Web-PKI rules for the CAs; the signing certificate's usage is checked below,
        # as model_signing checks it (no TLS client or server usage is required).
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, chain[1:])
    except VerificationError as exc:
        raise AuthenticationError(
            f"{where}: its certificate does not chain to the root certificates given ({exc})"
        ) from None
    usable = False
    with contextlib.suppress(x509.ExtensionNotFound):
        usable = leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    if not usable:
        with contextlib.suppress(x509.ExtensionNotFound):
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            usable = ExtendedKeyUsageOID.CODE_SIGNING in eku
    if not usable:
        raise AuthenticationError(f"{where}: its certificate may not be used for signing")
    return load_public_key(leaf.public_key())


def key_hint(public_key: Any) -> str:
    """The bundle's ``publicKey.hint``: SHA-256 of the key's PEM, as ``model_signing`` writes it."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pem = public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding (secure-systems-lab/dsse protocol.md)."""
    return b"DSSEv1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload), payload)


def _root_digest(digests: Mapping[str, str]) -> str:
    root = hashlib.sha256()
    for path in sorted(digests):
        root.update(bytes.fromhex(digests[path]))
    return root.hexdigest()


def ignored(path: str, ignore_paths: Iterable[str]) -> bool:
    """Whether *path* (relative, '/'-separated) lies under one of *ignore_paths*."""
    p = PurePosixPath(path)
    return any(p.is_relative_to(PurePosixPath(i)) for i in ignore_paths)


@dataclass(frozen=True)
class OmsSignature:
    """A verified (or just made) OMS signature.

    Attributes:
        bundle: the Sigstore bundle, byte for byte as it is stored and written out.
        model_name: the statement's subject name (informative only).
        root_digest: the subject's SHA-256 over the file digests.
        digests: file path -> SHA-256 hex, every file the signature covers.
        ignore_paths: paths the signer left out (the verifier skips them too).
        key_hint: the bundle's public-key hint (SHA-256 of the key's PEM), if any.
    """

    bundle: bytes
    model_name: str
    root_digest: str
    digests: Mapping[str, str]
    ignore_paths: tuple[str, ...]
    key_hint: str | None

    def covers(self, path: str) -> bool:
        return path in self.digests

    def record(self) -> dict[str, str]:
        """What the BoM records of it (no key material: the key's hash only)."""
        return {
            "format": "OMS v1.0 (Sigstore bundle v0.3, DSSE, in-toto)",
            "predicate-type": PREDICATE_TYPE,
            "root-sha256": self.root_digest,
            "key-hint-sha256": self.key_hint or "",
            "files": str(len(self.digests)),
            "bundle-sha256": hashlib.sha256(self.bundle).hexdigest(),
        }

    def check_files(self, actual: Mapping[str, str], *, where: str) -> None:
        """Check a model's files (path -> SHA-256 hex) against the signature.

        Files under :attr:`ignore_paths` are outside it, as for ``model_signing verify``.

        Raises:
            AuthenticationError: a file missing, a file the signature does not
                cover, or a digest that differs (the first one found, named).
        """
        present = {p for p in actual if not ignored(p, self.ignore_paths)}
        missing = sorted(set(self.digests) - present)
        if missing:
            raise AuthenticationError(
                f"{where}: {missing[0]} is signed but missing ({len(missing)} file(s) missing)"
            )
        extra = sorted(present - set(self.digests))
        if extra:
            raise AuthenticationError(f"{where}: {extra[0]} is not covered by the model signature")
        for path in sorted(self.digests):
            if not hmac.compare_digest(actual[path], self.digests[path]):
                raise AuthenticationError(f"{where}: {path} does not match the model signature")


def sign(
    digests: Mapping[str, str],
    private_key: Any,
    *,
    model_name: str,
    ignore_paths: Iterable[str] = (*GIT_PATHS, DEFAULT_SIGNATURE),
    certificates: Iterable[Any] = (),
) -> OmsSignature:
    """An OMS v1.0 signature over files given by their SHA-256.

    Args:
        digests: file path ('/'-separated, relative) -> SHA-256 hex of its plaintext.
        private_key: from :func:`load_private_key`.
        model_name: the statement's subject name.
        ignore_paths: recorded in the predicate; the verifier leaves these
            paths out when it hashes the folder.
        certificates: sign as ``model_signing sign certificate`` does: the
            signing certificate (of *private_key*'s public key) first, then the
            rest of its chain; verified with ``model_signing verify certificate``.

    Returns:
        The signature (its :attr:`~OmsSignature.bundle` is what ``model_signing`` reads).

    Raises:
        ValueError: no files, or a file under *ignore_paths*.
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    ignore = tuple(ignore_paths)
    if not digests:
        raise ValueError("an OMS signature needs at least one file")
    for path in digests:
        if ignored(path, ignore):
            raise ValueError(f"{path} lies under an ignored path of the signature")
    resources = [{"name": p, "algorithm": "sha256", "digest": digests[p]} for p in sorted(digests)]
    root = _root_digest(digests)
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": False,
                "ignore_paths": list(ignore),
            },
            "resources": resources,
        },
    }
    payload = json.dumps(statement, indent=2).encode()
    sig = private_key.sign(_pae(payload), ec.ECDSA(_hash_for(private_key)))
    hint = key_hint(private_key.public_key())
    material: dict[str, Any] = {"publicKey": {"hint": hint}}
    chain = list(certificates)
    if chain:
        from cryptography.hazmat.primitives.serialization import Encoding

        if key_hint(chain[0].public_key()) != hint:
            raise ValueError("OMS signing certificate: it is not the signing key's certificate")
        der = [base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in chain]
        material = {"x509CertificateChain": {"certificates": [{"rawBytes": d} for d in der]}}
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {**material, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}],
        },
    }
    return OmsSignature(
        bundle=json.dumps(bundle).encode(),
        model_name=model_name,
        root_digest=root,
        digests=dict(digests),
        ignore_paths=ignore,
        key_hint=hint,
    )


def _field(doc: Any, key: str, kind: type, where: str) -> Any:
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, kind):
        raise FormatError(f"{where}: bad or missing {key}")
    return value


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{where}: not base64") from None


def verify(bundle: bytes, public_key: Any, *, where: str = "model signature") -> OmsSignature:
    """Verify an OMS bundle's signature with *public_key* and read what it signs.

    *public_key* is an EC public key for a bundle signed with a key, or
    :class:`Roots` for one signed with a certificate (its chain is verified
    to them, then the signature with the certificate's key).

    Only the signature and the statement are checked here; the files are
    checked with :meth:`OmsSignature.check_files` (or hashed beside a
    decryption, :class:`PlaintextDigest`).

    Raises:
        AuthenticationError: the signature does not verify with this key (or
            the bundle names another key).
        FormatError: not an OMS v1.0 bundle this release reads (keyless
            bundles, shards, other hash types are named as such).
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    if len(bundle) > _MAX_BUNDLE:
        raise FormatError(f"{where} is too large")
    try:
        doc = json.loads(bundle)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{where} is not a JSON Sigstore bundle") from None
    if _field(doc, "mediaType", str, where) != BUNDLE_MEDIA_TYPE:
        raise FormatError(f"{where}: not a Sigstore bundle v0.3 ({doc.get('mediaType')!r})")
    material = _field(doc, "verificationMaterial", dict, where)
    if "x509CertificateChain" in material:
        if not isinstance(public_key, Roots):
            raise AuthenticationError(
                f"{where} is signed with a certificate: give the root certificates "
                "(a PEM file of CERTIFICATE blocks), not a public key"
            )
        public_key = _signing_certificate(_chain(material, where), public_key, where)
        hint = key_hint(public_key)
    elif "publicKey" in material:
        if isinstance(public_key, Roots):
            raise AuthenticationError(
                f"{where} is signed with a key, not a certificate: give its public key"
            )
        pk = material["publicKey"]
        hint = pk.get("hint") if isinstance(pk, dict) else None
        if hint and not hmac.compare_digest(str(hint), key_hint(public_key)):
            raise AuthenticationError(f"{where} was made with another key than the one given")
    else:
        kinds = ", ".join(sorted(k for k in material if k != "tlogEntries")) or "none"
        raise FormatError(
            f"{where}: neither a key nor a certificate chain (verification material: {kinds}); "
            "keyless Sigstore signatures are verified with model_signing itself"
        )
    env = _field(doc, "dsseEnvelope", dict, where)
    if _field(env, "payloadType", str, where) != PAYLOAD_TYPE:
        raise FormatError(f"{where}: DSSE payload is not an in-toto statement")
    payload = _b64(_field(env, "payload", str, where), where)
    sigs = _field(env, "signatures", list, where)
    if len(sigs) != 1:
        raise FormatError(f"{where}: expected one DSSE signature, found {len(sigs)}")
    sig = _b64(_field(sigs[0], "sig", str, where), where)
    try:
        public_key.verify(sig, _pae(payload), ec.ECDSA(_hash_for(public_key)))
    except InvalidSignature:
        raise AuthenticationError(f"{where} does not verify with the public key given") from None
    return _statement(bundle, payload, hint, where)


def _chain(material: dict[str, Any], where: str) -> list[Any]:
    from cryptography import x509

    chain = _field(material, "x509CertificateChain", dict, where)
    certs = _field(chain, "certificates", list, where)
    if not certs:
        raise FormatError(f"{where}: an empty certificate chain")
    try:
        return [
            x509.load_der_x509_certificate(_b64(_field(c, "rawBytes", str, where), where))
            for c in certs
        ]
    except ValueError:
        raise FormatError(f"{where}: a certificate of its chain does not parse") from None


def _statement(bundle: bytes, payload: bytes, hint: Any, where: str) -> OmsSignature:
    """The signed statement's contents (its signature already verified)."""
    try:
        st = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{where}: the signed statement is not JSON") from None
    if _field(st, "_type", str, where) != STATEMENT_TYPE:
        raise FormatError(f"{where}: not an in-toto Statement v1")
    ptype = _field(st, "predicateType", str, where)
    if ptype != PREDICATE_TYPE:
        raise FormatError(f"{where}: predicate {ptype!r} is not OMS v1.0 ({PREDICATE_TYPE})")
    subjects = _field(st, "subject", list, where)
    if len(subjects) != 1:
        raise FormatError(f"{where}: expected one subject, found {len(subjects)}")
    name = _field(subjects[0], "name", str, where)
    root = _field(_field(subjects[0], "digest", dict, where), "sha256", str, where)
    pred = _field(st, "predicate", dict, where)
    ser = _field(pred, "serialization", dict, where)
    if ser.get("method") != "files" or ser.get("hash_type") != "sha256":
        raise FormatError(
            f"{where}: serialized as {ser.get('method')!r} with {ser.get('hash_type')!r}; "
            "sealstore reads method 'files' with 'sha256' (model_signing's default)"
        )
    ignore = ser.get("ignore_paths", [])
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise FormatError(f"{where}: bad ignore_paths")
    digests: dict[str, str] = {}
    for res in _field(pred, "resources", list, where):
        path = _field(res, "name", str, where)
        digest = _field(res, "digest", str, where)
        if res.get("algorithm") != "sha256" or len(digest) != 64:
            raise FormatError(f"{where}: {path} is not hashed with sha256")
        try:
            bytes.fromhex(digest)
        except ValueError:
            raise FormatError(f"{where}: {path} has a bad digest") from None
        if path in digests:
            raise FormatError(f"{where}: {path} is listed twice")
        digests[path] = digest.lower()
    if not digests:
        raise FormatError(f"{where} signs no files")
    if not hmac.compare_digest(_root_digest(digests), root.lower()):
        raise AuthenticationError(f"{where}: the subject digest does not match its files")
    return OmsSignature(
        bundle=bundle,
        model_name=name,
        root_digest=root.lower(),
        digests=digests,
        ignore_paths=tuple(ignore),
        key_hint=str(hint) if hint else None,
    )


class PlaintextDigest:
    """SHA-256 of a file's plaintext, computed beside its decryption, in file order.

    The decrypting lanes hand in each plaintext range as they finish it
    (:meth:`feed`, from any thread, in any order, ranges possibly read
    twice); the lane that completes the next range in file order hashes it
    and every range already waiting after it, while the bytes are still in
    its cache. Nothing is copied: the ranges are the destination buffers
    themselves, which the loader does not return before :meth:`check`.

    Args:
        size: the file's plaintext size.
        expected: the SHA-256 hex the signature gives.
        where: how the error line names the file.
    """

    def __init__(self, size: int, expected: str, where: str) -> None:
        self._size, self._expected, self._where = size, expected, where
        self._sha = hashlib.sha256()
        self._next = 0
        self._waiting: dict[int, memoryview] = {}
        self._lock = threading.Lock()
        self._busy = False
        self._copies: list[bytearray] = []

    def feed(self, offset: int, view: memoryview) -> None:
        """One decrypted (authenticated) range of the plaintext, starting at *offset*."""
        if not len(view):
            return
        with self._lock:
            if offset + len(view) <= self._next:
                return  # read before (a header parsed, then the whole file)
            prior = self._waiting.get(offset)
            if prior is None or len(prior) < len(view):
                self._waiting[offset] = view
            if self._busy:
                return  # the lane hashing now takes it when it gets there
            self._busy = True
        while True:
            with self._lock:
                piece = self._take()
                if piece is None:
                    self._busy = False
                    return
            self._sha.update(piece)  # hashlib drops the GIL for large buffers

    def _take(self) -> memoryview | None:
        """The next range in file order, if it has arrived (the lock is held)."""
        view = self._waiting.pop(self._next, None)
        if view is None:
            # A range that starts before the next byte and runs past it (two
            # reads overlapping): only its unhashed tail counts.
            for start in [s for s in self._waiting if s < self._next]:
                v = self._waiting.pop(start)
                if start + len(v) > self._next:
                    view = v[self._next - start :]
                    break
        if view is not None:
            self._next += len(view)
        return view

    def feed_transient(self, offset: int, view: memoryview) -> None:
        """:meth:`feed` for a buffer its caller reuses after the call (a chunk cache).

        Hashed now if it is the next range in file order; otherwise kept as a
        copy until its turn (wiped by :meth:`discard`).
        """
        with self._lock:
            now = offset <= self._next and not self._busy
        if now:
            self.feed(offset, view)
            return
        copy = bytearray(view)
        with self._lock:
            self._copies.append(copy)
        self.feed(offset, memoryview(copy))

    def gaps(self) -> list[tuple[int, int]]:
        """The ``(offset, length)`` ranges of the file not fed yet, in order.

        A reader that skipped bytes (zip padding a ``torch.load`` never reads)
        decrypts just these at the end, instead of the whole file a second time.
        """
        with self._lock:
            out, pos = [], self._next
            for start in sorted(self._waiting):
                if start > pos:
                    out.append((pos, start - pos))
                pos = max(pos, start + len(self._waiting[start]))
            if pos < self._size:
                out.append((pos, self._size - pos))
            return out

    def discard(self) -> None:
        """Wipe the copies :meth:`feed_transient` kept and drop every waiting range."""
        with self._lock:
            self._waiting.clear()
            for copy in self._copies:
                copy[:] = bytes(len(copy))
            self._copies.clear()

    def check(self) -> None:
        """Raise unless every byte was fed and the digest is the signed one.

        Raises:
            AuthenticationError: a mismatch, or not every byte of the file was decrypted.
        """
        with self._lock:
            done, busy = self._next, self._busy
        if busy or done != self._size:
            raise AuthenticationError(
                f"{self._where}: not every byte was read, so the model signature "
                "cannot be checked (load the whole file)"
            )
        if not hmac.compare_digest(self._sha.hexdigest(), self._expected):
            raise AuthenticationError(f"{self._where} does not match the model signature")


def public_key_from(public_key: str | os.PathLike[str] | bytes | None) -> Any:
    """*public_key*, or the PEM file ``$SEALSTORE_OMS_PUBLIC_KEY`` names.

    Raises:
        ValueError: neither is given, or not an EC public key.
    """
    if public_key is None:
        public_key = os.environ.get("SEALSTORE_OMS_PUBLIC_KEY") or None
    if public_key is None:
        raise ValueError(
            "verify_signature=True needs the signer's public key (or root certificates): "
            "public_key= (or $SEALSTORE_OMS_PUBLIC_KEY)"
        )
    return load_trust(public_key)


def of_version(manifest: Any, public_key: Any) -> OmsSignature:
    """The verified OMS signature of a store version (its manifest already verified).

    The signed digests must equal the manifest's plaintext SHA-256s (the
    loaders then hash the plaintext beside its decryption against them).

    Raises:
        AuthenticationError: no signature, it does not verify with the key,
            or the store's manifest disagrees with what it signs.
        FormatError: not an OMS v1.0 bundle this release reads.
    """
    where = f"{manifest.name}:{manifest.version}"
    if manifest.oms is None:
        raise AuthenticationError(f"{where} has no model signature")
    sig = verify(manifest.oms.encode(), public_key, where=f"model signature of {where}")
    sig.check_files({e.path: e.sha256 for e in manifest.files}, where=where)
    return sig


def watch(sealed: Any, sig: OmsSignature, path: str, where: str) -> None:
    """Check *path*'s plaintext against *sig* as *sealed* (a ``SealedFile``) decrypts it.

    The digest runs beside the decryption (``SealedFile.observe_plaintext``)
    and its verdict joins the file's pending check: no read returns before
    it passed, and a read that does not cover the whole file fails.

    Raises:
        AuthenticationError: *path* is not covered by the signature.
    """
    if not sig.covers(path):
        raise AuthenticationError(f"{where} is not covered by the model signature")
    digest = PlaintextDigest(sealed.size, sig.digests[path], where)
    prior = sealed.detach_check()

    def both() -> None:
        if prior is not None:
            prior()
        digest.check()

    sealed.observe_plaintext(digest.feed)
    sealed.check_beside(both)


def verify_stream(
    sealed: Any, sig: OmsSignature, path: str, where: str, *, threads: int = 1
) -> None:
    """Check *path*'s whole plaintext against *sig* in one streaming pass over *sealed*.

    For random-access readers (``safe_open``, an fsspec file): they may read
    any part of the file in any order, and must not hand out a byte the
    signature does not cover, so the file is decrypted once, chunk by chunk
    into a small ring (wiped), and hashed, before the first read. It costs
    one decryption and one SHA-256 of the file at open; the reads after it
    decrypt what they read again.

    Raises:
        AuthenticationError: *path* is not covered, a chunk fails, or the
            digest is not the signed one.
    """
    if not sig.covers(path):
        raise AuthenticationError(f"{where} is not covered by the model signature")
    from sealstore.chunks import zero

    sha = hashlib.sha256()
    for chunk in sealed.iter_chunks(threads=threads):
        sha.update(chunk)
        zero(chunk)  # the ring's buffers are reused, then freed: none keeps plaintext
    if not hmac.compare_digest(sha.hexdigest(), sig.digests[path]):
        raise AuthenticationError(f"{where} does not match the model signature")


def check_bytes(data: bytes, sig: OmsSignature, path: str, where: str) -> bytes:
    """*data* (a small file read whole) if its SHA-256 is the signed one.

    Raises:
        AuthenticationError: not covered, or a mismatch.
    """
    if not sig.covers(path):
        raise AuthenticationError(f"{where} is not covered by the model signature")
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), sig.digests[path]):
        raise AuthenticationError(f"{where} does not match the model signature")
    return data
