"""The broker's configuration file (YAML): TLS, identities, and policy per tenant and artifact.

Every field is checked when the file is loaded, and an unknown field is an
error: a misspelt policy key must not silently widen what is released. The
defaults are fail-closed: reference values are required for every evidence
kind a rule accepts, and an artifact that no rule names is released to nobody.
Relative paths are read from the config file's folder. The format is in
docs/BROKER.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

from sealstore.enclave import nvgpu, nvgpu_rim, release, snp, tdx
from sealstore.enclave.snp_crl import KDS_CRL_URL, SnpRevocation, load_crl
from sealstore.enclave.tpm import PcrPolicy
from sealstore.errors import AttestationError, FormatError
from sealstore.vault import access
from sealstore.vault.access import ROLES
from sealstore.vault.manifest import check_name

__all__ = [
    "RESTART_ONLY",
    "ROLES",
    "ArtifactRule",
    "BrokerConfig",
    "Detectors",
    "Identity",
    "TenantPolicy",
    "Token",
    "TpmRule",
]

STATE_SCHEMES = ("memory:", "redis://", "rediss://", "unix://")
SIGNATURE_SUFFIX = ".sig"  # the bundle's detached signature: beside the config file

# What a running broker cannot take from a reload (sockets, TLS, where the state
# and the audit log are, the pinned signing key): a reload that changes one is
# refused whole, and the field names the restart it needs.
RESTART_ONLY = (
    "host",
    "port",
    "tls_cert",
    "tls_key",
    "client_ca",
    "require_client_cert",
    "state_url",
    "state_prefix",
    "audit_log",
    "audit_key",
    "audit_stream",
    "webhook",
    "signing_key",
)


@dataclass(frozen=True)
class Token:
    """One accepted bearer token: its SHA-256, and when it stops being accepted."""

    sha256: bytes = field(repr=False)
    not_after: float | None = None  # seconds since the epoch; None: never expires


@dataclass(frozen=True)
class Identity:
    """A workload: how it authenticates, and (for TPM evidence) its registered AK."""

    name: str
    token_sha256: bytes | None = field(default=None, repr=False)
    # Every token accepted (token_sha256's included, with no end): several during a
    # rotation, the old one with a not_after that ends the overlap.
    tokens: tuple[Token, ...] = field(default=(), repr=False)
    mtls_spki_sha256: bytes | None = None
    mtls_cn: str | None = None
    tpm_ak: bytes | None = field(default=None, repr=False)
    # tenant (or "*") -> reader | publisher | admin; by default reader in the
    # tenants whose rules name the identity, and nothing else.
    roles: dict[str, str] = field(default_factory=dict)

    def role(self, tenant: str) -> str | None:
        """The identity's role in *tenant* (the higher of its own and its ``"*"`` one)."""
        return access.higher(self.roles.get(tenant), self.roles.get("*"))

    def may(self, role: str, tenant: str) -> bool:
        return access.covers(self.role(tenant), role)


@dataclass(frozen=True)
class Detectors:
    """Incident response: when an identity is locked out or throttled (docs/BROKER.md)."""

    failures: int = 5  # attestation failures ...
    failure_window: float = 300.0  # ... within this many seconds ...
    lockout: float = 900.0  # ... lock the identity out for this long
    rate_bucket: float = 60.0  # releases are counted per bucket of this many seconds
    rate_history: int = 60  # the usual rate: the mean over this many buckets before
    rate_factor: float = 10.0  # throttle above factor x usual ...
    rate_floor: int = 30  # ... but never below this many per bucket
    throttle: float = 300.0  # how long a throttle lasts
    evidence_change: bool = True  # alert when a known machine's measurements change


@dataclass(frozen=True)
class TpmRule:
    policy: PcrPolicy
    reference: dict[int, bytes]


@dataclass(frozen=True)
class ArtifactRule:
    identities: frozenset[str]
    evidence: tuple[str, ...]
    tpm: TpmRule | None = None
    snp: snp.SnpReference | None = None
    tdx: tdx.TdxReference | None = None
    nvgpu: nvgpu.GpuReference | None = None  # for kinds joined with +nvidia-gpu


@dataclass(frozen=True)
class TenantPolicy:
    name: str
    keys: tuple[str, ...]
    artifacts: dict[str, ArtifactRule]

    def rule(self, artifact: str) -> ArtifactRule | None:
        """The artifact's own rule, else the tenant's ``"*"`` rule, else None."""
        return self.artifacts.get(artifact) or self.artifacts.get("*")


@dataclass(frozen=True)
class BrokerConfig:
    path: Path
    host: str
    port: int
    tls_cert: Path
    tls_key: Path
    client_ca: Path | None
    require_client_cert: bool
    challenge_ttl: float
    max_challenges: int
    max_challenges_per_identity: int
    identities: dict[str, Identity]
    tenants: dict[str, TenantPolicy]
    warnings: tuple[str, ...] = ()
    state_url: str | None = None  # None: in-process (one replica); redis://... shared
    state_prefix: str = "sealstore:"
    audit_log: str = ""  # a path or URL; "" means the folder "audit" beside the config
    audit_key: Path | None = None
    audit_stream: str = ""
    admin_remote: bool = False
    metrics_remote: bool = False
    webhook: str | None = None
    detectors: Detectors = field(default_factory=Detectors)
    # The policy's files as loaded: path -> SHA-256 (hex) of the bytes read: the
    # config itself and every file it names outside server: (reference files,
    # AKs, ...). What a reload watches and what a bundle signature covers.
    sources: dict[str, str] = field(default_factory=dict)
    reload_watch: bool = True  # reload when a source (or the signature) changes
    reload_interval: float = 2.0  # how often the files are looked at (seconds)
    signing_key: bytes | None = field(default=None, repr=False)  # raw Ed25519; None: unsigned
    bundle_serial: int | None = None  # the verified signature's serial (signing only)
    # The signing key came from outside the config (serve --bundle-key or
    # $SEALSTORE_BROKER_BUNDLE_KEY), not from signing.public_key.
    bundle_key_pinned: bool = False
    # serve --allow-bundle-key-change: start although the audit log shows bundles
    # of another key (or signed ones, and this config is unsigned); audited.
    allow_bundle_key_change: bool = False

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        verify: bool = True,
        bundle_key: bytes | None = None,
    ) -> BrokerConfig:
        """Read and check a broker config file.

        Args:
            path: the YAML file.
            verify: check the bundle signature when ``signing.public_key`` is set
                (only ``sealstore broker sign`` loads without it, to make one).
            bundle_key: the raw Ed25519 public key bundles must be signed with,
                pinned outside the config (``load_bundle_key``): the config must
                then be signed by it, whatever its ``signing:`` says (which, if
                given, must name the same key).

        Raises:
            FormatError: the file is missing, not YAML, or a field is wrong (the
                message names the file and the field's path); or, with signing
                configured, the bundle is unsigned, badly signed, or its files
                are not the ones signed.
        """
        p = Path(path).absolute()
        try:
            raw = p.read_bytes()
            doc = yaml.load(raw.decode("utf-8"), Loader=_StrictLoader)  # noqa: S506
        except FileNotFoundError:
            raise FormatError(f"broker config {p} does not exist") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise FormatError(f"cannot read broker config {p}: {exc}") from None
        parser = _Parser(p)
        parser.sources[str(p)] = hashlib.sha256(raw).hexdigest()
        try:
            config = parser.config(doc)
        except _Bad as exc:
            raise FormatError(f"broker config {p}: {exc}") from None
        # A file rewritten while it was parsed: what was read may be neither version.
        for name, digest in config.sources.items():
            if _digest_of(Path(name)) != digest:
                raise FormatError(f"broker config {p}: {name} changed while it was read")
        if bundle_key is not None:
            if config.signing_key is not None and config.signing_key != bundle_key:
                raise FormatError(
                    f"broker config {p}: signing.public_key is not the bundle key pinned "
                    "outside the config (--bundle-key / $SEALSTORE_BROKER_BUNDLE_KEY)"
                )
            config = dataclasses.replace(config, signing_key=bundle_key, bundle_key_pinned=True)
        if verify and config.signing_key is not None:
            from sealstore.enclave.broker_bundle import verify_bundle

            config = dataclasses.replace(config, bundle_serial=verify_bundle(config))
        return config

    @property
    def digest(self) -> str:
        """One SHA-256 (hex) over every source file's: changes when any of them does."""
        return hashlib.sha256(json.dumps(sorted(self.sources.items())).encode()).hexdigest()

    @property
    def signature_path(self) -> Path:
        """Where the bundle's detached signature is (``FILE.sig`` beside the config)."""
        return self.path.with_name(self.path.name + SIGNATURE_SUFFIX)

    def watched(self) -> list[Path]:
        """The files whose change means a reload: the sources, and the signature if signed."""
        out = [Path(p) for p in self.sources]
        return [*out, self.signature_path] if self.signing_key is not None else out


BUNDLE_KEY_ENV = "SEALSTORE_BROKER_BUNDLE_KEY"


def load_bundle_key(path: str | os.PathLike[str]) -> bytes:
    """The raw Ed25519 public key in PEM file *path* (a bundle key pinned outside the config).

    Raises:
        FormatError: the file cannot be read or is not a PEM Ed25519 public key.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise FormatError(f"bundle key {path}: cannot be read: {exc.strerror}") from None
    except ValueError:
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise FormatError(f"bundle key {path}: not a PEM Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _digest_of(path: Path) -> str | None:
    """The SHA-256 (hex) of *path*'s bytes, or None if it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


# The files of a TDX collateral folder (tdx_pccs.CollateralDir's layout).
_COLLATERAL = re.compile(
    r"tcb-info-[0-9a-f]{12}(\.json|\.issuer-chain\.pem)|qe-identity(\.json|\.issuer-chain\.pem)"
    r"|pck-crl-(platform|processor)\.crl|root-ca-crl\.crl"
)


class _Bad(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice (YAML keeps the last silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Parser:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.warnings: list[str] = []
        self.sources: dict[str, str] = {}  # path -> SHA-256 of the bytes read
        self._read: dict[Path, bytes] = {}

    # -- helpers ------------------------------------------------------------
    def _map(self, obj: Any, where: str, allowed: set[str], required: set[str] = frozenset()):
        if not isinstance(obj, dict):
            raise _Bad(f"{where}: expected a mapping")
        unknown = sorted(str(k) for k in obj if k not in allowed)
        if unknown:
            known = ", ".join(sorted(allowed))
            raise _Bad(f"{where}: unknown field {unknown[0]!r} (known: {known})")
        missing = sorted(required - set(obj))
        if missing:
            raise _Bad(f"{where}: missing field {missing[0]!r}")
        return obj

    def _file(self, value: Any, where: str, *, source: bool = True) -> Path:
        """The path *value* names (relative: to the config's folder), an existing file.

        A *source* (every file but the server's TLS files and the signing key)
        is read here, once: :meth:`_bytes` gives what was read, and its digest
        goes into ``sources``, which a reload watches and a signature covers.
        """
        if not isinstance(value, str) or not value:
            raise _Bad(f"{where}: expected a file path")
        p = Path(value)
        p = p if p.is_absolute() else self.path.parent / p
        if not p.is_file():
            raise _Bad(f"{where}: {p} is not a file")
        if source and p not in self._read:
            try:
                self._read[p] = p.read_bytes()
            except OSError as exc:
                raise _Bad(f"{where}: cannot read {p}: {exc.strerror}") from None
            self.sources[str(p)] = hashlib.sha256(self._read[p]).hexdigest()
        return p

    def _bytes(self, p: Path) -> bytes:
        """The bytes of source *p* as :meth:`_file` read them (never read twice)."""
        return self._read[p] if p in self._read else p.read_bytes()

    def _hex(self, value: Any, where: str, size: int | None = None) -> bytes:
        try:
            raw = bytes.fromhex(value) if isinstance(value, str) else None
        except ValueError:
            raw = None
        if raw is None or (size is not None and len(raw) != size):
            what = f"{size}-byte " if size else ""
            raise _Bad(f"{where}: expected a {what}hex string")
        return raw

    def _hex_list(self, value: Any, where: str, size: int) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise _Bad(f"{where}: expected a non-empty list of hex values")
        return tuple(self._hex(v, f"{where}[{i}]", size).hex() for i, v in enumerate(value))

    def _int(self, value: Any, where: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _Bad(f"{where}: expected an integer from {lo} to {hi}")
        return value

    # -- sections -----------------------------------------------------------
    def config(self, doc: Any) -> BrokerConfig:
        top = self._map(
            doc,
            "top level",
            {
                "server",
                "challenge_ttl",
                "max_challenges",
                "max_challenges_per_identity",
                "identities",
                "tenants",
                "state",
                "audit",
                "admin",
                "metrics",
                "alerts",
                "detectors",
                "reload",
                "signing",
            },
            {"server", "identities", "tenants"},
        )
        server = self._map(
            top["server"],
            "server",
            {"host", "port", "tls_cert", "tls_key", "client_ca", "require_client_cert"},
            {"tls_cert", "tls_key"},
        )
        client_ca = server.get("client_ca")
        require = server.get("require_client_cert", False)
        if not isinstance(require, bool):
            raise _Bad("server.require_client_cert: expected true or false")
        if require and client_ca is None:
            raise _Bad("server.require_client_cert: needs server.client_ca")
        ttl = top.get("challenge_ttl", 60)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 1 <= ttl <= 3600:
            raise _Bad("challenge_ttl: expected seconds from 1 to 3600")
        host = server.get("host", "127.0.0.1")
        if not isinstance(host, str) or not host:
            raise _Bad("server.host: expected a host name or address")
        ids = top["identities"]
        if not isinstance(ids, dict):
            raise _Bad("identities: expected a mapping of name -> identity")
        identities = {self._name(n, "identities"): self.identity(n, v) for n, v in ids.items()}
        self._unique(identities, client_ca is not None)
        tenants = top["tenants"]
        if not isinstance(tenants, dict) or not tenants:
            raise _Bad("tenants: expected a mapping of tenant -> policy")
        parsed = {
            self._name(n, "tenants"): self.tenant(n, v, identities) for n, v in tenants.items()
        }
        identities = self._default_roles(identities, parsed)
        state = self._map(top.get("state", {}), "state", {"url", "prefix"})
        state_url = state.get("url")
        if state_url is not None and (
            not isinstance(state_url, str) or not state_url.startswith(STATE_SCHEMES)
        ):
            raise _Bad("state.url: expected memory:, redis://, rediss:// or unix://")
        prefix = state.get("prefix", "sealstore:")
        if not isinstance(prefix, str) or not prefix:
            raise _Bad("state.prefix: expected a non-empty string")
        audit = self._map(top.get("audit", {}), "audit", {"log", "key", "stream"})
        log_at = audit.get("log", "")
        if not isinstance(log_at, str):
            raise _Bad("audit.log: expected a path or URL")
        if log_at and "://" not in log_at and not Path(log_at).is_absolute():
            log_at = str(self.path.parent / log_at)
        key = audit.get("key", "audit.key")
        if not isinstance(key, str) or not key:
            raise _Bad("audit.key: expected a file path (created on first start)")
        key_path = Path(key) if Path(key).is_absolute() else self.path.parent / key
        stream = audit.get("stream", "")
        if not isinstance(stream, str):
            raise _Bad("audit.stream: expected a name")
        admin = self._map(top.get("admin", {}), "admin", {"remote"})
        metrics = self._map(top.get("metrics", {}), "metrics", {"remote"})
        alerts = self._map(top.get("alerts", {}), "alerts", {"webhook"})
        webhook = alerts.get("webhook")
        if webhook is not None and (
            not isinstance(webhook, str) or not webhook.startswith(("http://", "https://"))
        ):
            raise _Bad("alerts.webhook: expected an http:// or https:// URL")
        reload = self._map(top.get("reload", {}), "reload", {"watch", "interval"})
        signing = (
            self._map(top["signing"], "signing", {"public_key"}, {"public_key"})
            if "signing" in top
            else None
        )
        return BrokerConfig(
            path=self.path,
            host=host,
            port=self._int(server.get("port", 8443), "server.port", 0, 65535),
            tls_cert=self._file(server["tls_cert"], "server.tls_cert", source=False),
            tls_key=self._file(server["tls_key"], "server.tls_key", source=False),
            client_ca=(
                None
                if client_ca is None
                else self._file(client_ca, "server.client_ca", source=False)
            ),
            require_client_cert=require,
            challenge_ttl=float(ttl),
            max_challenges=self._int(
                top.get("max_challenges", 100_000), "max_challenges", 1, 10_000_000
            ),
            max_challenges_per_identity=self._int(
                top.get("max_challenges_per_identity", 64), "max_challenges_per_identity", 1, 10**6
            ),
            identities=identities,
            tenants=parsed,
            warnings=tuple(self.warnings),
            state_url=None if state_url in (None, "memory:") else state_url,
            state_prefix=prefix,
            audit_log=log_at or str(self.path.parent / "audit"),
            audit_key=key_path,
            audit_stream=stream,
            admin_remote=self._bool(admin, "remote", "admin"),
            metrics_remote=self._bool(metrics, "remote", "metrics"),
            webhook=webhook,
            detectors=self.detectors(top.get("detectors", {})),
            sources=dict(self.sources),
            reload_watch=self._bool(reload, "watch", "reload") if "watch" in reload else True,
            reload_interval=self._seconds(reload, "interval", "reload", 2.0),
            signing_key=None if signing is None else self.signing_key(signing),
        )

    def signing_key(self, signing: dict[str, Any]) -> bytes:
        """The pinned Ed25519 public key (raw 32 bytes) that must sign the bundle."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        where = "signing.public_key"
        # Not a source: the key a bundle is checked with is not part of what it signs.
        p = self._file(signing["public_key"], where, source=False)
        try:
            key = serialization.load_pem_public_key(p.read_bytes())
        except ValueError:
            key = None
        if not isinstance(key, Ed25519PublicKey):
            raise _Bad(f"{where}: {p} is not a PEM Ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def _bool(self, d: dict[str, Any], key: str, where: str) -> bool:
        value = d.get(key, False)
        if not isinstance(value, bool):
            raise _Bad(f"{where}.{key}: expected true or false")
        return value

    def _seconds(self, d: dict[str, Any], key: str, where: str, default: float) -> float:
        value = d.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1e7:
            raise _Bad(f"{where}.{key}: expected a positive number of seconds")
        return float(value)

    def detectors(self, obj: Any) -> Detectors:
        d = self._map(obj, "detectors", {"attestation_failures", "release_rate", "evidence_change"})
        dflt = Detectors()
        w = "detectors.attestation_failures"
        f = self._map(d.get("attestation_failures", {}), w, {"max", "window", "lockout"})
        r = self._map(
            d.get("release_rate", {}),
            "detectors.release_rate",
            {"bucket", "history", "factor", "floor", "throttle"},
        )
        rw = "detectors.release_rate"
        return Detectors(
            failures=self._int(f.get("max", dflt.failures), f"{w}.max", 1, 10**6),
            failure_window=self._seconds(f, "window", w, dflt.failure_window),
            lockout=self._seconds(f, "lockout", w, dflt.lockout),
            rate_bucket=self._seconds(r, "bucket", rw, dflt.rate_bucket),
            rate_history=self._int(r.get("history", dflt.rate_history), f"{rw}.history", 1, 9999),
            rate_factor=self._seconds(r, "factor", rw, dflt.rate_factor),
            rate_floor=self._int(r.get("floor", dflt.rate_floor), f"{rw}.floor", 1, 10**9),
            throttle=self._seconds(r, "throttle", rw, dflt.throttle),
            evidence_change=self._bool(d, "evidence_change", "detectors")
            if "evidence_change" in d
            else True,
        )

    def _default_roles(
        self, identities: dict[str, Identity], tenants: dict[str, TenantPolicy]
    ) -> dict[str, Identity]:
        """Least privilege: an identity without ``roles`` is a reader where a rule names it."""
        out = {}
        for name, ident in identities.items():
            if not ident.roles:
                named = {
                    t.name: "reader"
                    for t in tenants.values()
                    for rule in t.artifacts.values()
                    if name in rule.identities
                }
                ident = dataclasses.replace(ident, roles=named)
            out[name] = ident
        for name, ident in out.items():
            for t in ident.roles:
                if t != "*" and t not in tenants:
                    raise _Bad(f"identities.{name}.roles: tenant {t!r} is not under tenants")
        return out

    def _unique(self, identities: dict[str, Identity], mtls: bool) -> None:
        seen: dict[tuple[str, object], str] = {}
        for ident in identities.values():
            if (ident.mtls_cn or ident.mtls_spki_sha256) and not mtls:
                raise _Bad(f"identities.{ident.name}: a client certificate needs server.client_ca")
            hashes = [t.sha256 for t in ident.tokens]
            if len(set(hashes)) != len(hashes):
                raise _Bad(f"identities.{ident.name}.tokens: a token given twice")
            for h in hashes:
                other = seen.setdefault(("token", h), ident.name)
                if other != ident.name:
                    raise _Bad(f"identities.{ident.name}.token_sha256: the same as {other}'s")
            for what in ("mtls_spki_sha256", "mtls_cn"):
                value = getattr(ident, what)
                if value is None:
                    continue
                other = seen.setdefault((what, value), ident.name)
                if other != ident.name:
                    raise _Bad(f"identities.{ident.name}.{what}: the same as {other}'s")

    def _name(self, name: Any, where: str) -> str:
        try:
            return check_name(name, f"name under {where}")
        except ValueError as exc:
            raise _Bad(str(exc)) from None

    def identity(self, name: str, obj: Any) -> Identity:
        where = f"identities.{name}"
        d = self._map(
            obj, where, {"token_sha256", "tokens", "mtls_spki_sha256", "mtls_cn", "tpm_ak", "roles"}
        )
        roles = d.get("roles", {})
        if not isinstance(roles, dict) or not all(
            isinstance(t, str) and r in ROLES for t, r in roles.items()
        ):
            raise _Bad(f"{where}.roles: expected tenant (or '*') -> reader, publisher or admin")
        token = d.get("token_sha256")
        spki = d.get("mtls_spki_sha256")
        cn = d.get("mtls_cn")
        tokens = self.tokens(d["tokens"], f"{where}.tokens") if "tokens" in d else ()
        if token is None and not tokens and spki is None and cn is None:
            raise _Bad(f"{where}: needs tokens, token_sha256, mtls_spki_sha256 or mtls_cn")
        if cn is not None and (not isinstance(cn, str) or not cn):
            raise _Bad(f"{where}.mtls_cn: expected a common name")
        ak = None
        if "tpm_ak" in d:
            ak_path = self._file(d["tpm_ak"], f"{where}.tpm_ak")
            ak = self._bytes(ak_path)
            try:
                serialization.load_pem_public_key(ak)
            except ValueError:
                raise _Bad(f"{where}.tpm_ak: {ak_path} is not a PEM public key") from None
        token_hash = None if token is None else self._hex(token, f"{where}.token_sha256", 32)
        if token_hash is not None:
            tokens = (Token(token_hash), *tokens)
        return Identity(
            name=name,
            token_sha256=token_hash,
            tokens=tokens,
            mtls_spki_sha256=(
                None if spki is None else self._hex(spki, f"{where}.mtls_spki_sha256", 32)
            ),
            mtls_cn=cn,
            tpm_ak=ak,
            roles=dict(roles),
        )

    def tokens(self, obj: Any, where: str) -> tuple[Token, ...]:
        """``[{sha256: HEX, not_after: TIME}, ...]``: TIME an ISO 8601 time with its zone."""
        if not isinstance(obj, list) or not obj:
            raise _Bad(f"{where}: expected a non-empty list of {{sha256, not_after}}")
        out = []
        for i, item in enumerate(obj):
            w = f"{where}[{i}]"
            t = self._map(item, w, {"sha256", "not_after"}, {"sha256", "not_after"})
            out.append(
                Token(
                    self._hex(t["sha256"], f"{w}.sha256", 32),
                    self._time(t["not_after"], f"{w}.not_after"),
                )
            )
        return tuple(out)

    def _time(self, value: Any, where: str) -> float:
        # YAML reads an unquoted 2026-03-01T00:00:00Z as a datetime, a quoted one as a str.
        when = value
        if isinstance(value, str):
            try:
                when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                when = None
        if not isinstance(when, dt.datetime) or when.tzinfo is None:
            raise _Bad(
                f"{where}: expected an ISO 8601 time with its zone, e.g. 2026-03-01T00:00:00Z"
            )
        return when.timestamp()

    def tenant(self, name: str, obj: Any, identities: dict[str, Identity]) -> TenantPolicy:
        where = f"tenants.{name}"
        d = self._map(obj, where, {"keys", "artifacts"}, {"keys", "artifacts"})
        keys = d["keys"]
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            raise _Bad(f"{where}.keys: expected a non-empty list of key URIs")
        for i, uri in enumerate(keys):
            self._key_uri(uri, f"{where}.keys[{i}]")
        arts = d["artifacts"]
        if not isinstance(arts, dict) or not arts:
            raise _Bad(f"{where}.artifacts: expected a mapping of artifact -> rule")
        rules = {}
        for art, rule in arts.items():
            if art != "*":
                self._name(art, f"{where}.artifacts")
            rules[art] = self.rule(f"{where}.artifacts.{art}", rule, identities)
        return TenantPolicy(name, tuple(keys), rules)

    def _key_uri(self, uri: str, where: str) -> None:
        from sealstore.kms.registry import get_provider_class

        scheme, _, rest = uri.partition(":")
        if scheme in (release.SLOT_KIND, "x25519") or not rest:
            raise _Bad(
                f"{where}: {uri!r} cannot be a tenant key (local:, vault-transit:, "
                "aws-kms: or tpm:)"
            )
        try:
            get_provider_class(scheme)
        except (ValueError, ImportError) as exc:
            raise _Bad(f"{where}: {exc}") from None

    def rule(self, where: str, obj: Any, identities: dict[str, Identity]) -> ArtifactRule:
        d = self._map(
            obj,
            where,
            {"identities", "evidence", "tpm", "snp", "tdx", release.GPU_KIND},
            {"identities", "evidence"},
        )
        who = d["identities"]
        if not isinstance(who, list) or not who:
            raise _Bad(f"{where}.identities: expected a non-empty list of identity names")
        for n in who:
            if n not in identities:
                raise _Bad(f"{where}.identities: {n!r} is not defined under identities")
        kinds = d["evidence"]
        if not isinstance(kinds, list) or not kinds:
            raise _Bad(f"{where}.evidence: expected a non-empty list of tpm, snp, tdx")
        used = set()
        for k in kinds:
            try:
                cpu, gpu = release.parse_kind(k)
            except ValueError as exc:
                raise _Bad(f"{where}.evidence: {exc}") from None
            for part in (cpu, release.GPU_KIND) if gpu else (cpu,):
                if part not in d:
                    raise _Bad(f"{where}: evidence {k!r} needs its reference values under {part}:")
                used.add(part)
        extra = sorted(
            k for k in (*release.EVIDENCE_KINDS, release.GPU_KIND) if k in d and k not in used
        )
        if extra:
            raise _Bad(f"{where}.{extra[0]}: reference values for a kind not in evidence")
        kinds = [release.parse_kind(k)[0] for k in kinds]  # the CPU kinds, for the checks below
        if "tpm" in kinds:
            for n in who:
                if identities[n].tpm_ak is None:
                    raise _Bad(f"{where}: identity {n!r} sends TPM evidence but has no tpm_ak")
        gpu_where = f"{where}.{release.GPU_KIND}"
        return ArtifactRule(
            identities=frozenset(who),
            evidence=tuple(d["evidence"]),
            tpm=self.tpm(f"{where}.tpm", d["tpm"]) if "tpm" in d else None,
            snp=self.snp(f"{where}.snp", d["snp"]) if "snp" in d else None,
            tdx=self.tdx(f"{where}.tdx", d["tdx"]) if "tdx" in d else None,
            nvgpu=self.nvidia_gpu(gpu_where, d[release.GPU_KIND])
            if release.GPU_KIND in d
            else None,
        )

    def tpm(self, where: str, obj: Any) -> TpmRule:
        d = self._map(obj, where, {"pcrs", "reference", "reference_file"}, {"pcrs"})
        try:
            policy = PcrPolicy.parse(str(d["pcrs"]))
        except ValueError as exc:
            raise _Bad(f"{where}.pcrs: {exc}") from None
        if ("reference" in d) == ("reference_file" in d):
            raise _Bad(f"{where}: give exactly one of reference and reference_file")
        if "reference" in d:
            ref, rwhere = d["reference"], f"{where}.reference"
        else:
            f = self._file(d["reference_file"], f"{where}.reference_file")
            rwhere = f"{where}.reference_file ({f})"
            try:
                ref = json.loads(self._bytes(f).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise _Bad(f"{rwhere}: not JSON") from None
        if not isinstance(ref, dict):
            raise _Bad(f"{rwhere}: expected PCR -> hex value")
        size = hashlib.new(policy.bank).digest_size
        values = {}
        for k, v in ref.items():
            if isinstance(k, int) and not isinstance(k, bool):
                index = k
            elif isinstance(k, str) and k.isdigit():
                index = int(k)
            else:
                raise _Bad(f"{rwhere}: {k!r} is not a PCR number")
            values[index] = self._hex(v, f"{rwhere}.{k}", size)
        if sorted(values) != list(policy.pcrs):
            raise _Bad(f"{rwhere}: needs a value for each of PCRs {policy.spec} and no other")
        soft = [p for p in policy.pcrs if p in (16, 23)]
        if soft:
            self.warnings.append(
                f"{where}.pcrs: PCR {soft[0]} can be reset by software at locality 0; "
                "it proves nothing about the boot (use it in tests only)"
            )
        return TpmRule(policy, values)

    def snp(self, where: str, obj: Any) -> snp.SnpReference:
        # A minimum TCB is required: without it a platform with known-bad
        # firmware (whose VCEK still verifies) would be accepted.
        d = self._map(
            obj,
            where,
            {
                "measurements",
                "min_tcb",
                "allow_debug",
                "max_vmpl",
                "host_data",
                "crl_file",
                "crl_url",
                "crl_grace",
                "crl_cache",
            },
            {"measurements", "min_tcb"},
        )
        t = self._map(
            d["min_tcb"],
            f"{where}.min_tcb",
            {"bootloader", "tee", "snp", "microcode", "fmc"},
            {"bootloader", "tee", "snp", "microcode"},
        )
        vals = {k: self._int(v, f"{where}.min_tcb.{k}", 0, 255) for k, v in t.items()}
        tcb = snp.Tcb(**vals)
        return snp.SnpReference(
            measurements=self._hex_list(d["measurements"], f"{where}.measurements", 48),
            min_tcb=tcb,
            allow_debug=self._debug(d, where),
            max_vmpl=self._int(d.get("max_vmpl", 0), f"{where}.max_vmpl", 0, 3),
            host_data=self._optional_hex(d, "host_data", where, 32),
            revocation=self._snp_crl(d, where),
        )

    def _snp_crl(self, d: dict[str, Any], where: str) -> SnpRevocation | None:
        """AMD's CRLs: offline files or a URL template; None when neither is configured."""
        if "crl_file" in d and "crl_url" in d:
            raise _Bad(f"{where}: give crl_file or crl_url, not both")
        if "crl_file" not in d and "crl_url" not in d:
            for k in ("crl_grace", "crl_cache"):
                if k in d:
                    raise _Bad(f"{where}.{k}: needs crl_file or crl_url")
            return None
        files: tuple[Path, ...] = ()
        contents: tuple[bytes, ...] = ()
        if "crl_file" in d:
            raw = d["crl_file"] if isinstance(d["crl_file"], list) else [d["crl_file"]]
            files = tuple(self._file(f, f"{where}.crl_file") for f in raw)
            if not files:
                raise _Bad(f"{where}.crl_file: expected a file path or a list of them")
            contents = tuple(self._bytes(f) for f in files)  # the bytes digested and signed
            for f, data in zip(files, contents, strict=True):
                # its signature is checked against the ARK of each evidence
                try:
                    load_crl(data, str(f))
                except AttestationError as exc:
                    raise _Bad(f"{where}.crl_file: {exc}") from None
            if "crl_cache" in d:
                raise _Bad(f"{where}.crl_cache: only for crl_url")
        url = d.get("crl_url")
        if url is not None:
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                raise _Bad(f"{where}.crl_url: expected an http(s) URL, e.g. {KDS_CRL_URL}")
            try:
                url.format(product="Milan", key="vcek")
            except (KeyError, IndexError, ValueError):
                raise _Bad(
                    f"{where}.crl_url: only {{product}} and {{key}} may be filled in"
                ) from None
        cache = d.get("crl_cache")
        if cache is not None and (not isinstance(cache, str) or not cache):
            raise _Bad(f"{where}.crl_cache: expected a directory path")
        grace = d.get("crl_grace", 0)
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= 1e7:
            raise _Bad(f"{where}.crl_grace: expected seconds from 0 to 10000000")
        return SnpRevocation(
            files=files,
            contents=contents if files else (),
            url=url,
            grace=dt.timedelta(seconds=grace),
            cache_dir=None if cache is None else self.path.parent / cache,
        )

    def tdx(self, where: str, obj: Any) -> tdx.TdxReference:
        # MRTD measures the TD's firmware only; the RTMRs carry the kernel,
        # initrd and command line, so a rule must name at least one.
        d = self._map(
            obj,
            where,
            {"mrtd", "rtmrs", "mrconfigid", "allow_debug", "collateral"},
            {"mrtd", "rtmrs"},
        )
        rtmrs = {}
        raw = d["rtmrs"]
        if not isinstance(raw, dict) or not raw:
            raise _Bad(f"{where}.rtmrs: expected RTMR index -> list of hex values")
        for k, v in raw.items():
            index = self._int(k, f"{where}.rtmrs", 0, 3)
            rtmrs[index] = self._hex_list(v, f"{where}.rtmrs.{k}", 48)
        return tdx.TdxReference(
            mrtd=self._hex_list(d["mrtd"], f"{where}.mrtd", 48),
            rtmrs=rtmrs,
            mrconfigid=self._optional_hex(d, "mrconfigid", where, 48),
            allow_debug=self._debug(d, where),
            **self.tdx_collateral(f"{where}.collateral", d.get("collateral")),
        )

    def tdx_collateral(self, where: str, obj: Any) -> dict[str, Any]:
        # Required, as SNP's min_tcb is: without Intel's collateral a revoked
        # or out-of-date platform, or a QE that is not Intel's, is accepted.
        from sealstore.enclave import tdx_collateral, tdx_pccs

        if obj is None:
            raise _Bad(f"{where}: missing (dir: FOLDER or pccs_url: URL, see docs/BROKER.md)")
        d = self._map(
            obj, where, {"dir", "pccs_url", "pccs_ca", "accept", "grace_hours", "min_evaluation"}
        )
        if ("dir" in d) == ("pccs_url" in d):
            raise _Bad(f"{where}: give exactly one of dir and pccs_url")
        source: tdx_pccs.CollateralSource
        if "dir" in d:
            folder = Path(d["dir"]) if isinstance(d["dir"], str) and d["dir"] else None
            folder = folder if folder is None or folder.is_absolute() else self.path.parent / folder
            if folder is None or not folder.is_dir():
                raise _Bad(f"{where}.dir: expected an existing folder")
            # Read now, as sources: signed with the config, watched, and a
            # change only takes effect through a reload (never read live).
            names = sorted(
                q.name for q in folder.iterdir() if _COLLATERAL.fullmatch(q.name) and q.is_file()
            )
            files = {n: self._bytes(self._file(str(folder / n), f"{where}.dir")) for n in names}
            source = tdx_pccs.CollateralDir(folder, files=files)
        else:
            ca = self._file(d["pccs_ca"], f"{where}.pccs_ca") if "pccs_ca" in d else None
            try:
                source = tdx_pccs.Pccs(str(d["pccs_url"]), ca_file=ca)
            except (ValueError, OSError) as exc:
                raise _Bad(f"{where}.pccs_url: {exc}") from None
        accept = d.get("accept", ["UpToDate"])
        if not isinstance(accept, list) or not all(isinstance(a, str) for a in accept):
            raise _Bad(f"{where}.accept: expected a list of TCB statuses")
        grace = d.get("grace_hours", 0)
        if isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0:
            raise _Bad(f"{where}.grace_hours: expected a number of hours, 0 or more")
        try:
            policy = tdx_collateral.TcbPolicy(
                accept=frozenset(accept),
                grace=dt.timedelta(hours=grace),
                min_evaluation=self._int(
                    d.get("min_evaluation", 0), f"{where}.min_evaluation", 0, 1 << 31
                ),
            )
        except ValueError as exc:
            raise _Bad(f"{where}.accept: {exc}") from None
        return {"collateral": source, "policy": policy}

    def nvidia_gpu(self, where: str, obj: Any) -> nvgpu.GpuReference:
        # Minimum versions are required for the reason min_tcb is: a GPU on
        # known-bad firmware still signs genuine reports.
        d = self._map(
            obj,
            where,
            {
                "driver_rims",
                "vbios_rims",
                "min_driver",
                "min_vbios",
                "modes",
                "gpus",
                "rims_valid_at",
            },
            {"driver_rims", "vbios_rims", "min_driver", "min_vbios"},
        )
        at = d.get("rims_valid_at")
        if at is not None:
            try:
                at = at if isinstance(at, dt.datetime) else dt.datetime.fromisoformat(str(at))
            except ValueError:
                raise _Bad(f"{where}.rims_valid_at: expected a date and time (ISO 8601)") from None
            at = at if at.tzinfo else at.replace(tzinfo=dt.UTC)
            self.warnings.append(
                f"{where}.rims_valid_at: the RIM signers' certificates are "
                f"checked as of {at:%Y-%m-%d %H:%M} UTC, not now"
            )
        rims = {}
        for key in ("driver_rims", "vbios_rims"):
            files = d[key]
            if not isinstance(files, list) or not files:
                raise _Bad(f"{where}.{key}: expected a non-empty list of RIM files")
            loaded = []
            for i, f in enumerate(files):
                path = self._file(f, f"{where}.{key}[{i}]")
                try:
                    loaded.append(nvgpu_rim.load_rim(self._bytes(path), path.name, at=at))
                except AttestationError as exc:
                    raise _Bad(f"{where}.{key}[{i}]: {exc}") from None
            rims[key] = tuple(loaded)
        for drv in rims["driver_rims"]:
            for vb in rims["vbios_rims"]:
                try:
                    nvgpu.golden(drv, vb)
                except ValueError as exc:
                    raise _Bad(f"{where}: {exc}") from None
        versions = {}
        for key, hexadecimal in (("min_driver", False), ("min_vbios", True)):
            value = d[key]
            try:
                nvgpu.parse_version(str(value), hexadecimal=hexadecimal)
            except ValueError as exc:
                raise _Bad(f"{where}.{key}: {exc}") from None
            versions[key] = str(value).lower()
        modes = d.get("modes", [])
        known = {"spt", "mpt", "ppcie"}
        if not isinstance(modes, list) or not set(modes) <= known:
            raise _Bad(f"{where}.modes: expected a list of spt, mpt, ppcie")
        return nvgpu.GpuReference(
            driver_rims=rims["driver_rims"],
            vbios_rims=rims["vbios_rims"],
            min_driver=versions["min_driver"],
            min_vbios=versions["min_vbios"],
            modes=frozenset(modes),
            gpus=self._int(d.get("gpus", 1), f"{where}.gpus", 1, 64),
        )

    def _debug(self, d: dict[str, Any], where: str) -> bool:
        debug = d.get("allow_debug", False)
        if not isinstance(debug, bool):
            raise _Bad(f"{where}.allow_debug: expected true or false")
        return debug

    def _optional_hex(self, d: dict[str, Any], key: str, where: str, size: int) -> str:
        """The hex value of an optional field ("" when absent: any value accepted)."""
        return self._hex(d[key], f"{where}.{key}", size).hex() if key in d else ""
