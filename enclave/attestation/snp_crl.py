"""AMD's certificate revocation lists for SEV-SNP: verified to the pinned root, kept fresh.

AMD's key distribution service publishes, per product line, a CRL signed by
that line's ARK (``https://kdsintf.amd.com/vcek/v1/{Milan,Genoa,Turin}/crl``
for the VCEK chain, ``/vlek/v1/.../crl`` for the VLEK chain). Its entries
are serial numbers of certificates the ARK issued: the ASKs and ASVKs.
AMD has revoked one key so far (Genoa's first ASK, serial 0x020001).

A CRL only counts if the ARK that was pinned for the evidence signed it
(RSASSA-PSS, SHA-384, MGF1-SHA-384, 48-byte salt: how AMD signs) and it is
fresh: ``thisUpdate <= at <= nextUpdate + grace``. Once revocation is
configured, every check fails closed -- no CRL for the product, a CRL that
does not verify, or one past its grace, refuses the evidence, because a
verifier that quietly skips revocation when the list is missing is a
verifier an attacker can blind by blocking one URL.

A CRL names certificates of its own issuer only (RFC 5280), so an ARK's
CRL revokes an ASK or ASVK; a VCEK or VLEK (issued by the ASK/ASVK) is
revoked by a CRL its ASK/ASVK signed. AMD publishes none of those, but an
operator who holds one can supply it as a file, and it is applied the same
way.

The parsing and signature checks are pyca/cryptography's; what is written
here is AMD's profile (who must sign, which algorithm, which extensions a
complete list may carry) and the freshness and caching rules.
"""

from __future__ import annotations

import datetime as dt
import http.client
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID

from sealstore.enclave.attestation.certs import common_name
from sealstore.errors import AttestationError

__all__ = ["KDS_CRL_URL", "SnpRevocation", "check_crl", "load_crl"]

log = logging.getLogger("sealstore.snp")

# The template a URL source fills in: {key} is "vcek" or "vlek", {product} the line.
KDS_CRL_URL = "https://kdsintf.amd.com/{key}/v1/{product}/crl"

_MAX_CRL = 1 << 20  # AMD's are under 1 KiB; refuse a server that sends megabytes
_SKEW = dt.timedelta(minutes=5)  # a CRL issued a moment "in the future" by our clock
_RETRY_S = 60.0  # after a failed fetch, do not hammer the server on every request
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def load_crl(data: bytes, where: str = "CRL") -> x509.CertificateRevocationList:
    """Parse a CRL, DER or PEM.

    Raises:
        AttestationError: not a CRL (code ``snp-crl-invalid``).
    """
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise AttestationError(f"{where} is not an X.509 CRL: {exc}", "snp-crl-invalid") from None


def check_crl(
    crl: x509.CertificateRevocationList,
    issuer: x509.Certificate,
    at: dt.datetime,
    grace: dt.timedelta,
    where: str = "the CRL",
) -> None:
    """Refuse *crl* unless *issuer* signed it as AMD signs and it is fresh at *at*.

    Raises:
        AttestationError: ``snp-crl-invalid`` (wrong issuer, algorithm,
            signature, or a partial list), ``snp-crl-stale`` (outside
            ``thisUpdate .. nextUpdate + grace``).
    """
    name = common_name(issuer) or "its issuer"
    if crl.issuer != issuer.subject:
        raise AttestationError(
            f"{where} is issued by {crl.issuer.rfc4514_string()}, not {name}", "snp-crl-invalid"
        )
    public = issuer.public_key()
    if crl.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
        public, rsa.RSAPublicKey
    ):
        raise AttestationError(
            f"{where} is not signed with RSASSA-PSS by an RSA key, as AMD signs", "snp-crl-invalid"
        )
    try:
        public.verify(crl.signature, crl.tbs_certlist_bytes, _PSS, hashes.SHA384())
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        raise AttestationError(f"{where} is not signed by {name}", "snp-crl-invalid") from None
    # A delta CRL or one scoped by an issuing distribution point lists only part
    # of the revocations: "not listed" would then not mean "not revoked".
    for ext in crl.extensions:
        if ext.oid in (ExtensionOID.DELTA_CRL_INDICATOR, ExtensionOID.ISSUING_DISTRIBUTION_POINT):
            raise AttestationError(f"{where} is not a complete CRL", "snp-crl-invalid")
        if ext.critical and ext.oid not in (
            ExtensionOID.CRL_NUMBER,
            ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ):
            raise AttestationError(
                f"{where} has an unknown critical extension {ext.oid.dotted_string}",
                "snp-crl-invalid",
            )
    nxt = crl.next_update_utc
    if nxt is None:
        raise AttestationError(f"{where} has no nextUpdate", "snp-crl-invalid")
    if at + _SKEW < crl.last_update_utc or at > nxt + grace:
        raise AttestationError(
            f"{where} is for {crl.last_update_utc:%Y-%m-%d} to {nxt:%Y-%m-%d} "
            f"(+{grace}), not {at:%Y-%m-%d %H:%M} UTC",
            "snp-crl-stale",
        )


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return -1


@dataclass
class _Cached:
    der: bytes
    crl: x509.CertificateRevocationList


@dataclass
class SnpRevocation:
    """Where an SEV-SNP verifier gets AMD's CRLs, and the CRLs it has verified.

    Exactly one source: *files* (CRLs kept offline and replaced by the
    operator; read once, when this object is made: a replaced file takes
    effect in a new ``SnpRevocation``, i.e. through a broker reload, which
    checks it and can refuse it) or *url* (a template with
    ``{product}`` and ``{key}``, fetched when the cached list is past its
    nextUpdate, and kept in *cache_dir* across restarts if given).

    Args:
        files: CRL files (DER or PEM), any product line; the ARK that issued
            each picks the product it applies to.
        contents: the files' bytes, as already read (the broker config hands
            the bytes it read, digested and signed); default: read *files* now.
        url: e.g. ``KDS_CRL_URL``.
        grace: how long past nextUpdate a CRL is still accepted (a KDS
            outage, an offline file not yet replaced).
        cache_dir: where fetched CRLs are stored (verified again when read).
        timeout: seconds a fetch may take.
    """

    files: tuple[Path, ...] = ()
    url: str | None = None
    grace: dt.timedelta = dt.timedelta(0)
    cache_dir: Path | None = None
    timeout: float = 10.0
    contents: tuple[bytes, ...] = field(default=(), repr=False, compare=False)
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )
    _data: dict[Path, bytes | OSError] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _read: dict[Path, x509.CertificateRevocationList] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _fetched: dict[str, _Cached] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _down: dict[str, tuple[float, AttestationError]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if bool(self.files) == (self.url is not None):
            raise ValueError("give CRL files or a CRL URL, not both nor neither")
        if self.url is not None and not self.url.startswith(("https://", "http://")):
            raise ValueError(f"the CRL URL must be http(s): {self.url!r}")
        self.files = tuple(Path(p) for p in self.files)
        if self.contents and len(self.contents) != len(self.files):
            raise ValueError("give the bytes of every CRL file, or of none")
        for i, path in enumerate(self.files):
            if self.contents:
                self._data[path] = bytes(self.contents[i])
                continue
            try:
                self._data[path] = path.read_bytes()
            except OSError as exc:  # refused when a check needs it: fail closed
                self._data[path] = exc

    def check(
        self,
        product: str,
        signing_key: str,
        chain: Sequence[tuple[x509.Certificate, x509.Certificate, str]],
        at: dt.datetime,
    ) -> None:
        """Refuse the chain if a certificate in it is revoked.

        Args:
            product: the product line the pinned ARK is for ("Milan"...).
            signing_key: "vcek" or "vlek" (which of AMD's lists to fetch).
            chain: ``(certificate, its issuer, what)`` links, already verified,
                the first issued by the ARK (the ASK or ASVK).
            at: the time the CRL must be fresh at.

        Raises:
            AttestationError: ``snp-revoked``, or the CRL could not be had or
                trusted: ``snp-crl-missing``, ``snp-crl-unavailable``,
                ``snp-crl-invalid``, ``snp-crl-stale``.
        """
        ark = chain[0][1]
        ark_lists = self._for_ark(product, signing_key, ark, at)
        for cert, issuer, what in chain:
            lists = ark_lists if issuer is ark else self._from_files(issuer, at)
            for crl in lists:
                entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
                if entry is not None:
                    raise AttestationError(
                        f"the {what} certificate (serial {cert.serial_number:#x}) was revoked by "
                        f"{common_name(issuer)} on {entry.revocation_date_utc:%Y-%m-%d}",
                        "snp-revoked",
                    )

    # -- the ARK's list ------------------------------------------------------
    def _for_ark(
        self, product: str, key: str, ark: x509.Certificate, at: dt.datetime
    ) -> list[x509.CertificateRevocationList]:
        if self.url is None:
            lists = self._from_files(ark, at)
            if not lists:
                raise AttestationError(
                    f"revocation is configured but no CRL file is issued by {common_name(ark)}",
                    "snp-crl-missing",
                )
            return lists
        return [self._from_url(product, key, ark, at)]

    def _from_files(
        self, issuer: x509.Certificate, at: dt.datetime
    ) -> list[x509.CertificateRevocationList]:
        """The file CRLs *issuer* issued, each verified (a bad one refuses: fail closed)."""
        out = []
        for path in self.files:
            crl = self._read_file(path)
            if crl.issuer == issuer.subject:
                check_crl(crl, issuer, at, self.grace, f"the CRL {path.name}")
                out.append(crl)
        return out

    def _read_file(self, path: Path) -> x509.CertificateRevocationList:
        """The CRL in *path* as read when this object was made (never read again)."""
        with self._lock:
            seen = self._read.get(path)
        if seen is not None:
            return seen
        data = self._data[path]
        if isinstance(data, OSError):
            raise AttestationError(
                f"the CRL file {path} cannot be read: {data.strerror}", "snp-crl-missing"
            )
        crl = load_crl(data, f"the CRL {path.name}")
        with self._lock:
            self._read[path] = crl
        return crl

    def _from_url(
        self, product: str, key: str, ark: x509.Certificate, at: dt.datetime
    ) -> x509.CertificateRevocationList:
        assert self.url is not None
        url = self.url.format(product=product, key=key)
        slot = f"{key}-{product}"
        with self._lock:  # one fetch at a time: requests wait for it, not race it
            cached = self._fetched.get(slot) or self._load_cache(slot)
            if cached is not None:
                try:
                    check_crl(cached.crl, ark, at, dt.timedelta(0), f"the CRL from {url}")
                    self._fetched[slot] = cached
                    return cached.crl  # before its nextUpdate: no need to ask again
                except AttestationError as exc:
                    if exc.code != "snp-crl-stale":
                        cached = None  # a cache file that does not verify is no cache
            problem = self._down.get(slot)
            if problem is None or time.monotonic() >= problem[0]:
                try:
                    got = self._fetch(url, ark, at)
                except AttestationError as exc:
                    # Remembered a while: with the server down, each request would
                    # otherwise wait out the timeout again, holding the others.
                    problem = (time.monotonic() + _RETRY_S, exc)
                    self._down[slot] = problem
                else:
                    problem = None
                    self._down.pop(slot, None)
                    if cached is None or _crl_number(got.crl) >= _crl_number(cached.crl):
                        cached = got  # never step back to an older list a server replays
                        self._store_cache(slot, got.der)
            if cached is None:
                assert problem is not None
                raise problem[1]
            self._fetched[slot] = cached
        # The cached list may be past nextUpdate; within the grace it still
        # counts, past it check_crl refuses (snp-crl-stale).
        check_crl(cached.crl, ark, at, self.grace, f"the CRL from {url}")
        if problem is not None:
            log.warning("using the cached SEV-SNP CRL for %s: %s", slot, problem[1])
        return cached.crl

    def _fetch(self, url: str, ark: x509.Certificate, at: dt.datetime) -> _Cached:
        req = urllib.request.Request(url, headers={"User-Agent": "sealstore"})  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (http/s)
                der = resp.read(_MAX_CRL + 1)
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            # HTTPException: a server answering garbage (BadStatusLine, IncompleteRead).
            why = getattr(exc, "reason", None) or _why(exc)
            raise AttestationError(
                f"the CRL cannot be fetched from {url}: {why}", "snp-crl-unavailable"
            ) from None
        if len(der) > _MAX_CRL:
            raise AttestationError(f"{url} sent more than {_MAX_CRL} bytes", "snp-crl-invalid")
        crl = load_crl(der, f"the CRL from {url}")
        # Verified before it may replace anything: a server (or whoever sits
        # between) cannot swap in a list the ARK did not sign.
        check_crl(crl, ark, at, self.grace, f"the CRL from {url}")
        return _Cached(der, crl)

    # -- the disk cache ------------------------------------------------------
    def _cache_path(self, slot: str) -> Path | None:
        return None if self.cache_dir is None else Path(self.cache_dir) / f"{slot}.crl"

    def _load_cache(self, slot: str) -> _Cached | None:
        path = self._cache_path(slot)
        if path is None or not path.is_file():
            return None
        try:
            der = path.read_bytes()
            return _Cached(der, load_crl(der, f"the cached CRL {path}"))
        except (OSError, AttestationError) as exc:
            log.warning("ignoring the cached SEV-SNP CRL %s: %s", path, exc)
            return None

    def _store_cache(self, slot: str, der: bytes) -> None:
        path = self._cache_path(slot)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(der)
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot keep the SEV-SNP CRL in %s: %s", path, exc)


def _why(exc: Exception) -> object:
    """What went wrong, in one line: an HTTPException may carry the server's raw bytes."""
    return type(exc).__name__ if isinstance(exc, http.client.HTTPException) else exc
