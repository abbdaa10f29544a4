"""``vault-transit://HOST:PORT/MOUNT/KEY`` -- data keys wrapped by Vault / OpenBao Transit.

The DEK is encrypted by the Transit key named in the URI and never stored in
Vault. The encryption context is always sent as the derivation context, but
Transit silently ignores it for a key that is not *derived*; for such keys
(or when the key's configuration cannot be read) it is also sent as AES-GCM
associated data. A slot therefore opens only under the context it was made
for, whatever the key. Slots bound by derivation alone can be moved to a new
key version by Transit's ``rewrap`` without the DEK leaving Vault; the others
are unwrapped and wrapped again here.

URI query options: ``tls=false`` (plain HTTP, for a dev server; HTTPS is the
default), ``namespace=NS`` (Vault Enterprise / OpenBao namespaces; also
``VAULT_NAMESPACE``); nothing else. Opening a file by the URI its slot names
only talks to a Vault the user named -- ``VAULT_ADDR`` or
``SEALSTORE_VAULT_ADDRS`` -- since slots are not authenticated and a planted
slot must not collect the token. Credentials never sit in the URI: a token from the
``token`` option or ``VAULT_TOKEN``, or AppRole from ``role_id``/``secret_id``
or ``VAULT_ROLE_ID``/``VAULT_SECRET_ID``; the CA file from ``cacert`` or
``VAULT_CACERT``.
"""

from __future__ import annotations

import base64
import inspect
import os
import threading
from collections.abc import Mapping
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import hvac
import hvac.exceptions
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from sealstore.errors import BackendError, KeyReleaseDenied, KeyUnavailable
from sealstore.format import canonical_json
from sealstore.keys import DEK_SIZE, DataKey, KeySlot, Refusal

__all__ = ["VaultTransitKey"]

SCHEME = "vault-transit"
_NO_CLIENT: Any = object()  # parse the URI only; talk to nobody
_TIMEOUT = 10


def _retry(*, repeatable: bool) -> Retry:
    """What hvac's HTTP session retries.

    Always: a connection that could not be made (nothing was sent). For calls
    that are safe to repeat -- every Transit call: encrypting again makes
    another valid ciphertext -- also a connection dropped mid-call, a 502/504
    from a proxy, a 503 (a sealed or standby node, mid-failover) and a 429 (a
    rate-limit quota), four times at most with exponential backoff up to 2 s,
    a Retry-After obeyed up to 5 s. Not an AppRole login: a secret_id may be
    single-use, and a login Vault handled but whose answer was lost must not
    spend it twice. Other answers are Vault's verdict and come back at once.
    """
    if not repeatable:
        return Retry(total=3, connect=3, read=0, status=0, other=0, backoff_factor=0.25)
    options: dict[str, Any] = {}
    if "retry_after_max" in inspect.signature(Retry).parameters:  # urllib3 >= 2.6
        options["retry_after_max"] = 5
    return Retry(
        total=4,
        connect=4,
        read=2,
        status=4,
        backoff_factor=0.25,
        status_forcelist=(429, 502, 503, 504),
        allowed_methods=None,  # POST too: see above
        raise_on_status=False,  # the last answer goes to hvac, which names the error
        respect_retry_after_header=True,
        **options,
    )


def _session(verify: bool | str, *, repeatable: bool = True) -> requests.Session:
    """hvac's HTTP session (see :func:`_retry`)."""
    session = requests.Session()
    session.verify = verify  # hvac takes the session's over its own verify=
    _mount(session, repeatable=repeatable)
    return session


def _mount(session: requests.Session, *, repeatable: bool) -> None:
    adapter = HTTPAdapter(max_retries=_retry(repeatable=repeatable))
    session.mount("http://", adapter)
    session.mount("https://", adapter)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class VaultTransitKey:
    """One Transit key: a wrapper and an unwrapper of sealstore key slots.

    Raises (from every call that talks to Vault):
        KeyReleaseDenied: Vault refused (403/401): the token or role may not use the key.
        KeyUnavailable: the key does not exist, the version is retired, or the
            slot does not open under this context.
        BackendError: Vault is unreachable or failed (5xx); names the URL.
    """

    def __init__(
        self,
        uri: str,
        *,
        token: str | None = None,
        role_id: str | None = None,
        secret_id: str | None = None,
        approle_mount: str = "approle",
        cacert: str | None = None,
        namespace: str | None = None,
        client: hvac.Client | None = None,
    ) -> None:
        parts = urlsplit(uri)
        if parts.scheme != SCHEME or not parts.hostname or not parts.port:
            raise ValueError(
                f"not a Vault Transit key URI (vault-transit://HOST:PORT/MOUNT/KEY): {uri!r}"
            )
        path = parts.path.strip("/")
        mount, _, key = path.rpartition("/")
        if not mount or not key:
            raise ValueError(f"Vault Transit URI needs a mount and a key name: {uri!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"tls", "namespace"}
        if unknown:
            # A token or secret in the URI would be stored in every slot's key_id.
            raise ValueError(
                f"Vault Transit URI takes only tls= and namespace= options, not "
                f"{', '.join(sorted(unknown))} (credentials come from VAULT_* variables)"
            )
        tls = query.get("tls", "true").lower() not in ("0", "false", "no")
        self.key_id = uri
        self.mount = mount
        self.key = key
        self.url = f"{'https' if tls else 'http'}://{parts.hostname}:{parts.port}"
        self._lock = threading.Lock()
        if client is _NO_CLIENT:
            self._client = None
            self._is_derived = None
            return
        if client is None:
            verify = (cacert or os.environ.get("VAULT_CACERT") or True) if tls else False
            client = hvac.Client(
                url=self.url,
                token=token or os.environ.get("VAULT_TOKEN"),
                verify=verify,
                namespace=namespace or query.get("namespace") or os.environ.get("VAULT_NAMESPACE"),
                timeout=_TIMEOUT,
                session=_session(verify, repeatable=False),
            )
            role_id = role_id or os.environ.get("VAULT_ROLE_ID")
            secret_id = secret_id or os.environ.get("VAULT_SECRET_ID")
            if role_id and secret_id:
                self._call(
                    "log in with AppRole",
                    lambda: client.auth.approle.login(
                        role_id=role_id, secret_id=secret_id, mount_point=approle_mount
                    ),
                )
            _mount(client.adapter.session, repeatable=True)  # logged in: Transit calls repeat
        self._client = client
        self._is_derived: bool | None = None

    @classmethod
    def from_uri(cls, uri: str) -> VaultTransitKey:
        """The key ``vault-transit://HOST:PORT/MOUNT/KEY``, credentials from the environment.

        Raises:
            ValueError: not a Vault Transit key URI.
        """
        return cls(uri)

    @classmethod
    def unwrapper_for_slot(cls, slot: KeySlot) -> VaultTransitKey | Refusal:
        """The key a slot names, with credentials from the environment.

        Slots are not authenticated, so a slot's URI is attacker-chosen: the
        environment's token is only sent to a Vault the user named -- the
        address in ``VAULT_ADDR`` or in ``SEALSTORE_VAULT_ADDRS`` (a comma-
        separated list), scheme included.
        """
        try:
            key = cls(slot.key_id, client=_NO_CLIENT)
        except ValueError as exc:
            return Refusal(f"malformed Vault Transit slot: {exc}")
        trusted = [os.environ.get("VAULT_ADDR", "")]
        trusted += os.environ.get("SEALSTORE_VAULT_ADDRS", "").split(",")
        if key.url not in {addr.strip().rstrip("/") for addr in trusted if addr.strip()}:
            return Refusal(
                f"{slot.key_id}: {key.url} is not VAULT_ADDR (nor in SEALSTORE_VAULT_ADDRS); "
                "not sending credentials to a Vault the file names"
            )
        return cls(slot.key_id)

    def __repr__(self) -> str:
        return f"VaultTransitKey({self.key_id!r})"

    def __reduce__(self) -> Any:
        raise TypeError("Vault keys cannot be pickled (they hold a token)")

    def can_unwrap(self, slot: KeySlot) -> bool:
        return slot.kind == SCHEME and slot.key_id == self.key_id

    # -- the calls -----------------------------------------------------------------

    def _fail(self, what: str, exc: Exception) -> NoReturn:
        text = " ".join(str(exc).split(", on ")[0].split())
        where = f"{self.key_id}: cannot {what}"
        if isinstance(exc, (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized)):
            raise KeyReleaseDenied(f"{where}: permission denied by Vault") from exc
        if isinstance(exc, requests.exceptions.RequestException):
            raise BackendError(
                f"{where}: Vault at {self.url} is unreachable ({exc.__class__.__name__})"
            ) from exc
        if isinstance(
            exc,
            (
                hvac.exceptions.VaultDown,
                hvac.exceptions.InternalServerError,
                hvac.exceptions.BadGateway,
                hvac.exceptions.UnexpectedError,
            ),
        ):
            raise BackendError(f"{where}: Vault at {self.url} failed: {text}") from exc
        if "message authentication failed" in text:
            raise KeyUnavailable(
                f"{where}: the slot does not open under this encryption context (or it was altered)"
            ) from exc
        if "key not found" in text or isinstance(exc, hvac.exceptions.InvalidPath):
            raise KeyUnavailable(f"{where}: the Transit key does not exist (deleted?)") from exc
        if "disallowed by policy" in text:
            raise KeyUnavailable(
                f"{where}: this key version is retired (min_decryption_version)"
            ) from exc
        raise KeyUnavailable(f"{where}: {text}") from exc

    def _call(self, what: str, fn: Any) -> Any:
        try:
            return fn()
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as exc:
            self._fail(what, exc)

    def _post(self, what: str, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"/v1/{self.mount}/{endpoint}/{self.key}"
        response = self._call(what, lambda: self._client.adapter.post(url, json=body))
        if not isinstance(response, dict) or not isinstance(response.get("data"), dict):
            raise BackendError(f"{self.key_id}: unexpected reply from Vault at {self.url}")
        return response["data"]

    @staticmethod
    def _binding(context: Mapping[str, str], associated: bool) -> dict[str, str]:
        encoded = _b64(canonical_json(dict(context)))
        body = {"context": encoded}
        if associated:
            body["associated_data"] = encoded
        return body

    def _derived(self) -> bool:
        """Whether the key is derived; False if its configuration may not be read."""
        if self._is_derived is None:
            try:
                info = self._client.secrets.transit.read_key(self.key, mount_point=self.mount)
                self._is_derived = bool(info["data"].get("derived"))
            except (hvac.exceptions.VaultError, requests.exceptions.RequestException, KeyError):
                self._is_derived = False  # then associated data binds the context
        return self._is_derived

    def wrap(self, dek: DataKey, context: Mapping[str, str]) -> KeySlot:
        """Encrypt *dek* with the Transit key, bound to *context*."""
        associated = not self._derived()
        body = {"plaintext": _b64(dek.material()), **self._binding(context, associated)}
        data = self._post("wrap a data key", "encrypt", body)
        return self._slot(data, associated=associated)

    def generate(self, context: Mapping[str, str]) -> tuple[DataKey, KeySlot]:
        """A new DEK from Vault's ``datakey/wrapped`` (the reply holds no plaintext).

        The datakey endpoint takes no associated data, so the context is bound
        only by derivation: the Transit key must be ``derived``.
        """
        if not self._derived():
            raise ValueError(
                f"{self.key_id}: datakey/wrapped binds the context only with a derived "
                "Transit key (or the key's configuration may not be read); use -k instead"
            )
        data = self._post("generate a data key", "datakey/wrapped", self._binding(context, False))
        slot = self._slot(data, associated=False)
        return self.unwrap(slot, context), slot

    def _slot(self, data: dict[str, Any], *, associated: bool) -> KeySlot:
        ciphertext = str(data["ciphertext"])
        params = {"version": int(data.get("key_version", 0)), "ad": associated}
        return KeySlot(SCHEME, self.key_id, ciphertext.encode("ascii"), params)

    def unwrap(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey:
        """Decrypt a slot this key made, under *context*."""
        if slot.kind != SCHEME:
            raise KeyUnavailable(f"{self.key_id}: not a Vault Transit slot")
        try:
            ciphertext = slot.blob.decode("ascii")
        except UnicodeDecodeError:
            raise KeyUnavailable(f"{self.key_id}: slot is not a Transit ciphertext") from None
        # The slot's "ad" flag is not authenticated: it may add associated data
        # but never drop it. Only a derived key binds the context without it.
        associated = bool(slot.params.get("ad")) or not self._derived()
        body = {"ciphertext": ciphertext, **self._binding(context, associated)}
        data = self._post("unwrap the data key", "decrypt", body)
        try:
            dek = base64.b64decode(data["plaintext"], validate=True)
        except (KeyError, ValueError, TypeError):
            raise BackendError(f"{self.key_id}: Vault returned no plaintext") from None
        if len(dek) != DEK_SIZE:
            raise KeyUnavailable(f"{self.key_id}: slot holds a key of the wrong size")
        return DataKey(dek)

    def rewrap(self, slot: KeySlot, context: Mapping[str, str]) -> KeySlot:
        """The same DEK under the key's newest version.

        Transit's ``rewrap`` does it inside Vault for slots bound by derivation;
        it takes no associated data, so other slots are unwrapped and wrapped again.
        """
        if slot.params.get("ad"):
            with self.unwrap(slot, context) as dek:
                return self.wrap(dek, context)
        try:
            ciphertext = slot.blob.decode("ascii")
        except UnicodeDecodeError:
            raise KeyUnavailable(f"{self.key_id}: slot is not a Transit ciphertext") from None
        body = {"ciphertext": ciphertext, **self._binding(context, False)}
        data = self._post("rewrap the data key", "rewrap", body)
        return self._slot(data, associated=False)
