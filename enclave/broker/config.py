"""The broker's configuration file (YAML): TLS, identities, and policy per tenant and artifact.

Every field is checked when the file is loaded, and an unknown field is an
error: a misspelt policy key must not silently widen what is released. The
defaults are fail-closed: reference values are required for every evidence
kind a rule accepts, and an artifact that no rule names is released to nobody.
Relative paths are read from the config file's folder. The format is in
docs/BROKER.md.

The document's shape -- each field's type, range, default, and the rules
within a section -- is the pydantic models ``*Doc`` (strict: YAML's types as
written; their JSON Schema is ``sealstore broker schema``); ``_Build`` then
reads the files the config names and checks what spans sections. A mistake
is a ``FormatError`` of one line: the field's path, then the problem.
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
from typing import Annotated, Any, Literal

import yaml
from cryptography.hazmat.primitives import serialization
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from sealstore.docmodel import JSON_SCHEMA_DIALECT, explain, fail, says
from sealstore.enclave.attestation import nvgpu, nvgpu_rim, snp, tdx
from sealstore.enclave.attestation.snp_crl import KDS_CRL_URL, SnpRevocation, load_crl
from sealstore.enclave.attestation.tpm import PcrPolicy
from sealstore.enclave.broker import release
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
        build = _Build(p)
        build.sources[str(p)] = hashlib.sha256(raw).hexdigest()
        try:
            config = build.config(BrokerDoc.model_validate(doc))
        except ValidationError as exc:
            raise FormatError(
                f"broker config {p}: {explain(exc, number_keyed=_NUMBER_KEYED)}"
            ) from None
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
            from sealstore.enclave.broker.bundle import verify_bundle

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


# -- the document's shape (pydantic) ----------------------------------------------
#
# Every field's type, range and default, and the rules within one section, are
# the models below: they are also what ``sealstore broker schema`` exports for
# editors. YAML gives ints, floats, bools, strings and (unquoted) datetimes, so
# the models are strict: "8443" is not a port and "yes" is not true. What needs
# the config's folder (files, read once as sources) or the whole document
# (identities a rule names, unique credentials, default roles) is _Build's.


def _int(lo: int, hi: int) -> Any:
    return Annotated[int, Field(ge=lo, le=hi), says(f"expected an integer from {lo} to {hi}")]


def _hex(size: int, *, as_bytes: bool = False) -> Any:
    """A hex string of *size* bytes: its bytes, or (normalised) lowercase hex."""

    def check(value: Any) -> Any:
        try:
            raw = bytes.fromhex(value) if isinstance(value, str) else None
        except ValueError:
            raw = None
        if raw is None or len(raw) != size:
            raise fail(f"expected a {size}-byte hex string")
        return raw if as_bytes else raw.hex()

    return Annotated[
        bytes if as_bytes else str,
        BeforeValidator(check),
        WithJsonSchema({"type": "string", "pattern": f"^[0-9a-fA-F]{{{2 * size}}}$"}),
    ]


def _hex_list(size: int) -> Any:
    return Annotated[
        tuple[_hex(size), ...],
        Field(min_length=1),
        BeforeValidator(_listed),
        says("expected a non-empty list of hex values", own_only=True),
        WithJsonSchema(
            {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "pattern": f"^[0-9a-fA-F]{{{2 * size}}}$"},
            }
        ),
    ]


def _timestamp(value: Any) -> float:
    # YAML reads an unquoted 2026-03-01T00:00:00Z as a datetime, a quoted one as a str.
    when = value
    if isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            when = None
    if not isinstance(when, dt.datetime) or when.tzinfo is None:
        raise fail("expected an ISO 8601 time with its zone, e.g. 2026-03-01T00:00:00Z")
    return when.timestamp()


def _moment(value: Any) -> dt.datetime:
    try:
        at = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise fail("expected a date and time (ISO 8601)") from None
    return at if at.tzinfo else at.replace(tzinfo=dt.UTC)


_TIME_SCHEMA = WithJsonSchema({"type": "string", "format": "date-time"})
Bool = Annotated[bool, says("expected true or false")]
Seconds = Annotated[float, Field(gt=0, le=1e7), says("expected a positive number of seconds")]
FilePath = Annotated[str, Field(min_length=1), says("expected a file path")]
Role = Literal[ROLES]  # type: ignore[valid-type]  # reader, publisher, admin
# A mapping's key: YAML reads 123 or 1.5 as a number, never a name.
Name = Annotated[str, says("a name must be a string (quote one YAML reads as a number)")]


def _listed(value: Any) -> Any:
    """A YAML list as the tuple the config keeps (strict: anything else is refused)."""
    return tuple(value) if isinstance(value, list) else value


def _as_text(value: Any) -> Any:
    """YAML reads 545.00 as a number: a version (or PCR list) is its text."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


class _Section(BaseModel):
    """A mapping of known fields: anything else is refused, by name."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise fail("expected a mapping")
        known = sorted(f.alias or n for n, f in cls.model_fields.items())
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise fail(f"unknown field {unknown[0]!r} (known: {', '.join(known)})")
        return data


class ServerDoc(_Section):
    """Where the broker listens, and its TLS (client certificates optional)."""

    host: Annotated[str, Field(min_length=1), says("expected a host name or address")] = "127.0.0.1"
    port: _int(0, 65535) = 8443
    tls_cert: FilePath
    tls_key: FilePath
    client_ca: FilePath | None = None
    require_client_cert: Bool = False

    @model_validator(mode="after")
    def _ca_for_required(self) -> ServerDoc:
        if self.require_client_cert and self.client_ca is None:
            raise fail("needs server.client_ca", at="require_client_cert")
        return self


class TokenDoc(_Section):
    sha256: _hex(32, as_bytes=True)
    not_after: Annotated[float, BeforeValidator(_timestamp), _TIME_SCHEMA]


class IdentityDoc(_Section):
    """A workload: a bearer token (its SHA-256) and/or a client certificate, a TPM AK."""

    token_sha256: _hex(32, as_bytes=True) | None = None
    tokens: Annotated[
        tuple[TokenDoc, ...],
        Field(min_length=1),
        BeforeValidator(_listed),
        says("expected a non-empty list of {sha256, not_after}", own_only=True),
    ] = ()
    mtls_spki_sha256: _hex(32, as_bytes=True) | None = None
    mtls_cn: Annotated[str, Field(min_length=1), says("expected a common name")] | None = None
    tpm_ak: FilePath = None  # type: ignore[assignment]  # absent: None; null: refused
    roles: Annotated[
        dict[Name, Role], says("expected tenant (or '*') -> reader, publisher or admin")
    ] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _authenticates(self) -> IdentityDoc:
        if not (self.token_sha256 or self.tokens or self.mtls_spki_sha256 or self.mtls_cn):
            raise fail("needs tokens, token_sha256, mtls_spki_sha256 or mtls_cn")
        return self


def _pcrs(value: str) -> str:
    try:
        PcrPolicy.parse(value)
    except ValueError as exc:
        raise fail(str(exc)) from None
    return value


class TpmDoc(_Section):
    """PCR values a TPM quote must show: inline, or in a JSON file ({"7": HEX, ...})."""

    pcrs: Annotated[
        str,
        BeforeValidator(_as_text),
        AfterValidator(_pcrs),
        says("expected a PCR selection, e.g. 7,14 or sha384:0,7"),
        WithJsonSchema({"type": "string"}),
    ]
    reference: Annotated[dict[Any, Any], says("expected PCR -> hex value")] | None = None
    reference_file: FilePath | None = None

    @model_validator(mode="after")
    def _one_reference(self) -> TpmDoc:
        if (self.reference is None) == (self.reference_file is None):
            raise fail("give exactly one of reference and reference_file")
        return self


class TcbDoc(_Section):
    bootloader: _int(0, 255)
    tee: _int(0, 255)
    snp: _int(0, 255)
    microcode: _int(0, 255)
    fmc: _int(0, 255) | None = None


def _crl_url(url: str) -> str:
    if not url.startswith(("https://", "http://")):
        raise fail(f"expected an http(s) URL, e.g. {KDS_CRL_URL}")
    try:
        url.format(product="Milan", key="vcek")
    except (KeyError, IndexError, ValueError):
        raise fail("only {product} and {key} may be filled in") from None
    return url


class SnpDoc(_Section):
    """AMD SEV-SNP reference values. A minimum TCB is required: without it a platform
    with known-bad firmware (whose VCEK still verifies) would be accepted."""

    measurements: _hex_list(48)
    min_tcb: TcbDoc
    allow_debug: Bool = False
    max_vmpl: _int(0, 3) = 0
    host_data: _hex(32) = ""
    crl_file: Annotated[
        tuple[FilePath, ...],
        Field(min_length=1),
        BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else (v,)),
        says("expected a file path or a list of them", own_only=True),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                ]
            }
        ),
    ] = ()
    crl_url: (
        Annotated[
            str, AfterValidator(_crl_url), says(f"expected an http(s) URL, e.g. {KDS_CRL_URL}")
        ]
        | None
    ) = None
    crl_grace: Annotated[
        float, Field(ge=0, le=1e7), says("expected seconds from 0 to 10000000")
    ] = 0
    crl_cache: Annotated[str, Field(min_length=1), says("expected a directory path")] | None = None

    @model_validator(mode="after")
    def _crl_source(self) -> SnpDoc:
        if self.crl_file and self.crl_url is not None:
            raise fail("give crl_file or crl_url, not both")
        if not self.crl_file and self.crl_url is None:
            for k in ("crl_grace", "crl_cache"):
                if k in self.model_fields_set:
                    raise fail("needs crl_file or crl_url", at=k)
        if self.crl_file and self.crl_cache is not None:
            raise fail("only for crl_url", at="crl_cache")
        return self


class CollateralDoc(_Section):
    """Intel's TCB collateral: a folder of files, or a PCCS. Required, as SNP's min_tcb
    is: without it a revoked or out-of-date platform, or a QE not Intel's, is accepted."""

    dir: Annotated[str, Field(min_length=1), says("expected an existing folder")] | None = None
    pccs_url: Annotated[str, says("expected a PCCS URL (https://...)")] | None = None
    pccs_ca: FilePath | None = None
    accept: Annotated[
        tuple[str, ...], BeforeValidator(_listed), says("expected a list of TCB statuses")
    ] = ("UpToDate",)
    grace_hours: Annotated[float, Field(ge=0), says("expected a number of hours, 0 or more")] = 0
    min_evaluation: _int(0, 1 << 31) = 0

    @model_validator(mode="after")
    def _one_source(self) -> CollateralDoc:
        if (self.dir is None) == (self.pccs_url is None):
            raise fail("give exactly one of dir and pccs_url")
        return self


class TdxDoc(_Section):
    """Intel TDX reference values. MRTD measures the TD's firmware only; the RTMRs carry
    the kernel, initrd and command line, so a rule must name at least one."""

    mrtd: _hex_list(48)
    rtmrs: Annotated[
        dict[_int(0, 3), _hex_list(48)],
        Field(min_length=1),
        says("expected RTMR index -> list of hex values", own_only=True),
    ]
    mrconfigid: _hex(48) = ""
    allow_debug: Bool = False
    collateral: CollateralDoc | None = None

    @model_validator(mode="after")
    def _collateral_given(self) -> TdxDoc:
        if self.collateral is None:
            raise fail(
                "missing (dir: FOLDER or pccs_url: URL, see docs/BROKER.md)", at="collateral"
            )
        return self


def _version(hexadecimal: bool) -> Any:
    def check(value: str) -> str:
        try:
            nvgpu.parse_version(value, hexadecimal=hexadecimal)
        except ValueError as exc:
            raise fail(str(exc)) from None
        return value.lower()

    return Annotated[
        str, BeforeValidator(_as_text), AfterValidator(check), WithJsonSchema({"type": "string"})
    ]


RimFiles = Annotated[
    tuple[FilePath, ...],
    Field(min_length=1),
    BeforeValidator(_listed),
    says("expected a non-empty list of RIM files", own_only=True),
]


class GpuDoc(_Section):
    """NVIDIA GPU reference values (RIMs). Minimum versions are required for the reason
    min_tcb is: a GPU on known-bad firmware still signs genuine reports."""

    driver_rims: RimFiles
    vbios_rims: RimFiles
    min_driver: _version(False)
    min_vbios: _version(True)
    modes: Annotated[
        frozenset[Literal["spt", "mpt", "ppcie"]],
        BeforeValidator(lambda v: frozenset(v) if isinstance(v, list) else v),
        says("expected a list of spt, mpt, ppcie"),
        WithJsonSchema({"type": "array", "items": {"enum": ["spt", "mpt", "ppcie"]}}),
    ] = frozenset()
    gpus: _int(1, 64) = 1
    rims_valid_at: Annotated[dt.datetime, BeforeValidator(_moment), _TIME_SCHEMA] | None = None


class RuleDoc(_Section):
    """Who may have an artifact's key released, on which evidence, against which values."""

    identities: Annotated[
        tuple[str, ...],
        Field(min_length=1),
        BeforeValidator(_listed),
        says("expected a non-empty list of identity names"),
    ]
    evidence: Annotated[
        tuple[str, ...],
        Field(min_length=1),
        BeforeValidator(_listed),
        says("expected a non-empty list of tpm, snp, tdx"),
    ]
    tpm: TpmDoc | None = None
    snp: SnpDoc | None = None
    tdx: TdxDoc | None = None
    nvgpu: GpuDoc | None = Field(default=None, alias=release.GPU_KIND)

    @model_validator(mode="after")
    def _references_match_evidence(self) -> RuleDoc:
        used = set()
        for k in self.evidence:
            try:
                cpu, gpu = release.parse_kind(k)
            except ValueError as exc:
                raise fail(str(exc), at="evidence") from None
            for part in (cpu, release.GPU_KIND) if gpu else (cpu,):
                if self._section(part) is None:
                    raise fail(f"evidence {k!r} needs its reference values under {part}:")
                used.add(part)
        extra = sorted(
            k
            for k in (*release.EVIDENCE_KINDS, release.GPU_KIND)
            if self._section(k) is not None and k not in used
        )
        if extra:
            raise fail("reference values for a kind not in evidence", at=extra[0])
        return self

    def _section(self, kind: str) -> Any:
        return self.nvgpu if kind == release.GPU_KIND else getattr(self, kind, None)


def _key_uri(uri: str) -> str:
    from sealstore.kms.registry import get_provider_class

    scheme, _, rest = uri.partition(":")
    if scheme in (release.SLOT_KIND, "x25519") or not rest:
        raise fail(f"{uri!r} cannot be a tenant key (local:, vault-transit:, aws-kms: or tpm:)")
    try:
        get_provider_class(scheme)
    except (ValueError, ImportError) as exc:
        raise fail(str(exc)) from None
    return uri


class TenantDoc(_Section):
    """A tenant's key(s) and its rules, per artifact (``"*"``: any other artifact)."""

    keys: Annotated[
        tuple[Annotated[str, AfterValidator(_key_uri)], ...],
        Field(min_length=1),
        BeforeValidator(_listed),
        says("expected a non-empty list of key URIs", own_only=True),
    ]
    artifacts: Annotated[
        dict[Name, RuleDoc],
        Field(min_length=1),
        says("expected a mapping of artifact -> rule", own_only=True),
    ]


def _starts(prefixes: tuple[str, ...], message: str) -> Any:
    def check(value: str) -> str:
        if not value.startswith(prefixes):
            raise fail(message)
        return value

    return check


def _starts(prefixes: tuple[str, ...], message: str) -> Any:
    def check(value: str) -> str:
        if not value.startswith(prefixes):
            raise fail(message)
        return value

    return check


class StateDoc(_Section):
    """Where challenges, lockouts and counters live (Redis for several replicas)."""

    url: (
        Annotated[
            str,
            AfterValidator(
                _starts(STATE_SCHEMES, "expected memory:, redis://, rediss:// or unix://")
            ),
            says("expected memory:, redis://, rediss:// or unix://"),
        ]
        | None
    ) = None
    prefix: Annotated[str, Field(min_length=1), says("expected a non-empty string")] = "sealstore:"


class AuditDoc(_Section):
    log: Annotated[str, says("expected a path or URL")] = ""
    key: Annotated[
        str, Field(min_length=1), says("expected a file path (created on first start)")
    ] = "audit.key"
    stream: Annotated[str, says("expected a name")] = ""


class RemoteDoc(_Section):
    remote: Bool = False


class AlertsDoc(_Section):
    webhook: (
        Annotated[
            str,
            AfterValidator(_starts(("http://", "https://"), "expected an http:// or https:// URL")),
            says("expected an http:// or https:// URL"),
        ]
        | None
    ) = None


class FailuresDoc(_Section):
    max: _int(1, 10**6) = Detectors.failures
    window: Seconds = Detectors.failure_window
    lockout: Seconds = Detectors.lockout


class RateDoc(_Section):
    bucket: Seconds = Detectors.rate_bucket
    history: _int(1, 9999) = Detectors.rate_history
    factor: Seconds = Detectors.rate_factor
    floor: _int(1, 10**9) = Detectors.rate_floor
    throttle: Seconds = Detectors.throttle


class DetectorsDoc(_Section):
    """Incident response: lockouts after attestation failures, throttles on release bursts."""

    attestation_failures: FailuresDoc = Field(default_factory=FailuresDoc)
    release_rate: RateDoc = Field(default_factory=RateDoc)
    evidence_change: Bool = Detectors.evidence_change


class ReloadDoc(_Section):
    watch: Bool = True
    interval: Seconds = 2.0


class SigningDoc(_Section):
    """The Ed25519 public key (PEM) the bundle's detached signature must verify with."""

    public_key: FilePath


class BrokerDoc(_Section):
    """The key broker's configuration file (docs/BROKER.md)."""

    model_config = ConfigDict(title="sealstore key broker configuration")

    server: ServerDoc
    challenge_ttl: Annotated[
        float, Field(ge=1, le=3600), says("expected seconds from 1 to 3600")
    ] = 60
    max_challenges: _int(1, 10_000_000) = 100_000
    max_challenges_per_identity: _int(1, 10**6) = 64
    identities: Annotated[
        dict[Name, IdentityDoc], says("expected a mapping of name -> identity", own_only=True)
    ]
    tenants: Annotated[
        dict[Name, TenantDoc],
        Field(min_length=1),
        says("expected a mapping of tenant -> policy", own_only=True),
    ]
    state: StateDoc = Field(default_factory=StateDoc)
    audit: AuditDoc = Field(default_factory=AuditDoc)
    admin: RemoteDoc = Field(default_factory=RemoteDoc)
    metrics: RemoteDoc = Field(default_factory=RemoteDoc)
    alerts: AlertsDoc = Field(default_factory=AlertsDoc)
    detectors: DetectorsDoc = Field(default_factory=DetectorsDoc)
    reload: ReloadDoc = Field(default_factory=ReloadDoc)
    signing: SigningDoc = None  # type: ignore[assignment]  # absent: unsigned; null: refused


# Mappings whose keys are numbers (RTMR and PCR indexes): named .K, not [K], in a path.
_NUMBER_KEYED = ("rtmrs", "reference")


def json_schema() -> dict[str, Any]:
    """The config file's JSON Schema (for editors: ``sealstore broker schema``)."""
    schema = BrokerDoc.model_json_schema()
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


# -- from the checked document to the config: files and cross-references ----------


class _Build:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.warnings: list[str] = []
        self.sources: dict[str, str] = {}  # path -> SHA-256 of the bytes read
        self._read: dict[Path, bytes] = {}

    def _file(self, value: str, where: str, *, source: bool = True) -> Path:
        """The path *value* names (relative: to the config's folder), an existing file.

        A *source* (every file but the server's TLS files and the signing key)
        is read here, once: :meth:`_bytes` gives what was read, and its digest
        goes into ``sources``, which a reload watches and a signature covers.
        """
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

    def _resolve(self, value: str) -> Path:
        return Path(value) if Path(value).is_absolute() else self.path.parent / value

    def config(self, doc: BrokerDoc) -> BrokerConfig:
        server = doc.server
        identities = {
            self._name(n, "identities"): self.identity(n, v) for n, v in doc.identities.items()
        }
        self._unique(identities, server.client_ca is not None)
        tenants = {
            self._name(n, "tenants"): self.tenant(n, v, identities) for n, v in doc.tenants.items()
        }
        identities = self._default_roles(identities, tenants)
        log_at = doc.audit.log
        if log_at and "://" not in log_at and not Path(log_at).is_absolute():
            log_at = str(self.path.parent / log_at)
        f, r = doc.detectors.attestation_failures, doc.detectors.release_rate
        return BrokerConfig(
            path=self.path,
            host=server.host,
            port=server.port,
            tls_cert=self._file(server.tls_cert, "server.tls_cert", source=False),
            tls_key=self._file(server.tls_key, "server.tls_key", source=False),
            client_ca=(
                None
                if server.client_ca is None
                else self._file(server.client_ca, "server.client_ca", source=False)
            ),
            require_client_cert=server.require_client_cert,
            challenge_ttl=float(doc.challenge_ttl),
            max_challenges=doc.max_challenges,
            max_challenges_per_identity=doc.max_challenges_per_identity,
            identities=identities,
            tenants=tenants,
            warnings=tuple(self.warnings),
            state_url=None if doc.state.url in (None, "memory:") else doc.state.url,
            state_prefix=doc.state.prefix,
            audit_log=log_at or str(self.path.parent / "audit"),
            audit_key=self._resolve(doc.audit.key),
            audit_stream=doc.audit.stream,
            admin_remote=doc.admin.remote,
            metrics_remote=doc.metrics.remote,
            webhook=doc.alerts.webhook,
            detectors=Detectors(
                failures=f.max,
                failure_window=float(f.window),
                lockout=float(f.lockout),
                rate_bucket=float(r.bucket),
                rate_history=r.history,
                rate_factor=float(r.factor),
                rate_floor=r.floor,
                throttle=float(r.throttle),
                evidence_change=doc.detectors.evidence_change,
            ),
            sources=dict(self.sources),
            reload_watch=doc.reload.watch,
            reload_interval=float(doc.reload.interval),
            signing_key=None if doc.signing is None else self.signing_key(doc.signing),
        )

    def signing_key(self, signing: SigningDoc) -> bytes:
        """The pinned Ed25519 public key (raw 32 bytes) that must sign the bundle."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        where = "signing.public_key"
        # Not a source: the key a bundle is checked with is not part of what it signs.
        p = self._file(signing.public_key, where, source=False)
        try:
            key = serialization.load_pem_public_key(p.read_bytes())
        except ValueError:
            key = None
        if not isinstance(key, Ed25519PublicKey):
            raise _Bad(f"{where}: {p} is not a PEM Ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

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

    def identity(self, name: str, d: IdentityDoc) -> Identity:
        where = f"identities.{name}"
        ak = None
        if d.tpm_ak is not None:
            ak_path = self._file(d.tpm_ak, f"{where}.tpm_ak")
            ak = self._bytes(ak_path)
            try:
                serialization.load_pem_public_key(ak)
            except ValueError:
                raise _Bad(f"{where}.tpm_ak: {ak_path} is not a PEM public key") from None
        tokens = tuple(Token(t.sha256, t.not_after) for t in d.tokens)
        if d.token_sha256 is not None:
            tokens = (Token(d.token_sha256), *tokens)
        return Identity(
            name=name,
            token_sha256=d.token_sha256,
            tokens=tokens,
            mtls_spki_sha256=d.mtls_spki_sha256,
            mtls_cn=d.mtls_cn,
            tpm_ak=ak,
            roles=dict(d.roles),
        )

    def tenant(self, name: str, d: TenantDoc, identities: dict[str, Identity]) -> TenantPolicy:
        where = f"tenants.{name}"
        rules = {}
        for art, rule in d.artifacts.items():
            if art != "*":
                self._name(art, f"{where}.artifacts")
            rules[art] = self.rule(f"{where}.artifacts.{art}", rule, identities)
        return TenantPolicy(name, d.keys, rules)

    def rule(self, where: str, d: RuleDoc, identities: dict[str, Identity]) -> ArtifactRule:
        for n in d.identities:
            if n not in identities:
                raise _Bad(f"{where}.identities: {n!r} is not defined under identities")
        if any(release.parse_kind(k)[0] == "tpm" for k in d.evidence):
            for n in d.identities:
                if identities[n].tpm_ak is None:
                    raise _Bad(f"{where}: identity {n!r} sends TPM evidence but has no tpm_ak")
        return ArtifactRule(
            identities=frozenset(d.identities),
            evidence=d.evidence,
            tpm=None if d.tpm is None else self.tpm(f"{where}.tpm", d.tpm),
            snp=None if d.snp is None else self.snp(f"{where}.snp", d.snp),
            tdx=None if d.tdx is None else self.tdx(f"{where}.tdx", d.tdx),
            nvgpu=(
                None if d.nvgpu is None else self.nvidia_gpu(f"{where}.{release.GPU_KIND}", d.nvgpu)
            ),
        )

    def tpm(self, where: str, d: TpmDoc) -> TpmRule:
        policy = PcrPolicy.parse(d.pcrs)
        if d.reference is not None:
            ref: Any = d.reference
            rwhere = f"{where}.reference"
        else:
            assert d.reference_file is not None  # TpmDoc: exactly one
            f = self._file(d.reference_file, f"{where}.reference_file")
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
            try:
                values[index] = bytes.fromhex(v) if isinstance(v, str) else None
            except ValueError:
                values[index] = None
            if values[index] is None or len(values[index]) != size:  # type: ignore[arg-type]
                raise _Bad(f"{rwhere}.{k}: expected a {size}-byte hex string")
        if sorted(values) != list(policy.pcrs):
            raise _Bad(f"{rwhere}: needs a value for each of PCRs {policy.spec} and no other")
        soft = [p for p in policy.pcrs if p in (16, 23)]
        if soft:
            self.warnings.append(
                f"{where}.pcrs: PCR {soft[0]} can be reset by software at locality 0; "
                "it proves nothing about the boot (use it in tests only)"
            )
        return TpmRule(policy, values)  # type: ignore[arg-type]

    def snp(self, where: str, d: SnpDoc) -> snp.SnpReference:
        return snp.SnpReference(
            measurements=d.measurements,
            min_tcb=snp.Tcb(**d.min_tcb.model_dump(exclude_none=True)),
            allow_debug=d.allow_debug,
            max_vmpl=d.max_vmpl,
            host_data=d.host_data,
            revocation=self._snp_crl(d, where),
        )

    def _snp_crl(self, d: SnpDoc, where: str) -> SnpRevocation | None:
        """AMD's CRLs: offline files or a URL template; None when neither is configured."""
        if not d.crl_file and d.crl_url is None:
            return None
        files = tuple(self._file(f, f"{where}.crl_file") for f in d.crl_file)
        contents = tuple(self._bytes(f) for f in files)  # the bytes digested and signed
        for f, data in zip(files, contents, strict=True):
            # its signature is checked against the ARK of each evidence
            try:
                load_crl(data, str(f))
            except AttestationError as exc:
                raise _Bad(f"{where}.crl_file: {exc}") from None
        return SnpRevocation(
            files=files,
            contents=contents,
            url=d.crl_url,
            grace=dt.timedelta(seconds=d.crl_grace),
            cache_dir=None if d.crl_cache is None else self.path.parent / d.crl_cache,
        )

    def tdx(self, where: str, d: TdxDoc) -> tdx.TdxReference:
        assert d.collateral is not None  # TdxDoc: required
        return tdx.TdxReference(
            mrtd=d.mrtd,
            rtmrs=dict(d.rtmrs),
            mrconfigid=d.mrconfigid,
            allow_debug=d.allow_debug,
            **self.tdx_collateral(f"{where}.collateral", d.collateral),
        )

    def tdx_collateral(self, where: str, d: CollateralDoc) -> dict[str, Any]:
        from sealstore.enclave.attestation import tdx_collateral, tdx_pccs

        source: tdx_pccs.CollateralSource
        if d.dir is not None:
            folder = self._resolve(d.dir)
            if not folder.is_dir():
                raise _Bad(f"{where}.dir: expected an existing folder")
            # Read now, as sources: signed with the config, watched, and a
            # change only takes effect through a reload (never read live).
            names = sorted(
                q.name for q in folder.iterdir() if _COLLATERAL.fullmatch(q.name) and q.is_file()
            )
            files = {n: self._bytes(self._file(str(folder / n), f"{where}.dir")) for n in names}
            source = tdx_pccs.CollateralDir(folder, files=files)
        else:
            ca = None if d.pccs_ca is None else self._file(d.pccs_ca, f"{where}.pccs_ca")
            try:
                source = tdx_pccs.Pccs(str(d.pccs_url), ca_file=ca)
            except (ValueError, OSError) as exc:
                raise _Bad(f"{where}.pccs_url: {exc}") from None
        try:
            policy = tdx_collateral.TcbPolicy(
                accept=frozenset(d.accept),
                grace=dt.timedelta(hours=d.grace_hours),
                min_evaluation=d.min_evaluation,
            )
        except ValueError as exc:
            raise _Bad(f"{where}.accept: {exc}") from None
        return {"collateral": source, "policy": policy}

    def nvidia_gpu(self, where: str, d: GpuDoc) -> nvgpu.GpuReference:
        at = d.rims_valid_at
        if at is not None:
            self.warnings.append(
                f"{where}.rims_valid_at: the RIM signers' certificates are "
                f"checked as of {at:%Y-%m-%d %H:%M} UTC, not now"
            )
        rims = {}
        for key in ("driver_rims", "vbios_rims"):
            loaded = []
            for i, f in enumerate(getattr(d, key)):
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
        return nvgpu.GpuReference(
            driver_rims=rims["driver_rims"],
            vbios_rims=rims["vbios_rims"],
            min_driver=d.min_driver,
            min_vbios=d.min_vbios,
            modes=d.modes,
            gpus=d.gpus,
        )
