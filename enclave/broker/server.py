"""The key-release broker: ``sealstore broker serve --config FILE``.

An ASGI service (FastAPI on uvicorn, TLS only) in the RATS background-check
model, like Trustee's KBS. The protocol is in ``release``; the policy file in
``config``. :class:`Broker` holds the decisions and knows nothing of
HTTP; ``http`` puts it on the wire and runs it.

A release, in order (each step refuses with a code):

1. the caller is authenticated: a bearer token (stored hashed) or a client
   certificate verified against ``client_ca`` (``unauthenticated``; a token
   past its ``not_after``: ``token-expired``);
2. its challenge is taken out of the store -- used once whatever follows --
   and must be unexpired and issued to this identity for this artifact
   (``challenge-unknown``, ``challenge-expired``, ``challenge-mismatch``);
3. the artifact's rule names this identity and this evidence kind
   (``not-permitted``, ``evidence-kind``);
4. the evidence verifies and carries ``binding(nonce, public key)``
   (the verifier's own codes: ``tpm-nonce``, ``snp-measurement``, ...);
   for a kind joined with ``+nvidia-gpu``, then every GPU's report too
   (``nvgpu-nonce``, ``nvgpu-measurement``, ...);
5. the slot opens with one of the tenant's keys under the artifact's scoped
   context (``key-unavailable``) -- only now is a key service asked anything;
6. the DEK goes back sealed (HPKE) to the caller's ephemeral key and this challenge.

Before step 2 (and again before step 5) the caller is checked against the
incident-response state: a lockdown of its tenant or of all tenants
(``locked-down``), a lockout of the identity after repeated attestation
failures (``locked-out``), a throttle after a release rate far above its
usual one (``throttled``), and its role in the tenant (``not-permitted``).
That state -- with the challenges -- lives in ``state``: in this
process for one replica, in Redis for several. It is a cache: the lockdowns,
their lifts and the lockouts are records in the audit log, and a state that
lost them (Redis came back empty, or this process just started) gets them
back from there before any release is decided (``state-reset`` alert). A
state that cannot be reached refuses everything (``state-unavailable``, 503,
audited and alerted), as does one that was reset while the audit log cannot
be read: if the broker cannot tell, it refuses.

Every decision on a release, granted or denied, is a record in the audit log
(``sealstore.audit``) and a count in the metrics. A granted key leaves only
after its record is durable: no audit, no key.

The caller gets the code only; the reason, with who asked for what, goes to
the ``sealstore.broker`` logger and the audit log. None carries key material.

The config (identities, tokens, rules, reference values) can be replaced while
the broker runs (``reload``). It is swapped as one object, and each
request is pinned to the one in force when it began (a context variable, which
follows the request into its worker thread): no decision mixes two configs.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nacl.exceptions
import nacl.public
from cryptography import x509

from sealstore.audit import AuditKey, AuditLog, read_records, stream_name, verify_log
from sealstore.enclave.attestation import certs, nvgpu, snp, tdx, tpm_quote
from sealstore.enclave.broker import release
from sealstore.enclave.broker.config import ArtifactRule, BrokerConfig, Identity, Token
from sealstore.enclave.broker.state import (
    State,
    StateFull,
    StateReset,
    StateUnavailable,
    open_state,
)
from sealstore.enclave.broker.watch import Alerts, broker_metrics
from sealstore.errors import AttestationError, FormatError, SealstoreError
from sealstore.keys import DataKey, KeySlot, unwrap_first
from sealstore.vault.manifest import check_name

__all__ = ["Broker", "BrokerRefusal"]

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


class BrokerRefusal(Exception):
    """A refused request: *code* goes to the caller, *reason* only to the log.

    The broker's own (``http`` answers it ``{"error": code}`` with
    *status*); unrelated to :class:`sealstore.errors.Refused`, the store's
    policy refusal.
    """

    def __init__(self, code: str, reason: str, status: int = 403) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.status = status


# Verifier codes that mean the evidence was authentic but measured something
# else: its measurements are the machine's, and a change is worth an alert.
_REFERENCE_CODES = frozenset(
    {
        "tpm-pcr-mismatch",
        "snp-measurement",
        "snp-host-data",
        "snp-tcb-too-low",
        "snp-debug",
        "snp-vmpl",
        "tdx-mrtd",
        "tdx-rtmr",
        "tdx-mrconfigid",
        "tdx-debug",
        "nvgpu-measurement",
        "nvgpu-driver-version",
        "nvgpu-vbios-version",
        "nvgpu-mode",
    }
)
LOCAL_PEERS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class _Policy:
    """One config in force, with what is derived from it: replaced whole by a reload."""

    broker: Broker
    config: BrokerConfig
    by_token: dict[bytes, tuple[Identity, Token]] = field(repr=False)

    @classmethod
    def of(cls, broker: Broker, config: BrokerConfig) -> _Policy:
        index = {t.sha256: (i, t) for i in config.identities.values() for t in i.tokens}
        return cls(broker, config, index)


# The policy a request is pinned to (see the module docstring).
_PINNED: ContextVar[_Policy | None] = ContextVar("sealstore_broker_policy", default=None)
_F = TypeVar("_F", bound=Callable[..., Any])


def _pinned(method: _F) -> _F:
    """Run *method* under one policy: the caller's pinned one, else the one in force now."""

    @functools.wraps(method)
    def wrapper(self: Broker, *args: Any, **kwargs: Any) -> Any:
        with self.pinned():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class Broker:
    """The release decisions of one broker replica.

    Args:
        config: the checked config file.
        clock: seconds since the epoch (tests move time forward).
        snp_roots: the AMD roots to pin (default: AMD's, in ``snp``).
        state: the shared state (default: from the config; in-process memory
            unless ``state.url`` names a Redis server).
        audit: the audit log (default: from the config).
        nonces: makes each challenge's nonce (default: 32 random bytes). A test
            seam only: recorded GPU reports carry a fixed nonce, and a test that
            runs one through the whole protocol must issue that nonce.
        gpu_root: the GPU attestation trust anchor (default: NVIDIA's, pinned).
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        clock: Callable[[], float] = time.time,
        snp_roots: dict[str, str] | None = None,
        state: State | None = None,
        audit: AuditLog | None = None,
        nonces: Callable[[], bytes] | None = None,
        gpu_root: x509.Certificate | None = None,
    ) -> None:
        self._policy = _Policy.of(self, config)
        self._clock = clock
        self._snp_roots = snp_roots
        self._nonces = nonces or (lambda: secrets.token_bytes(release.NONCE_SIZE))
        self._gpu_root = gpu_root
        self.state = state or open_state(config.state_url, prefix=config.state_prefix, clock=clock)
        self.audit = audit or _open_audit(config)
        self.metrics = broker_metrics()
        self.alerts = Alerts(
            config.webhook, self.metrics, source=self.audit.stream, prefix="sealstore_broker"
        )
        self.metrics.gauge(
            "sealstore_broker_lockouts",
            "Identities locked out now.",
            lambda: len(self.state.lockouts()),
        )
        self.metrics.gauge(
            "sealstore_broker_lockdowns",
            "Lockdowns in force (* or a tenant).",
            lambda: len(self.state.lockdowns()),
        )
        self.metrics.gauge(
            "sealstore_broker_config_serial",
            "The signed bundle's serial in force (0: unsigned).",
            lambda: self._policy.config.bundle_serial or 0,
        )
        self.metrics.gauge(
            "sealstore_broker_token_next_expiry",
            "When the next bearer token expires (seconds since the epoch; 0: none will).",
            self._next_expiry,
        )
        self._keys_lock = threading.Lock()
        # tenant -> (its key URIs, their wrappers): a reload that changes the URIs
        # makes new wrappers; one that does not keeps the logged-in ones.
        self._providers: dict[str, tuple[tuple[str, ...], list[Any]]] = {}
        self._reconcile_lock = threading.Lock()
        self._flag_lock = threading.Lock()
        self._state_down = False  # alert once per outage, not once per refusal
        self._epoch: str | None = None  # the state's epoch as last seen here
        # At start: this process's memory is empty, and a Redis may have come back
        # empty while no replica ran. Failing here is not fatal: every decision
        # checks the epoch and tries again (refusing until it succeeds).
        try:
            with self._state_guard():
                self._ensure_epoch()
        except BrokerRefusal as exc:
            log.error("state not reconciled at start: %s", exc.reason)

    # -- the config in force --------------------------------------------------

    @property
    def config(self) -> BrokerConfig:
        """The config of the request being decided (pinned at its start), else the one in force."""
        return self._policy_now().config

    def _policy_now(self) -> _Policy:
        pinned = _PINNED.get()
        return pinned if pinned is not None and pinned.broker is self else self._policy

    @contextmanager
    def pinned(self) -> Iterator[BrokerConfig]:
        """Decide everything inside under one config (the one in force on entry)."""
        current = _PINNED.get()
        if current is not None and current.broker is self:
            yield current.config
            return
        policy = self._policy  # one read: the swap in replace_config is one assignment
        token = _PINNED.set(policy)
        try:
            yield policy.config
        finally:
            _PINNED.reset(token)

    def replace_config(self, config: BrokerConfig) -> None:
        """Put *config* in force for every request that starts from now on.

        The caller (``reload``) has checked it, and that what needs a
        restart is unchanged; requests already under way finish under the old one.
        """
        self._policy = _Policy.of(self, config)

    def _next_expiry(self) -> float:
        now = self._clock()
        ends = [
            t.not_after
            for _, t in self._policy.by_token.values()
            if t.not_after is not None and t.not_after > now
        ]
        return min(ends, default=0.0)

    # -- the shared state ---------------------------------------------------

    @contextmanager
    def _state_guard(self) -> Iterator[None]:
        """Turn a state outage into a refusal (503 ``state-unavailable``), alerting once."""
        try:
            yield
        except StateUnavailable as exc:
            self._outage(str(exc))
            raise BrokerRefusal("state-unavailable", str(exc), 503) from None

    def _outage(self, reason: str) -> None:
        """Alert ``state-unavailable``, once until the state answers again."""
        with self._flag_lock:
            first, self._state_down = not self._state_down, True
        if first:
            self._alert("state-unavailable", reason=reason)

    def _ensure_epoch(self) -> None:
        epoch = self.state.epoch()
        if epoch is None:
            self._reconcile()
        else:
            self._epoch = epoch

    def _reconcile(self) -> None:
        """Put the lockdowns and lockouts the audit log records back into a reset state.

        Each epoch is recorded before it is set. A replica that saw an epoch
        requires the log it reads to hold that epoch's record: a log that does
        not (unreadable, moved, cut short) cannot tell a lockdown from none.

        Raises:
            BrokerRefusal: ``state-unavailable`` if the audit log cannot be read or
                lacks the record of the epoch last seen (fail closed).
            StateUnavailable: the state cannot be reached.
        """
        with self._reconcile_lock:  # one reader of the log per process
            seen = self.state.epoch()
            if seen is not None:
                self._epoch = seen  # another replica (or thread) has just done it
                return
            epoch = f"{int(self._clock())}-{secrets.token_hex(8)}"
            try:
                downs, outs, epochs = self._recorded()
                if self._epoch is not None and self._epoch not in epochs:
                    raise ValueError(f"it lacks the record of epoch {self._epoch}")
                self._record(
                    "state.epoch", "-", None, None, "ok", None, None, required=True, epoch=epoch
                )
            except Exception as exc:
                why = (
                    f"the shared state was reset and the audit log, which records the "
                    f"lockdowns, cannot be read or written: {exc}"
                )
                self._outage(why)
                raise BrokerRefusal("state-unavailable", why, 503) from None
            if not self.state.reassert(downs, outs, epoch):
                self._epoch = self.state.epoch()
                return
            self._epoch = epoch
        log.warning(
            "state %s: epoch %s; re-asserted %d lockdown(s), %d lockout(s) from the audit log",
            self.config.state_url or "in-process",
            epoch,
            len(downs),
            len(outs),
        )
        if downs or outs:
            self._alert(
                "state-reset",
                reason=(
                    "the shared state had lost its lockdowns and lockouts; re-asserted from the "
                    f"audit log: lockdowns {sorted(downs)}, lockouts {sorted(outs)}"
                ),
            )

    def _recorded(self) -> tuple[dict[str, str], dict[str, tuple[float, str]], set[str]]:
        """The lockdowns (scope -> reason) and unexpired lockouts (identity -> (end,
        reason)) in force by the audit log's lockdown, lift and lockout records; and
        the state epochs it records."""
        # Only a log that verifies is a record: a line edited, dropped or
        # slipped in (a forged lift) would otherwise undo a lockdown here.
        bad = [str(p) for rep in verify_log(self.audit.storage) for p in rep.problems]
        if bad:
            raise ValueError(f"the audit log does not verify: {bad[0]}")
        downs: dict[str, str] = {}
        outs: dict[str, tuple[float, str]] = {}
        epochs: set[str] = set()
        for r in read_records(self.audit.storage):
            action, d = r.get("action"), r.get("detail")
            d = d if isinstance(d, dict) else {}
            if action == "state.epoch" and isinstance(d.get("epoch"), str):
                epochs.add(d["epoch"])
            elif action == "lockdown" and isinstance(d.get("scope"), str):
                downs[d["scope"]] = str(r.get("reason") or "lockdown")[:300]
            elif action == "lockdown.lift" and isinstance(d.get("scope"), str):
                downs.pop(d["scope"], None)
            elif action == "alert.lockout" and isinstance(d.get("until"), int | float):
                outs[str(r.get("who"))] = (float(d["until"]), str(r.get("reason") or ""))
            elif action == "lockout.lift" and isinstance(d.get("identity"), str):
                outs.pop(d["identity"], None)
        now = self._clock()
        return downs, {i: v for i, v in outs.items() if v[0] > now}, epochs

    # -- authentication -----------------------------------------------------
    @_pinned
    def authenticate(self, bearer: str | None, peer_cert: bytes | None) -> Identity:
        """The identity behind a bearer token and/or a verified client certificate.

        Both may be given only if they name the same identity.

        Raises:
            BrokerRefusal: ``unauthenticated`` (401); ``token-expired`` (401, audited):
                a known token past its ``not_after``.
        """
        found: list[Identity] = []
        if bearer is not None:
            hit = self._policy_now().by_token.get(hashlib.sha256(bearer.encode()).digest())
            if hit is None:
                raise BrokerRefusal("unauthenticated", "unknown bearer token", 401)
            ident, token = hit
            if token.not_after is not None and self._clock() >= token.not_after:
                self._token_expired(ident, token)
            found.append(ident)
        if peer_cert is not None:
            ident = self._by_certificate(peer_cert)
            if ident is None:
                raise BrokerRefusal("unauthenticated", "client certificate names no identity", 401)
            found.append(ident)
        if not found:
            raise BrokerRefusal("unauthenticated", "no bearer token and no client certificate", 401)
        if len(found) == 2 and found[0].name != found[1].name:
            raise BrokerRefusal(
                "unauthenticated",
                f"token of {found[0].name!r} with the certificate of {found[1].name!r}",
                401,
            )
        return found[0]

    def _token_expired(self, ident: Identity, token: Token) -> None:
        assert token.not_after is not None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(token.not_after))
        reason = f"a bearer token of {ident.name} expired at {when}"
        self.metrics.inc("sealstore_broker_token_refusals_total", {"code": "token-expired"})
        self._record(
            "authenticate",
            ident.name,
            None,
            None,
            "denied",
            "token-expired",
            reason,
            not_after=when,
        )
        raise BrokerRefusal("token-expired", reason, 401)

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
            raise BrokerRefusal("bad-request", str(exc), 400) from None
        pol = self.config.tenants.get(tenant)
        rule = pol.rule(artifact) if pol is not None else None
        # One code whether the artifact is unknown or not this identity's:
        # an authenticated caller learns nothing about other tenants.
        if rule is None or ident.name not in rule.identities:
            why = f"no rule releases {tenant}/{artifact} to {ident.name}"
            raise BrokerRefusal("not-permitted", why)
        return rule

    def _gate(self, ident: Identity, tenant: Any) -> None:
        """Refuse an identity that incident response has stopped, or with no role here."""
        if not isinstance(tenant, str):
            raise BrokerRefusal("bad-request", "tenant must be a string", 400)
        stop = self._stopped(ident, tenant)
        if stop is not None:
            raise stop
        if not ident.may("reader", tenant):
            raise BrokerRefusal("not-permitted", f"{ident.name} has no role in tenant {tenant!r}")

    def _stopped(self, ident: Identity, tenant: str) -> BrokerRefusal | None:
        """What incident response says of *ident* in *tenant* (one state round trip):
        a lockdown of the tenant or of all, a lockout, a throttle, or nothing."""
        try:
            downs, locked, throttled = self.state.standing(ident.name, require_epoch=True)
        except StateReset:
            self._reconcile()
            downs, locked, throttled = self.state.standing(ident.name, require_epoch=True)
        if self._state_down:
            self._state_down = False
            log.warning("state %s answers again", self.config.state_url or "in-process")
        scope = "*" if "*" in downs else tenant if tenant in downs else None
        if scope is not None:
            return BrokerRefusal("locked-down", f"lockdown of {scope}: {downs[scope]}")
        if locked is not None:
            return BrokerRefusal("locked-out", f"{ident.name} is locked out: {locked}")
        if throttled is not None:
            return BrokerRefusal("throttled", f"{ident.name} is throttled: {throttled}", 429)
        return None

    @_pinned
    def challenge(self, ident: Identity, tenant: Any, artifact: Any) -> dict[str, Any]:
        """Issue a nonce for one release of *tenant*/*artifact* to *ident*."""
        try:
            with self._state_guard():
                out = self._challenge(ident, tenant, artifact)
        except BrokerRefusal as exc:
            self.metrics.inc(
                "sealstore_broker_challenges_total", {"result": "denied", "code": exc.code}
            )
            self._record("challenge", ident.name, tenant, artifact, "denied", exc.code, exc.reason)
            raise
        self.metrics.inc("sealstore_broker_challenges_total", {"result": "issued", "code": ""})
        return out

    def _challenge(self, ident: Identity, tenant: Any, artifact: Any) -> dict[str, Any]:
        self._gate(ident, tenant)
        rule = self._rule(ident, tenant, artifact)
        nonce = self._nonces()
        if len(nonce) != release.NONCE_SIZE:
            raise ValueError("a challenge nonce is 32 bytes")
        expires = self._clock() + self.config.challenge_ttl
        try:
            self.state.add_challenge(
                nonce,
                ident.name,
                {"tenant": tenant, "artifact": artifact},
                expires,
                max_total=self.config.max_challenges,
                max_per_identity=self.config.max_challenges_per_identity,
            )
        except StateFull as exc:
            if exc.scope == "total":
                raise BrokerRefusal("busy", "too many challenges outstanding", 503) from None
            why = f"{ident.name} has too many challenges outstanding"
            raise BrokerRefusal("busy", why, 429) from None
        out: dict[str, Any] = {
            "nonce": release.b64e(nonce),
            "expires": expires,
            "evidence": list(rule.evidence),
        }
        if rule.tpm is not None:
            out["tpm_pcrs"] = rule.tpm.policy.spec
        return out

    @_pinned
    def release(self, ident: Identity, req: Mapping[str, Any]) -> dict[str, Any]:
        """Verify one release request and return the DEK sealed to its ephemeral key.

        Raises:
            BrokerRefusal: with the code the caller gets; the decision is audited
                and fed to the detectors either way.
        """
        t0 = time.monotonic()
        tenant, artifact = req.get("tenant"), req.get("artifact")
        evidence = req.get("evidence")
        kind = evidence.get("kind") if isinstance(evidence, dict) else None
        try:
            with self._state_guard():
                out = self._release(ident, req, tenant, artifact, kind)
            try:
                self._record(
                    "release", ident.name, tenant, artifact, "granted", None, None, kind=kind
                )
            except Exception as exc:
                # Fail closed: a release nobody can account for is not made.
                self.metrics.inc("sealstore_broker_audit_failures_total")
                raise BrokerRefusal("audit-unavailable", f"audit log: {exc}", 503) from None
        except BrokerRefusal as exc:
            self.metrics.inc(
                "sealstore_broker_releases_total", {"result": "denied", "code": exc.code}
            )
            self.metrics.observe(time.monotonic() - t0)
            if exc.code != "audit-unavailable":
                self._record(
                    "release",
                    ident.name,
                    tenant,
                    artifact,
                    "denied",
                    exc.code,
                    exc.reason,
                    kind=kind,
                )
            raise
        self.metrics.inc("sealstore_broker_releases_total", {"result": "granted", "code": ""})
        self.metrics.observe(time.monotonic() - t0)
        return out

    def _release(
        self, ident: Identity, req: Mapping[str, Any], tenant: Any, artifact: Any, kind: Any
    ) -> dict[str, Any]:
        try:
            nonce = release.b64d(req.get("nonce"), "nonce")
            public = release.b64d(req.get("public_key"), "public_key")
        except FormatError as exc:
            raise BrokerRefusal("bad-request", str(exc), 400) from None
        # Another identity's attempt does not use up the challenge; the
        # owner's first attempt does, whatever happens next.
        ch = self.state.take_challenge(nonce, ident.name)
        if ch is None:
            raise BrokerRefusal("challenge-unknown", "nonce never issued, already used, or expired")
        if ch["identity"] != ident.name or (ch["tenant"], ch["artifact"]) != (tenant, artifact):
            raise BrokerRefusal(
                "challenge-mismatch",
                f"challenge issued to {ch['identity']} for {ch['tenant']}/{ch['artifact']}",
            )
        if ch["expires"] <= self._clock():
            raise BrokerRefusal("challenge-expired", "the challenge expired")
        # Checked again: a lockdown declared since the challenge stops this release.
        self._gate(ident, tenant)
        rule = self._rule(ident, tenant, artifact)
        if not _valid_x25519(public):
            raise BrokerRefusal("bad-request", "public_key is not a usable X25519 public key", 400)
        evidence = req.get("evidence")
        if kind not in rule.evidence:
            self._attestation_failed(ident, "evidence-kind")
            raise BrokerRefusal("evidence-kind", f"evidence kind {kind!r} is not accepted here")
        seen: list[tuple[str, str]] = []
        cpu, gpu = release.parse_kind(kind)
        try:
            self._verify(ident, rule, cpu, evidence, release.binding(nonce, public, cpu), seen)
            if gpu:
                bound = release.binding(nonce, public, release.GPU_KIND)
                self._verify_gpus(rule, evidence, bound)
        except AttestationError as exc:
            if exc.code.startswith(("tdx-collateral-", "snp-crl-")):
                # The broker's own copy of Intel's collateral or AMD's CRL is
                # missing, stale or bad (a PCCS or KDS outage): the evidence was
                # genuine up to its chain, so not the caller's failure, and no
                # lockout for it.
                raise BrokerRefusal(exc.code, str(exc), 503) from None
            if exc.code in _REFERENCE_CODES:
                self._evidence_seen(ident, kind, seen)
            self._attestation_failed(ident, exc.code)
            raise BrokerRefusal(exc.code, str(exc)) from None
        except (FormatError, ValueError, KeyError, TypeError) as exc:
            self._attestation_failed(ident, "evidence-format")
            raise BrokerRefusal("evidence-format", f"malformed {kind} evidence: {exc}") from None
        self._evidence_seen(ident, kind, seen)
        self._rate(ident, tenant)
        dek = self._unwrap(tenant, artifact, req.get("slot"), req.get("context"))
        try:
            # HPKE bound to this challenge: the answer opens for no other one.
            return release.seal_answer(
                dek.material(), public, nonce=nonce, tenant=tenant, artifact=artifact
            )
        finally:
            dek.close()

    # -- incident response ----------------------------------------------------

    def _attestation_failed(self, ident: Identity, code: str) -> None:
        d = self.config.detectors
        count = self.state.add_failure(ident.name, self._clock(), d.failure_window)
        if count < d.failures:
            return
        reason = f"{count} attestation failures in {d.failure_window:g} s (last: {code})"
        if self.state.lock_out(ident.name, d.lockout, reason):
            # The end goes into the record: a reset state gets the lockout back from it.
            self._alert(
                "lockout",
                identity=ident.name,
                reason=reason,
                seconds=d.lockout,
                until=self._clock() + d.lockout,
            )

    def _rate(self, ident: Identity, tenant: str) -> None:
        d = self.config.detectors
        now, usual = self.state.count_release(
            ident.name, self._clock(), d.rate_bucket, d.rate_history
        )
        limit = max(d.rate_factor * usual, d.rate_floor)
        if now <= limit:
            return
        reason = f"{now} releases in {d.rate_bucket:g} s, usual {usual:.1f} (limit {limit:.0f})"
        if self.state.throttle(ident.name, d.throttle, reason):
            self._alert(
                "throttle", identity=ident.name, tenant=tenant, reason=reason, seconds=d.throttle
            )
        raise BrokerRefusal("throttled", f"{ident.name}: {reason}", 429)

    def _evidence_seen(self, ident: Identity, kind: str, seen: list[tuple[str, str]]) -> None:
        if not seen or not self.config.detectors.evidence_change:
            return
        machine, fp = seen[0]
        before = self.state.swap_evidence(machine, fp)
        if before is not None and before != fp:
            self._alert(
                "evidence-changed",
                identity=ident.name,
                machine=machine,
                evidence=kind,
                before=before,
                now=fp,
            )

    def _alert(self, kind: str, **fields: Any) -> None:
        self.alerts.fire(kind, **fields)
        try:
            self._record(
                f"alert.{kind}",
                fields.get("identity", "-"),
                fields.get("tenant"),
                None,
                "ok",
                kind,
                fields.get("reason"),
                **{
                    k: v
                    for k, v in fields.items()
                    if k in ("machine", "before", "now", "seconds", "until")
                },
            )
        except Exception:
            self.metrics.inc("sealstore_broker_audit_failures_total")
            log.exception("alert %s not written to the audit log", kind)

    def _record(
        self,
        action: str,
        who: str,
        tenant: Any,
        artifact: Any,
        decision: str,
        code: str | None,
        reason: str | None,
        required: bool = False,
        **detail: Any,
    ) -> None:
        """One audit record (denials best effort: a refusal stands without it).

        Raises:
            BackendError, AuthenticationError: a grant's or a *required* record
                was not written.
        """
        kept = {k: v for k, v in detail.items() if v is not None}
        fields = dict(
            who=who,
            action=action,
            decision=decision,
            code=code,
            reason=reason,
            tenant=tenant if isinstance(tenant, str) else None,
            artifact=artifact if isinstance(artifact, str) else None,
            detail=kept or None,
        )
        if decision == "granted" or required:
            self.audit.append(**fields)
            return
        try:
            self.audit.append(**fields)
        except Exception:
            self.metrics.inc("sealstore_broker_audit_failures_total")
            log.exception("audit record of a %s %s not written", decision, action)

    @_pinned
    def standing(self, ident: Identity, tenant: Any) -> dict[str, Any]:
        """Whether incident response has stopped *ident* in *tenant*: for a process that
        holds a released key and keeps serving (the inference guard polls it).

        Lockdowns and lockouts are answered (200, not a refusal): the caller stops
        serving. A throttle limits new releases only. Not audited (polled every
        few seconds); a caller with no role in *tenant* is refused.
        """
        if not isinstance(tenant, str):
            raise BrokerRefusal("bad-request", "tenant must be a string", 400)
        try:
            check_name(tenant, "tenant")
        except ValueError as exc:
            raise BrokerRefusal("bad-request", str(exc), 400) from None
        if not ident.may("reader", tenant):
            raise BrokerRefusal("not-permitted", f"{ident.name} has no role in tenant {tenant!r}")
        with self._state_guard():
            stop = self._stopped(ident, tenant)
        if stop is None or stop.code == "throttled":
            return {"standing": "ok", "reason": ""}
        return {"standing": stop.code, "reason": stop.reason}

    # -- administration ---------------------------------------------------------

    def _admin(self, ident: Identity, scope: str) -> None:
        if scope != "*" and scope not in self.config.tenants:
            raise BrokerRefusal("bad-request", f"no tenant {scope!r} in this broker's config", 400)
        if not ident.may("admin", scope):
            where = "every tenant" if scope == "*" else f"tenant {scope}"
            raise BrokerRefusal("not-permitted", f"{ident.name} is not an admin of {where}")

    @_pinned
    def lockdown(self, ident: Identity, scope: str, reason: str = "") -> dict[str, Any]:
        """Refuse every release in tenant *scope* (``"*"``: all tenants) until lifted.

        In force in the state first (at once, on every replica), then recorded
        in the audit log, which is what brings it back after a reset of the state.

        Raises:
            BrokerRefusal: not an admin of *scope*; ``state-unavailable``; or
                ``audit-unavailable`` (503): in force, but not recorded.
        """
        self._admin(ident, scope)
        why = reason or f"lockdown by {ident.name}"
        # No reconciling first: the kill switch works even on a state being reset.
        with self._state_guard():
            self.state.set_lockdown(scope, why[:300])
        try:
            self._record(
                "lockdown",
                ident.name,
                None if scope == "*" else scope,
                None,
                "ok",
                None,
                why,
                required=True,
                scope=scope,
            )
        except Exception as exc:
            self.metrics.inc("sealstore_broker_audit_failures_total")
            raise BrokerRefusal(
                "audit-unavailable",
                f"lockdown of {scope} is in force but not "
                f"recorded (a reset of the state would lose it): {exc}",
                503,
            ) from None
        self._alert("lockdown", identity=ident.name, scope=scope, reason=why)
        return self.status(ident, check=False)

    @_pinned
    def lift(
        self, ident: Identity, scope: str | None = None, *, identity: str | None = None
    ) -> dict[str, Any]:
        """End a lockdown of *scope*, or an identity's lockout and throttle.

        Recorded first: a lift that the audit log does not hold is not made, or
        a reset of the state would bring back what it ended, or keep ended
        what it should bring back.

        Raises:
            BrokerRefusal: not an admin; ``state-unavailable``; ``audit-unavailable``
                (503, nothing lifted).
        """
        self._admin(ident, "*" if identity is not None else scope or "*")
        try:
            with self._state_guard():
                self._ensure_epoch()
                if identity is not None:
                    was = self.state.lockout(identity) or self.state.throttled(identity)
                else:
                    was = scope in self.state.lockdowns()
            if identity is not None:
                self._record(
                    "lockout.lift",
                    ident.name,
                    None,
                    None,
                    "ok",
                    None,
                    None,
                    required=True,
                    identity=identity,
                    lifted=bool(was),
                )
            else:
                self._record(
                    "lockdown.lift",
                    ident.name,
                    None if scope == "*" else scope,
                    None,
                    "ok",
                    None,
                    None,
                    required=True,
                    scope=scope,
                    lifted=bool(was),
                )
        except BrokerRefusal:
            raise
        except Exception as exc:
            self.metrics.inc("sealstore_broker_audit_failures_total")
            raise BrokerRefusal(
                "audit-unavailable", f"lift not recorded, so not made: {exc}", 503
            ) from None
        with self._state_guard():
            if identity is not None:
                lifted = self.state.lift_lockout(identity) | self.state.lift_throttle(identity)
            else:
                assert scope is not None
                lifted = self.state.lift_lockdown(scope)
        return {**self.status(ident, check=False), "lifted": lifted}

    @_pinned
    def status(self, ident: Identity, *, check: bool = True) -> dict[str, Any]:
        """Lockdowns and lockouts in force (admins of every tenant only)."""
        with self._state_guard():
            if check:  # an operator's question: what the record says, reconciled first
                self._admin(ident, "*")
                self._ensure_epoch()
            return {"lockdowns": self.state.lockdowns(), "lockouts": self.state.lockouts()}

    def _verify(
        self,
        ident: Identity,
        rule: ArtifactRule,
        kind: str,
        ev: Mapping[str, Any],
        bound: bytes,
        seen: list[tuple[str, str]],
    ) -> None:
        """Verify *ev*; append (machine, fingerprint of its measurements) to *seen* once
        the evidence is known to be authentic (before its values are judged)."""
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
            # The AK is registered to the identity: the identity is the machine. The
            # PCRs are authentic if the quote verifies or fails only on their values.
            seen.append(
                (f"tpm:{ident.name}", _fingerprint(*(quote.pcrs[k] for k in sorted(quote.pcrs))))
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
                release.b64d(ev["report"], "report"),
                key_cert,
                parsed,
                roots=self._snp_roots,
                revocation=rule.snp.revocation,
            )
            seen.append(
                (
                    f"snp:{report.chip_id.hex()[:32]}",
                    _fingerprint(report.measurement, report.host_data),
                )
            )
            rule.snp.check(report, product, bound)
        else:
            assert rule.tdx is not None
            raw = release.b64d(ev["quote"], "quote")
            quote = tdx.verify_quote(raw, collateral=rule.tdx.collateral, policy=rule.tdx.policy)
            seen.append((f"tdx:{ident.name}", _fingerprint(quote.mrtd, *quote.rtmrs)))
            rule.tdx.check(quote, bound)

    def _verify_gpus(self, rule: ArtifactRule, ev: Mapping[str, Any], bound: bytes) -> None:
        """Verify every GPU's report in *ev* (after its CPU evidence): each must pass,
        and there must be as many as the rule wants."""
        ref = rule.nvgpu
        assert ref is not None  # the config ensures it for a kind joined with +nvidia-gpu
        gpus = ev[release.GPU_KIND]
        if not isinstance(gpus, list) or not gpus or len(gpus) > 64:
            raise FormatError(f"{release.GPU_KIND} must list 1 to 64 GPU reports")
        if len(gpus) < ref.gpus:
            raise AttestationError(
                f"{len(gpus)} GPU report(s); the policy wants {ref.gpus}", "nvgpu-count"
            )
        devices: set[str] = set()
        for i, item in enumerate(gpus):
            if not isinstance(item, dict):
                raise FormatError(f"{release.GPU_KIND}[{i}] must be an object")
            chain = release.b64d(item["certs"], f"{release.GPU_KIND}[{i}].certs")
            # One report per GPU: the same device twice does not make two. Counted
            # by the device identity certificate (the chain's second, "GSP BROM":
            # its key is fused per chip), not the leaf (the attestation key's
            # "GSP FMC LF", derived anew with the firmware: one GPU, two leaves).
            chain_certs = certs.load_certificates(chain)
            device = certs.spki_sha256(chain_certs[1] if len(chain_certs) > 1 else chain_certs[0])
            if device in devices:
                raise AttestationError(
                    f"{release.GPU_KIND}[{i}] is a GPU already counted", "nvgpu-count"
                )
            devices.add(device)
            report = nvgpu.verify_report(
                release.b64d(item["report"], f"{release.GPU_KIND}[{i}].report"),
                chain,
                root=self._gpu_root,
            )
            ref.check(report, bound)

    def _keys(self, tenant: str) -> list[Any]:
        from sealstore.kms.registry import wrapper_for

        # Its own lock: setting a key up may log in to Vault, and must not
        # hold up challenges meanwhile.
        uris = self.config.tenants[tenant].keys
        with self._keys_lock:
            held = self._providers.get(tenant)
            if held is None or held[0] != uris:
                held = self._providers[tenant] = (uris, [wrapper_for(uri) for uri in uris])
            return held[1]

    def _unwrap(self, tenant: str, artifact: str, slot_obj: Any, context: Any) -> DataKey:
        if not isinstance(context, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in context.items()
        ):
            raise BrokerRefusal("bad-request", "context must map strings to strings", 400)
        try:
            slot = KeySlot.from_json(slot_obj)
            ctx = release.scoped_context(context, tenant, artifact)
        except (FormatError, ValueError) as exc:
            raise BrokerRefusal("bad-request", str(exc), 400) from None
        # Only the tenant's own keys are tried: the slot's key_id names a key
        # service, and a caller must not be able to point the broker anywhere.
        try:
            keys = self._keys(tenant)
        except (SealstoreError, ValueError, ImportError) as exc:
            raise BrokerRefusal("backend-unavailable", f"tenant key: {exc}", 502) from None

        def tenant_keys(s: KeySlot) -> list[Any]:
            return [k for k in keys if getattr(k, "can_unwrap", lambda _: True)(s)]

        try:
            # No header to commit to here: the caller's file checks the DEK.
            return unwrap_first([slot], tenant_keys, ctx, accept=lambda _dek: None)
        except SealstoreError as exc:
            raise BrokerRefusal("key-unavailable", str(exc)) from None


def _fingerprint(*values: bytes) -> str:
    """A short hash of measurements (what alerts and the state keep, not the values)."""
    h = hashlib.sha256()
    for v in values:
        h.update(len(v).to_bytes(4, "big") + v)
    return h.hexdigest()[:32]


def _open_audit(config: BrokerConfig) -> AuditLog:
    from sealstore.vault.storage import open_storage

    assert config.audit_key is not None
    stream = config.audit_stream or stream_name("broker", socket.gethostname(), str(config.port))
    return AuditLog(
        open_storage(config.audit_log), AuditKey.load_or_create(config.audit_key), stream=stream
    )
