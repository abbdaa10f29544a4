"""Where TDX collateral comes from: files in the PCS v4 formats, or a PCCS over HTTP(S).

Both sources hand ``tdx_collateral.appraise`` the bytes exactly as Intel's
PCS v4 API serves them; nothing here is trusted: signatures, chains and
freshness are checked there.

A folder of files (``CollateralDir``)::

    tcb-info-<fmspc>.json                 # /tdx/certification/v4/tcb?fmspc=<fmspc> (lower-case hex)
    tcb-info-<fmspc>.issuer-chain.pem     # its TCB-Info-Issuer-Chain header
    qe-identity.json                      # /tdx/certification/v4/qe/identity
    qe-identity.issuer-chain.pem          # its SGX-Enclave-Identity-Issuer-Chain header
    pck-crl-platform.crl                  # /sgx/certification/v4/pckcrl?ca=platform (DER/PEM/hex)
    pck-crl-processor.crl                 # ... ?ca=processor
    root-ca-crl.crl                       # /sgx/certification/v4/rootcacrl

A PCCS (``Pccs``): the same four endpoints, fetched on demand and kept until
each item's own ``nextUpdate``, but only once the set verified (signatures to
the pinned root, fresh): an answer that did not verify is fetched again. The
fetch uses the standard library (``urllib``): four GETs with a timeout need
nothing more.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from sealstore.enclave.attestation.tdx_collateral import Collateral, load_crl
from sealstore.errors import AttestationError

__all__ = ["CollateralDir", "CollateralSource", "Pccs"]

_CAS = ("platform", "processor")
_TIMEOUT = 10.0
_MAX_BODY = 4 * 1024 * 1024


class CollateralSource(Protocol):
    """Gives the collateral for a platform: its FMSPC and the CA that issued its PCK."""

    def collateral(self, fmspc: str, ca: str, at: dt.datetime) -> Collateral: ...


def _ca(ca: str) -> str:
    if ca not in _CAS:
        raise AttestationError(
            f"the PCK is issued by an unknown CA {ca!r}", "tdx-collateral-mismatch"
        )
    return ca


class CollateralDir:
    """Collateral from a folder laid out as in the module doc.

    Args:
        path: the folder.
        files: its files' bytes by name, as already read (the broker config
            reads them at load, so they are signed and watched, and a change
            takes effect only through a reload); default: read on demand.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, files: Mapping[str, bytes] | None = None
    ) -> None:
        self.path = Path(path)
        self.files = None if files is None else dict(files)

    def __repr__(self) -> str:
        return f"CollateralDir({str(self.path)!r})"

    def _read(self, name: str) -> bytes:
        p = self.path / name
        if self.files is not None:
            if name not in self.files:
                raise AttestationError(
                    f"TDX collateral {p} was not there when the config was loaded",
                    "tdx-collateral-unavailable",
                )
            return self.files[name]
        try:
            return p.read_bytes()
        except OSError as exc:
            raise AttestationError(
                f"TDX collateral {p} cannot be read: {exc.strerror or exc}",
                "tdx-collateral-unavailable",
            ) from None

    def collateral(self, fmspc: str, ca: str, at: dt.datetime) -> Collateral:
        """The files for *fmspc* and *ca* (*at* is unused: files are what they are).

        Raises:
            AttestationError: code tdx-collateral-unavailable (a file is missing).
        """
        fmspc = fmspc.lower()
        return Collateral(
            tcb_info=self._read(f"tcb-info-{fmspc}.json"),
            tcb_info_chain=self._read(f"tcb-info-{fmspc}.issuer-chain.pem"),
            qe_identity=self._read("qe-identity.json"),
            qe_identity_chain=self._read("qe-identity.issuer-chain.pem"),
            pck_crl=self._read(f"pck-crl-{_ca(ca)}.crl"),
            root_crl=self._read("root-ca-crl.crl"),
        )


class Pccs:
    """Collateral fetched from a PCCS (or Intel's PCS), cached, once verified, until nextUpdate.

    Args:
        url: the service's base URL, e.g. ``https://pccs.internal:8081`` (the
            ``/sgx|tdx/certification/v4/...`` paths are appended).
        ca_file: a PEM bundle to trust for an ``https`` URL (default: the
            system's).
        timeout: seconds per request.
    """

    def __init__(
        self, url: str, *, ca_file: str | os.PathLike[str] | None = None, timeout: float = _TIMEOUT
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"a PCCS URL must be http(s)://HOST[:PORT][/PATH], not {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._ctx = ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file else None)
        self._cache: dict[str, tuple[bytes, bytes, dt.datetime]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Pccs({self.url!r})"

    def _get(
        self,
        path: str,
        chain_header: str | None,
        at: dt.datetime,
        next_update: _NextUpdate,
        pending: dict[str, tuple[bytes, bytes, dt.datetime]],
    ) -> tuple[bytes, bytes]:
        with self._lock:
            hit = self._cache.get(path)
        if hit is not None and at < hit[2]:
            return hit[0], hit[1]
        url = self.url + path
        try:
            with urllib.request.urlopen(url, timeout=self.timeout, context=self._ctx) as resp:  # noqa: S310
                body = resp.read(_MAX_BODY + 1)
                chain = resp.headers.get(chain_header, "") if chain_header else ""
        except urllib.error.HTTPError as exc:
            raise AttestationError(
                f"the PCCS answered {exc.code} for {path}", "tdx-collateral-unavailable"
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            # HTTPException: a server that answers, but not in HTTP (BadStatusLine,
            # IncompleteRead...): as unavailable as one that does not answer.
            reason = getattr(exc, "reason", None) or (
                type(exc).__name__ if isinstance(exc, http.client.HTTPException) else exc
            )
            raise AttestationError(
                f"the PCCS at {self.url} cannot be reached: {reason}", "tdx-collateral-unavailable"
            ) from None
        if len(body) > _MAX_BODY:
            raise AttestationError(
                f"the PCCS answer for {path} is too large", "tdx-collateral-format"
            )
        if chain_header and not chain:
            raise AttestationError(
                f"the PCCS answer for {path} lacks its {chain_header} header",
                "tdx-collateral-format",
            )
        pem = urllib.parse.unquote(chain).encode("ascii", "replace")
        # Kept aside, and cached (until the item's own nextUpdate) only once
        # appraise has verified the whole set: a forged or stale answer is
        # never served again from the cache.
        until = next_update(body)
        if until is not None:
            pending[path] = (body, pem, until)
        return body, pem

    def _keep(self, pending: dict[str, tuple[bytes, bytes, dt.datetime]]) -> None:
        with self._lock:
            self._cache.update(pending)

    def collateral(self, fmspc: str, ca: str, at: dt.datetime) -> Collateral:
        """Fetch (or take from the cache) the collateral for *fmspc* and *ca*.

        Raises:
            AttestationError: code tdx-collateral-unavailable (unreachable, an
                HTTP error) or tdx-collateral-format (a response without its
                issuer chain).
        """
        fmspc = fmspc.lower()
        pending: dict[str, tuple[bytes, bytes, dt.datetime]] = {}
        tcb, tcb_chain = self._get(
            f"/tdx/certification/v4/tcb?fmspc={fmspc}",
            "TCB-Info-Issuer-Chain",
            at,
            _json_next("tcbInfo"),
            pending,
        )
        qe, qe_chain = self._get(
            "/tdx/certification/v4/qe/identity",
            "SGX-Enclave-Identity-Issuer-Chain",
            at,
            _json_next("enclaveIdentity"),
            pending,
        )
        pck_crl, _ = self._get(
            f"/sgx/certification/v4/pckcrl?ca={_ca(ca)}&encoding=der", None, at, _crl_next, pending
        )
        root_crl, _ = self._get("/sgx/certification/v4/rootcacrl", None, at, _crl_next, pending)
        return Collateral(
            tcb, tcb_chain, qe, qe_chain, pck_crl, root_crl, lambda: self._keep(pending)
        )


class _NextUpdate(Protocol):
    def __call__(self, body: bytes) -> dt.datetime | None: ...


def _json_next(key: str) -> _NextUpdate:
    def next_update(body: bytes) -> dt.datetime | None:
        try:
            when = json.loads(body)[key]["nextUpdate"]
            return dt.datetime.fromisoformat(when.replace("Z", "+00:00")).astimezone(dt.UTC)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    return next_update


def _crl_next(body: bytes) -> dt.datetime | None:
    try:
        return load_crl(body, "CRL").next_update_utc
    except AttestationError:
        return None
