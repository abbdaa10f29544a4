"""The key-release broker: ``sealstore broker serve --config FILE``.

An ASGI service (FastAPI on uvicorn, TLS only) in the RATS background-check
model, like Trustee's KBS. The protocol is in ``release``; the policy file in
``broker_config``. :class:`Broker` holds the decisions and knows nothing of
HTTP; ``broker_http`` puts it on the wire and runs it.

A release, in order (each step refuses with a code):

1. the caller is authenticated: a bearer token (stored hashed) or a client
   certificate verified against ``client_ca`` (``unauthenticated``);
2. its challenge is taken out of the store -- used once whatever follows --
   and must be unexpired and issued to this identity for this artifact
   (``challenge-unknown``, ``challenge-expired``, ``challenge-mismatch``);
3. the artifact's rule names this identity and this evidence kind
   (``not-permitted``, ``evidence-kind``);
4. the evidence verifies and carries ``binding(nonce, public key)``
   (the verifier's own codes: ``tpm-nonce``, ``snp-measurement``, ...);
5. the slot opens with one of the tenant's keys under the artifact's scoped
   context (``key-unavailable``) -- only now is a key service asked anything;
6. the DEK goes back sealed to the caller's ephemeral key.

The caller gets the code only; the reason, with who asked for what, goes to
the ``sealstore.broker`` logger. Neither carries key material.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.public

from sealstore.enclave import certs, release, snp, tdx, tpm_quote
from sealstore.enclave.broker_config import ArtifactRule, BrokerConfig, Identity
from sealstore.errors import AttestationError, FormatError, SealstoreError
from sealstore.keys import DataKey, KeySlot, unwrap_first
from sealstore.vault.manifest import check_name

__all__ = ["Broker", "Refused"]

log = logging.getLogger("sealstore.broker")


def _valid_x25519(public: bytes) -> bool:
    """32 bytes and not a low-order point (libsodium refuses those in scalar multiplication)."""
    from nacl.bindings import crypto_scalarmult

    if len(public) != nacl.public.PublicKey.SIZE:
        return False
    try:
        crypto_scalarmult(secrets.token_bytes(32), public)
    except (nacl.exceptions.CryptoError, RuntimeError):
        return False
    return True


class Refused(Exception):
    """A refused request: *code* goes to the caller, *reason* only to the log."""

    def __init__(self, code: str, reason: str, status: int = 403) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class _Challenge:
    identity: str
    tenant: str
    artifact: str
    expires: float


class Broker:
    """The release decisions of one broker process (nonces live in its memory).

    Args:
        config: the checked config file.
        clock: seconds since the epoch (tests move time forward).
        snp_roots: the AMD roots to pin (default: AMD's, in ``snp``).
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        clock: Callable[[], float] = time.time,
        snp_roots: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._snp_roots = snp_roots
        self._lock = threading.Lock()
        # Insertion order is expiry order (one TTL for all): purging pops from the front.
        self._challenges: dict[bytes, _Challenge] = {}
        self._outstanding: dict[str, int] = {}
        self._keys_lock = threading.Lock()
        self._by_token = {
            i.token_sha256: i for i in config.identities.values() if i.token_sha256 is not None
        }
        self._providers: dict[str, list[Any]] = {}

    # -- authentication -----------------------------------------------------
    def authenticate(self, bearer: str | None, peer_cert: bytes | None) -> Identity:
        """The identity behind a bearer token and/or a verified client certificate.

        Both may be given only if they name the same identity.
        """
        found: list[Identity] = []
        if bearer is not None:
            ident = self._by_token.get(hashlib.sha256(bearer.encode()).digest())
            if ident is None:
                raise Refused("unauthenticated", "unknown bearer token", 401)
            found.append(ident)
        if peer_cert is not None:
            ident = self._by_certificate(peer_cert)
            if ident is None:
                raise Refused("unauthenticated", "client certificate names no identity", 401)
            found.append(ident)
        if not found:
            raise Refused("unauthenticated", "no bearer token and no client certificate", 401)
        if len(found) == 2 and found[0].name != found[1].name:
            raise Refused(
                "unauthenticated",
                f"token of {found[0].name!r} with the certificate of {found[1].name!r}",
                401,
            )
        return found[0]

    def _by_certificate(self, der: bytes) -> Identity | None:
        try:
            cert = certs.load_certificates(der)[0]
        except AttestationError:
            return None
        spki = bytes.fromhex(certs.spki_sha256(cert))
        cn = certs.common_name(cert)
        for ident in self.config.identities.values():
            if ident.mtls_spki_sha256 is None and ident.mtls_cn is None:
                continue
            # Both given: both must match (a pinned key narrows the name).
            if ident.mtls_spki_sha256 is not None and not hmac.compare_digest(
                ident.mtls_spki_sha256, spki
            ):
                continue
            if ident.mtls_cn is not None and ident.mtls_cn != cn:
                continue
            return ident
        return None

    # -- the protocol -------------------------------------------------------
    def _rule(self, ident: Identity, tenant: Any, artifact: Any) -> ArtifactRule:
        try:
            check_name(tenant, "tenant")
            check_name(artifact, "artifact")
        except ValueError as exc:
            raise Refused("bad-request", str(exc), 400) from None
        pol = self.config.tenants.get(tenant)
        rule = pol.rule(artifact) if pol is not None else None
        # One code whether the artifact is unknown or not this identity's:
        # an authenticated caller learns nothing about other tenants.
        if rule is None or ident.name not in rule.identities:
            raise Refused("not-permitted", f"no rule releases {tenant}/{artifact} to {ident.name}")
        return rule

    def challenge(self, ident: Identity, tenant: Any, artifact: Any) -> dict[str, Any]:
        """Issue a nonce for one release of *tenant*/*artifact* to *ident*."""
        rule = self._rule(ident, tenant, artifact)
        now = self._clock()
        nonce = secrets.token_bytes(release.NONCE_SIZE)
        expires = now + self.config.challenge_ttl
        with self._lock:
            self._purge(now)
            if len(self._challenges) >= self.config.max_challenges:
                raise Refused("busy", "too many challenges outstanding", 503)
            if self._outstanding.get(ident.name, 0) >= self.config.max_challenges_per_identity:
                raise Refused("busy", f"{ident.name} has too many challenges outstanding", 429)
            self._challenges[nonce] = _Challenge(ident.name, tenant, artifact, expires)
            self._outstanding[ident.name] = self._outstanding.get(ident.name, 0) + 1
        out: dict[str, Any] = {
            "nonce": release.b64e(nonce),
            "expires": expires,
            "evidence": list(rule.evidence),
        }
        if rule.tpm is not None:
            out["tpm_pcrs"] = rule.tpm.policy.spec
        return out

    def _purge(self, now: float) -> None:
        """Drop expired challenges (the caller holds the lock)."""
        while self._challenges:
            nonce, ch = next(iter(self._challenges.items()))
            if ch.expires > now:
                return
            self._take(nonce)

    def _take(self, nonce: bytes) -> _Challenge:
        ch = self._challenges.pop(nonce)
        left = self._outstanding[ch.identity] - 1
        if left:
            self._outstanding[ch.identity] = left
        else:
            del self._outstanding[ch.identity]
        return ch

    def release(self, ident: Identity, req: Mapping[str, Any]) -> dict[str, Any]:
        """Verify one release request and return the DEK sealed to its ephemeral key."""
        tenant, artifact = req.get("tenant"), req.get("artifact")
        try:
            nonce = release.b64d(req.get("nonce"), "nonce")
            public = release.b64d(req.get("public_key"), "public_key")
        except FormatError as exc:
            raise Refused("bad-request", str(exc), 400) from None
        with self._lock:
            ch = self._challenges.get(nonce)
            # Another identity's attempt does not use up the challenge; the
            # owner's first attempt does, whatever happens next.
            if ch is not None and ch.identity == ident.name:
                self._take(nonce)
        if ch is None:
            raise Refused("challenge-unknown", "nonce never issued, already used, or purged")
        if ch.identity != ident.name or (ch.tenant, ch.artifact) != (tenant, artifact):
            raise Refused(
                "challenge-mismatch",
                f"challenge issued to {ch.identity} for {ch.tenant}/{ch.artifact}",
            )
        if ch.expires <= self._clock():
            raise Refused("challenge-expired", "the challenge expired")
        rule = self._rule(ident, tenant, artifact)
        if not _valid_x25519(public):
            raise Refused("bad-request", "public_key is not a usable X25519 public key", 400)
        evidence = req.get("evidence")
        kind = evidence.get("kind") if isinstance(evidence, dict) else None
        if kind not in rule.evidence:
            raise Refused("evidence-kind", f"evidence kind {kind!r} is not accepted here")
        try:
            self._verify(ident, rule, kind, evidence, release.binding(nonce, public, kind))
        except AttestationError as exc:
            raise Refused(exc.code, str(exc)) from None
        except (FormatError, ValueError, KeyError, TypeError) as exc:
            raise Refused("evidence-format", f"malformed {kind} evidence: {exc}") from None
        dek = self._unwrap(tenant, artifact, req.get("slot"), req.get("context"))
        try:
            sealed = nacl.public.SealedBox(nacl.public.PublicKey(public)).encrypt(dek.material())
        finally:
            dek.close()
        return {"sealed": release.b64e(sealed)}

    def _verify(
        self, ident: Identity, rule: ArtifactRule, kind: str, ev: Mapping[str, Any], bound: bytes
    ) -> None:
        if kind == "tpm":
            assert rule.tpm is not None and ident.tpm_ak is not None  # the config ensures both
            pcrs = ev["pcrs"]
            if not isinstance(pcrs, dict):
                raise FormatError("pcrs must map PCR -> hex value")
            quote = tpm_quote.TpmQuote(
                attest=release.b64d(ev["attest"], "attest"),
                signature=release.b64d(ev["signature"], "signature"),
                pcrs={int(k): bytes.fromhex(v) for k, v in pcrs.items()},
                bank=rule.tpm.policy.bank,
            )
            tpm_quote.verify_quote(quote, ident.tpm_ak, bound, rule.tpm.policy, rule.tpm.reference)
        elif kind == "snp":
            assert rule.snp is not None
            cert_map = ev["certs"]
            if not isinstance(cert_map, dict):
                raise FormatError("certs must map a name (vcek, ask, ark, ...) to base64 DER")
            got = {k: release.b64d(v, f"certs.{k}") for k, v in cert_map.items()}
            key_cert = got.get("vcek") or got.get("vlek")
            chain = [got[k] for k in ("ask", "asvk", "ark") if k in got]
            if key_cert is None or not chain:
                raise AttestationError("the evidence lacks its VCEK/VLEK chain", "cert-chain")
            parsed = [certs.load_certificates(c)[0] for c in chain]
            report, product = snp.verify_report(
                release.b64d(ev["report"], "report"), key_cert, parsed, roots=self._snp_roots
            )
            rule.snp.check(report, product, bound)
        else:
            assert rule.tdx is not None
            quote = tdx.verify_quote(release.b64d(ev["quote"], "quote"))
            rule.tdx.check(quote, bound)

    def _keys(self, tenant: str) -> list[Any]:
        from sealstore.kms.registry import wrapper_for

        # Its own lock: setting a key up may log in to Vault, and must not
        # hold up challenges meanwhile.
        with self._keys_lock:
            if tenant not in self._providers:
                self._providers[tenant] = [
                    wrapper_for(uri) for uri in self.config.tenants[tenant].keys
                ]
            return self._providers[tenant]

    def _unwrap(self, tenant: str, artifact: str, slot_obj: Any, context: Any) -> DataKey:
        if not isinstance(context, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in context.items()
        ):
            raise Refused("bad-request", "context must map strings to strings", 400)
        try:
            slot = KeySlot.from_json(slot_obj)
            ctx = release.scoped_context(context, tenant, artifact)
        except (FormatError, ValueError) as exc:
            raise Refused("bad-request", str(exc), 400) from None
        # Only the tenant's own keys are tried: the slot's key_id names a key
        # service, and a caller must not be able to point the broker anywhere.
        try:
            keys = self._keys(tenant)
        except (SealstoreError, ValueError, ImportError) as exc:
            raise Refused("backend-unavailable", f"tenant key: {exc}", 502) from None

        def tenant_keys(s: KeySlot) -> list[Any]:
            return [k for k in keys if getattr(k, "can_unwrap", lambda _: True)(s)]

        try:
            # No header to commit to here: the caller's file checks the DEK.
            return unwrap_first([slot], tenant_keys, ctx, accept=lambda _dek: None)
        except SealstoreError as exc:
            raise Refused("key-unavailable", str(exc)) from None
