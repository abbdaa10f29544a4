"""``broker+https://HOST:PORT/TENANT/ARTIFACT`` -- keys the broker releases after attestation.

Wrapping needs no broker: ``?key=URI`` names one of the tenant's keys (the
same URI as in the broker's ``keys:`` list), the DEK is wrapped by that key
under the encryption context plus the release scope, and the slot records
the broker, tenant and artifact. The publisher needs only the right to wrap
(Vault ``encrypt``, KMS ``Encrypt``, the keyring).

Unwrapping is the protocol in ``release``: a challenge, evidence bound to
the nonce and a fresh X25519 key, the DEK back sealed with HPKE to that key
and that challenge (``release.open_answer``). The evidence is the first kind
the broker accepts that this machine can give (or
``evidence=`` / ``SEALSTORE_EVIDENCE``): a TPM quote (``SEALSTORE_TPM_TCTI``,
else /dev/tpmrm0), an SEV-SNP report or TDX quote (configfs-tsm). A kind
joined with ``+nvidia-gpu`` adds every GPU's attestation report, from
``gpu_evidence=`` (a collector: nonce -> reports) or the JSON file named by
``SEALSTORE_GPU_EVIDENCE``, else from NVML (the ``nvgpu`` extra, on a machine
whose GPUs are in confidential-computing mode).

Credentials never sit in the URI or the file: a bearer token from ``token=``,
``SEALSTORE_BROKER_TOKEN`` or the file named by ``SEALSTORE_BROKER_TOKEN_FILE``;
a client certificate from ``SEALSTORE_BROKER_CERT`` / ``SEALSTORE_BROKER_KEY``;
the broker's CA from ``SEALSTORE_BROKER_CACERT`` (else the system's). A slot
is not authenticated, so opening a file by its slot only talks to a broker
the user named in ``SEALSTORE_BROKERS`` (comma-separated ``https://HOST:PORT``).
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import nacl.public

from sealstore.enclave.broker import release
from sealstore.errors import (
    AttestationError,
    AuthenticationError,
    BackendError,
    FormatError,
    KeyReleaseDenied,
    KeyUnavailable,
)
from sealstore.format import canonical_json
from sealstore.keys import DEK_SIZE, DataKey, KeySlot, Refusal
from sealstore.vault.manifest import check_name

__all__ = ["BrokerKey"]

_TIMEOUT = 30


def _split_key(query: str) -> tuple[str, str | None]:
    """``"evidence=tpm&key=URI"`` -> ``("evidence=tpm", "URI")``; the key's URI is taken whole."""
    if query.startswith("key="):
        return "", query[4:]
    options, sep, inner = query.partition("&key=")
    return options, (inner if sep else None)


def _origin(url: str) -> str:
    """``https://HOST:PORT``, normalised (default port 443, IPv6 in brackets, lower case)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", release.SLOT_KIND) or not parts.hostname:
        raise ValueError(f"not an https origin: {url!r}")
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    return f"https://{host}:{parts.port or 443}"


class BrokerKey:
    """One artifact's key at one broker: a wrapper (through a tenant key) and an unwrapper.

    Raises (from ``unwrap``):
        KeyReleaseDenied: the broker refused; the message carries its code
            (``tpm-pcr-mismatch``, ``challenge-unknown``, ``not-permitted``, ...).
        AttestationError: this machine could not produce the evidence asked for.
        BackendError: the broker is unreachable, its TLS certificate does not
            verify, or it failed; or it cannot decide now (503:
            ``state-unavailable``, ``audit-unavailable``, ``busy``), the code
            in the message.
    """

    def __init__(
        self,
        uri: str,
        *,
        key: str | None = None,
        token: str | None = None,
        cert: str | None = None,
        client_key: str | None = None,
        cacert: str | None = None,
        evidence: str | None = None,
        tcti: str | None = None,
        tsm_root: str | None = None,
        gpu_evidence: str | Callable[[bytes], list[dict[str, Any]]] | None = None,
    ) -> None:
        parts = urlsplit(uri)
        segs = parts.path.strip("/").split("/")
        if parts.scheme != release.SLOT_KIND or not parts.hostname or len(segs) != 2:
            raise ValueError(
                f"not a broker key URI (broker+https://HOST[:PORT]/TENANT/ARTIFACT): {uri!r}"
            )
        self.tenant = check_name(segs[0], "the URI's tenant")
        self.artifact = check_name(segs[1], "the URI's artifact")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.origin = _origin(f"https://{parts.netloc}")
        self.key_id = f"{release.SLOT_KIND}://{parts.netloc}/{self.tenant}/{self.artifact}"
        # key= comes last and takes the rest verbatim: a key URI has its own
        # query (?tls=false&namespace=NS) that must not be split here.
        options, inner_q = _split_key(parts.query)
        query = parse_qs(options, keep_blank_values=True)
        unknown = sorted(set(query) - {"evidence"})
        if unknown:
            raise ValueError(f"{uri!r}: unknown option {unknown[0]!r} (known: evidence, key)")
        self._inner = key or (unquote(inner_q) if inner_q else None)
        self._evidence = evidence or (query.get("evidence") or [None])[0]
        self._evidence = self._evidence or os.environ.get("SEALSTORE_EVIDENCE") or None
        if self._evidence is not None:
            release.parse_kind(self._evidence)  # ValueError naming the kinds
        self._gpu_evidence = gpu_evidence or os.environ.get("SEALSTORE_GPU_EVIDENCE") or None
        self._token = token
        self._cert = cert or os.environ.get("SEALSTORE_BROKER_CERT")
        self._client_key = client_key or os.environ.get("SEALSTORE_BROKER_KEY")
        self._cacert = cacert or os.environ.get("SEALSTORE_BROKER_CACERT")
        self._tcti = tcti
        self._tsm_root = tsm_root

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> BrokerKey:
        return cls(uri, **options)

    @classmethod
    def unwrapper_for_slot(cls, slot: KeySlot) -> BrokerKey | Refusal:
        """The broker a slot names -- only if the user named it in ``SEALSTORE_BROKERS``."""
        try:
            key = cls(slot.key_id)
        except ValueError as exc:
            return Refusal(f"malformed broker slot: {exc}")
        trusted = set()
        for entry in os.environ.get("SEALSTORE_BROKERS", "").split(","):
            try:
                trusted.add(_origin(entry.strip().rstrip("/")))
            except ValueError:
                continue
        if key.origin not in trusted:
            return Refusal(
                f"{slot.key_id}: {key.origin} is not in SEALSTORE_BROKERS; "
                "not sending credentials and evidence to a broker the file names"
            )
        return key

    def __repr__(self) -> str:
        return f"BrokerKey({self.key_id!r})"

    def __reduce__(self) -> Any:
        raise TypeError("broker keys cannot be pickled (they carry credentials)")

    # -- wrap ---------------------------------------------------------------
    def wrap(self, dek: DataKey, context: Mapping[str, str]) -> KeySlot:
        """Wrap *dek* with the tenant key named by ``?key=``, scoped to this artifact."""
        from sealstore.kms.registry import wrapper_for

        if not self._inner:
            raise ValueError(
                f"{self.key_id}: name the tenant key the broker unwraps with: "
                f"{self.key_id}?key=URI (one of the tenant's keys in the broker config)"
            )
        if self._inner.startswith(release.SLOT_KIND):
            raise ValueError("a broker key cannot wrap through another broker key")
        inner = wrapper_for(self._inner).wrap(
            dek, release.scoped_context(context, self.tenant, self.artifact)
        )
        return KeySlot(
            release.SLOT_KIND,
            self.key_id,
            canonical_json(inner.to_json()),
            {"tenant": self.tenant, "artifact": self.artifact},
        )

    # -- unwrap -------------------------------------------------------------
    def can_unwrap(self, slot: KeySlot) -> bool:
        return slot.kind == release.SLOT_KIND and slot.key_id == self.key_id

    def unwrap(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey:
        """Have the broker release the DEK of *slot* to this machine (see the module doc)."""
        if not self.can_unwrap(slot):
            raise KeyUnavailable(f"slot was not made for {self.key_id}")
        try:
            inner = json.loads(slot.blob)
        except (ValueError, UnicodeDecodeError):
            raise KeyUnavailable(f"{self.key_id}: the slot's wrapped key is damaged") from None
        ch = self._post("/v1/challenge", {"tenant": self.tenant, "artifact": self.artifact})
        nonce = release.b64d(ch.get("nonce"), "the broker's nonce")
        offered = ch.get("evidence")
        if not isinstance(offered, list):
            raise BackendError(f"broker {self.origin} sent a malformed challenge")
        kind = self._pick(offered)
        secret = nacl.public.PrivateKey.generate()
        public = bytes(secret.public_key)
        cpu, gpu = release.parse_kind(kind)
        evidence = self._collect(cpu, release.binding(nonce, public, cpu), ch)
        if gpu:
            gpus = self._collect_gpus(release.binding(nonce, public, release.GPU_KIND))
            evidence = {**evidence, "kind": kind, release.GPU_KIND: gpus}
        out = self._post(
            "/v1/release",
            {
                "tenant": self.tenant,
                "artifact": self.artifact,
                "nonce": ch["nonce"],
                "public_key": release.b64e(public),
                "evidence": evidence,
                "slot": inner,
                "context": dict(context),
            },
        )
        try:
            raw = release.open_answer(
                out, bytes(secret), nonce=nonce, tenant=self.tenant, artifact=self.artifact
            )
        except FormatError as exc:
            raise BackendError(f"broker {self.origin} {exc}") from None
        except AuthenticationError:
            raise BackendError(f"broker {self.origin} sent a key that does not open") from None
        if len(raw) != DEK_SIZE:
            raise KeyUnavailable(f"broker {self.origin} released a key of the wrong size")
        return DataKey(raw)

    def _pick(self, offered: list[Any]) -> str:
        if self._evidence is not None:
            if self._evidence not in offered:
                raise KeyReleaseDenied(
                    f"{self.key_id}: the broker does not accept {self._evidence} evidence "
                    f"(it accepts: {', '.join(map(str, offered))})"
                )
            return self._evidence
        for kind in offered:
            try:
                cpu, gpu = release.parse_kind(kind)
            except ValueError:
                continue  # a kind this client does not know
            if gpu and not self._has_gpu_evidence():
                continue
            if cpu == "tpm" and (
                self._tcti or os.environ.get("SEALSTORE_TPM_TCTI") or Path("/dev/tpmrm0").exists()
            ):
                return kind
            if cpu in ("snp", "tdx"):
                from sealstore.enclave.attestation import tsm

                root = self._tsm_root or os.environ.get("SEALSTORE_TSM_ROOT") or tsm.TSM_ROOT
                if Path(root).is_dir():
                    return kind
        raise AttestationError(
            f"{self.key_id}: the broker accepts {', '.join(map(str, offered))} evidence, "
            "and this machine has none of them (no TPM, no configfs-tsm, no GPU evidence)",
            "evidence-unavailable",
        )

    def _has_gpu_evidence(self) -> bool:
        if self._gpu_evidence is not None:
            return True
        import importlib.util

        return importlib.util.find_spec("pynvml") is not None

    def _collect_gpus(self, nonce: bytes) -> list[dict[str, str]]:
        """Every GPU's report for *nonce* with its chain, base64, as the broker takes them."""
        from sealstore.enclave.attestation import nvgpu

        source = self._gpu_evidence
        if callable(source):
            collect = source
        elif isinstance(source, str):
            collect = nvgpu.file_collector(source)
        else:
            collect = nvgpu.collect_nvml
        out = []
        for item in collect(nonce):
            out.append(
                {"report": release.b64e(item["report"]), "certs": release.b64e(item["certs"])}
            )
        if not out:
            raise AttestationError("no GPU gave an attestation report", "evidence-unavailable")
        return out

    def _collect(self, kind: str, bound: bytes, ch: Mapping[str, Any]) -> dict[str, Any]:
        if kind == "tpm":
            from sealstore.enclave.attestation import tpm, tpm_quote

            spec = ch.get("tpm_pcrs")
            if not isinstance(spec, str):
                raise BackendError(f"broker {self.origin} asked for a TPM quote without PCRs")
            try:
                policy = tpm.PcrPolicy.parse(spec)
            except ValueError:
                raise BackendError(f"broker {self.origin} asked for PCRs {spec!r}") from None
            q = tpm_quote.quote(bound, policy, self._tcti)
            return {
                "kind": "tpm",
                "attest": release.b64e(q.attest),
                "signature": release.b64e(q.signature),
                "pcrs": {str(k): v.hex() for k, v in q.pcrs.items()},
            }
        from sealstore.enclave.attestation import tsm

        ev = tsm.collect(bound, root=self._tsm_root)
        if ev.kind != kind:
            raise AttestationError(
                f"configfs-tsm gave {ev.kind} evidence, not {kind}", "tsm-format"
            )
        if kind == "tdx":
            return {"kind": "tdx", "quote": release.b64e(ev.blob)}
        if not ev.certs:
            raise AttestationError(
                "the SEV-SNP report came without its certificates (no auxblob)", "cert-chain"
            )
        certs = {k: release.b64e(v) for k, v in ev.certs.items()}
        return {"kind": "snp", "report": release.b64e(ev.blob), "certs": certs}

    # -- standing -----------------------------------------------------------
    def standing(self) -> tuple[str, str]:
        """``("ok", "")``, or ``("locked-down" | "locked-out", reason)``: whether incident
        response at the broker has stopped this identity in this tenant.

        Raises:
            KeyReleaseDenied: the broker refused to answer (no role in the tenant).
            BackendError: the broker is unreachable or failed.
        """
        out = self._post("/v1/standing", {"tenant": self.tenant})
        state, reason = out.get("standing"), out.get("reason")
        if not isinstance(state, str) or not isinstance(reason, str):
            raise BackendError(f"broker {self.origin} gave a malformed standing answer")
        return state, reason

    def _token_value(self) -> str | None:
        return bearer_token(self._token)

    @functools.cached_property
    def _tls(self) -> ssl.SSLContext:
        """The TLS context, made once: its CA and client certificate are fixed at construction."""
        return client_context(self._cacert, self._cert, self._client_key)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, obj = https_json(
            self.host, self.port, self._tls, "POST", path, body, self._token_value()
        )
        if status == 200 and isinstance(obj, dict):
            return obj
        code = obj.get("error") if isinstance(obj, dict) else None
        # 429: throttled (or too many challenges) -- a refusal, not an outage.
        if status in (401, 403, 429) and isinstance(code, str):
            raise KeyReleaseDenied(
                f"broker {self.origin} refused to release {self.tenant}/{self.artifact}: {code}"
            )
        if status == 503 and isinstance(code, str):
            # The broker is up but cannot decide (its state or audit log is down):
            # a refusal for now, not a verdict on this machine; another broker
            # or a later try may answer.
            raise BackendError(
                f"broker {self.origin} cannot decide on {self.tenant}/{self.artifact} now: "
                f"{code} (a service the broker depends on is down; nothing was released)"
            )
        raise BackendError(
            f"broker {self.origin} answered {status} to {path}"
            + (f" ({code})" if isinstance(code, str) else "")
        )


def bearer_token(token: str | None = None) -> str | None:
    """*token*, else ``$SEALSTORE_BROKER_TOKEN``, else the file ``$SEALSTORE_BROKER_TOKEN_FILE``.

    Raises:
        KeyUnavailable: the file is unreadable, or the token could not be a bearer token.
    """
    token = token or os.environ.get("SEALSTORE_BROKER_TOKEN")
    path = os.environ.get("SEALSTORE_BROKER_TOKEN_FILE")
    if not token and path:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyUnavailable(
                f"cannot read SEALSTORE_BROKER_TOKEN_FILE {path}: {exc.__class__.__name__}"
            ) from None
    if token and not (token.isascii() and token.isprintable() and " " not in token):
        raise KeyUnavailable("the broker token has characters a bearer token cannot carry")
    return token or None


def client_context(cacert: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """A TLS context trusting *cacert* (else the system's), with a client certificate if given.

    Raises:
        KeyUnavailable: the client certificate or its key cannot be loaded.
    """
    ctx = ssl.create_default_context(cafile=cacert)
    if cert:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise KeyUnavailable(f"cannot load the client certificate {cert}: {exc}") from None
    return ctx


def https_json(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    token: str | None,
) -> tuple[int, Any]:
    """One JSON request to the broker: (HTTP status, the decoded body or None).

    Raises:
        BackendError: the broker cannot be reached, or its certificate does not verify.
    """
    origin = f"https://{host}:{port}"
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=_TIMEOUT)
    try:
        data = None if body is None else canonical_json(body)
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read(1 << 20)
    except ssl.SSLCertVerificationError as exc:
        raise BackendError(
            f"broker {origin}: its TLS certificate does not verify ({exc.verify_message})"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise BackendError(
            f"broker {origin} is unreachable ({exc.__class__.__name__}: {exc})"
        ) from None
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return resp.status, None
