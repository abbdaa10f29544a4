"""``aws-kms://KEY`` -- data keys wrapped by an AWS KMS key.

``KEY`` is what KMS accepts as a ``KeyId``: a key id, ``alias/NAME`` or a key
ARN. The stream makes the data key; wrapping is a KMS ``Encrypt`` of it with
the encryption context as KMS's own ``EncryptionContext``, so KMS refuses to
decrypt a slot under any other context. Decrypting needs no identity file:
the slot names its key, and the caller's AWS credentials decide.

The client is boto3's, built on first use, with botocore's adaptive retries
for throttling. The region and endpoint are the options' (or the key ARN's
region, or ``AWS_REGION``); otherwise botocore resolves them as the AWS CLI
does: ``AWS_DEFAULT_REGION``, the profile's ``region`` in ``~/.aws/config``,
``AWS_ENDPOINT_URL_KMS`` before ``AWS_ENDPOINT_URL``, a profile's ``services``
section; us-east-1 when nothing names a region.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from typing import Any

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ProfileNotFound,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from sealstore.errors import BackendError, KeyReleaseDenied, KeyUnavailable, SealstoreError
from sealstore.keys import DEK_SIZE, DataKey, KeySlot

__all__ = ["AwsKmsKey"]

KIND = "aws-kms"
_PREFIX = "aws-kms://"
_DEFAULT_REGION = "us-east-1"
_MAX_ATTEMPTS = 5
_ARN = re.compile(r"arn:aws[a-z-]*:kms:([a-z0-9-]+):\d{12}:(key|alias)/\S+")

# Error codes by what they mean for the caller. KMS answers 4xx for the first
# three groups; anything 5xx is the service failing, whatever its code.
_WRONG_SLOT = {"InvalidCiphertextException", "IncorrectKeyException"}
_DENIED = {
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "InvalidGrantTokenException",
}
_KEY_STATE = {
    "DisabledException": "key is disabled",
    "KMSInvalidStateException": "key is pending deletion or otherwise not usable (invalid state)",
    "NotFoundException": "key not found",
}
_SERVICE = {
    "KMSInternalException",
    "DependencyTimeoutException",
    "KeyUnavailableException",
    "ThrottlingException",
    "LimitExceededException",
}

_clients: dict[tuple[Any, ...], BaseClient] = {}
# What botocore reads from the environment to pick a region and an endpoint
# (and whose credentials): a client built under other values is not reused.
_RESOLVED_FROM = (
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_KMS",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_ACCESS_KEY_ID",
    "AWS_USE_FIPS_ENDPOINT",
    "AWS_USE_DUALSTACK_ENDPOINT",
    "AWS_CA_BUNDLE",
)
_clients_lock = threading.Lock()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _region_of(spec: str) -> str | None:
    m = _ARN.fullmatch(spec)
    return m.group(1) if m else None


def _session_region(profile: str | None) -> str:
    """The region botocore resolves for *profile* (environment, config file), else the default."""
    return boto3.session.Session(profile_name=profile).region_name or _DEFAULT_REGION


def _client_for(
    region: str | None, profile: str | None, endpoint_url: str | None, max_attempts: int
) -> BaseClient:
    # boto3 clients are thread-safe but expensive to build (~tens of ms), and
    # every slot of a store would otherwise build its own; sessions are not
    # thread-safe, hence the lock around construction.
    env = tuple(os.environ.get(name) for name in _RESOLVED_FROM)
    key = (region, profile, endpoint_url, max_attempts, env)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            # Explicit, finite limits per attempt (botocore's defaults are 60 s
            # each): a KMS call is small, so an endpoint silent for this long is
            # down, and the retries above bound the rest.
            config = Config(
                connect_timeout=10,
                read_timeout=30,
                retries={"max_attempts": max_attempts, "mode": "adaptive"},
            )
            session = boto3.session.Session(profile_name=profile)
            client = session.client(
                "kms",
                region_name=region or session.region_name or _DEFAULT_REGION,
                endpoint_url=endpoint_url,  # None: botocore's own resolution
                config=config,
            )
            _clients[key] = client
        return client


class AwsKmsKey:
    """One AWS KMS key: a wrapper for its URI and an unwrapper of its slots."""

    def __init__(
        self,
        spec: str,
        *,
        region: str | None = None,
        profile: str | None = None,
        endpoint_url: str | None = None,
        client: BaseClient | None = None,
        max_attempts: int = _MAX_ATTEMPTS,
    ) -> None:
        if not spec or any(c.isspace() for c in spec):
            raise ValueError(f"aws-kms key URI {_PREFIX}{spec!r} names no key")
        self.key_id = _PREFIX + spec
        self._spec = spec
        # Pinned by the caller or the ARN (or AWS_REGION, which the AWS SDKs read
        # and botocore does not); None leaves it to botocore (see above).
        self._region = region or _region_of(spec) or os.environ.get("AWS_REGION") or None
        self._profile = profile or os.environ.get("AWS_PROFILE") or None
        self._endpoint_url = endpoint_url or None
        self._max_attempts = max_attempts
        self._client = client
        self._arn: str | None = spec if _ARN.fullmatch(spec) and ":key/" in spec else None
        self._lock = threading.Lock()

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_uri(
        cls,
        uri: str,
        *,
        region: str | None = None,
        profile: str | None = None,
        endpoint_url: str | None = None,
        client: BaseClient | None = None,
        max_attempts: int = _MAX_ATTEMPTS,
    ) -> AwsKmsKey:
        """Parse ``aws-kms://KEY-ID``, ``aws-kms://alias/NAME`` or ``aws-kms://arn:aws:kms:...``.

        Args:
            uri: the key URI.
            region: the key's region (default: the ARN's, else ``AWS_REGION``...).
            profile: the AWS profile to take credentials from.
            endpoint_url: a KMS endpoint other than AWS's (default ``AWS_ENDPOINT_URL``).
            client: a ready boto3 KMS client (then *region*, *profile* and
                *endpoint_url* are not used to make one).
            max_attempts: attempts per call, retries of throttling and 5xx included.

        Returns:
            The key.

        Raises:
            ValueError: not an aws-kms URI.
        """
        if not uri.startswith(_PREFIX):
            raise ValueError(f"not an aws-kms key URI (expected aws-kms://KEY): {uri!r}")
        return cls(
            uri[len(_PREFIX) :],
            region=region,
            profile=profile,
            endpoint_url=endpoint_url,
            client=client,
            max_attempts=max_attempts,
        )

    @classmethod
    def unwrapper_for_slot(cls, slot: KeySlot) -> AwsKmsKey | None:
        """The key a slot names, so decrypting needs no ``-i``; None if not ours."""
        if slot.kind != KIND or not slot.key_id.startswith(_PREFIX):
            return None
        arn = slot.params.get("arn")
        # The slot's ARN pins the region the key lives in, whatever the
        # environment says; an alias or bare key id alone cannot.
        region = _region_of(arn) if isinstance(arn, str) else None
        try:
            return cls.from_uri(slot.key_id, region=region) if region else cls.from_uri(slot.key_id)
        except ValueError:
            return None

    # -- public metadata -----------------------------------------------------------

    @property
    def region(self) -> str:
        """The region this key's KMS calls go to."""
        if self._client is not None:
            return str(self._client.meta.region_name)
        if self._region:
            return self._region
        try:
            return _session_region(self._profile)
        except ProfileNotFound:
            return _DEFAULT_REGION  # the first call says the profile is missing

    @property
    def endpoint(self) -> str:
        """The KMS endpoint URL this key talks to."""
        return str(self._kms().meta.endpoint_url)

    def __repr__(self) -> str:
        return f"AwsKmsKey({self.key_id!r}, region={self.region!r})"

    def __reduce__(self) -> Any:
        raise TypeError("KMS key handles cannot be pickled")

    def can_unwrap(self, slot: KeySlot) -> bool:
        """Whether *slot* was wrapped by this key (by URI, or by the key's ARN)."""
        if slot.kind != KIND:
            return False
        if slot.key_id == self.key_id:
            return True
        arn = slot.params.get("arn")
        if not isinstance(arn, str):
            return False
        try:
            return arn == self._key_arn()
        except SealstoreError:
            return False

    # -- KMS calls -----------------------------------------------------------------

    def _kms(self) -> BaseClient:
        if self._client is None:
            try:
                self._client = _client_for(
                    self._region, self._profile, self._endpoint_url, self._max_attempts
                )
            except ProfileNotFound as exc:
                raise KeyUnavailable(
                    f"aws-kms key {self.key_id}: AWS profile {self._profile!r} not found"
                ) from exc
        return self._client

    def _call(self, op: str, **params: Any) -> dict[str, Any]:
        client = self._kms()
        try:
            return getattr(client, op)(**params)  # type: ignore[no-any-return]
        except ParamValidationError as exc:
            # Misuse (e.g. a non-string context value). botocore's text can
            # quote parameter values, the plaintext among them, so it is dropped.
            raise ValueError(f"aws-kms key {self.key_id}: invalid parameters for {op}") from exc
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, op) from exc

    def _translate(self, exc: Exception, op: str) -> SealstoreError:
        """One clear line for a botocore error; never the request (it may hold the DEK)."""
        where = f"aws-kms key {self.key_id}"
        if isinstance(exc, BotoConnectionError):
            return BackendError(
                f"{where}: cannot reach KMS at {self.endpoint} ({exc.__class__.__name__})"
            )
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return KeyReleaseDenied(f"{where}: no usable AWS credentials for {op}")
        if not isinstance(exc, ClientError):
            return BackendError(f"{where}: {op} failed at {self.endpoint} ({_one_line(str(exc))})")
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = _one_line(str(error.get("Message") or ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        said = f" ({code}: {message})" if message else f" ({code})"
        if code in _SERVICE or status >= 500:
            return BackendError(f"{where}: KMS at {self.endpoint} failed {op}{said}")
        if code in _WRONG_SLOT:
            return KeyUnavailable(
                f"{where}: slot does not open under this key and encryption context{said}"
            )
        if code in _KEY_STATE:
            return KeyUnavailable(f"{where}: {_KEY_STATE[code]}{said}")
        if (
            code == "AccessDeniedException"
            and op in ("decrypt", "re_encrypt")
            and _names_no_key(message)
        ):
            # KMS uses AccessDeniedException both for a policy refusing the
            # caller and for a ciphertext whose embedded key reference resolves
            # to no key -- which is what a corrupted slot looks like. The second
            # has a fixed message (moto sends it with none at all); a policy
            # refusal names the principal and action.
            return KeyUnavailable(
                f"{where}: the slot's ciphertext names a key that does not exist here "
                f"or that these credentials may not use{said}"
            )
        if code in _DENIED:
            return KeyReleaseDenied(f"{where}: KMS denied {op}{said}")
        return KeyUnavailable(f"{where}: KMS rejected {op}{said}")

    def _key_arn(self) -> str:
        """This key's ARN (an alias or key id resolved once with DescribeKey)."""
        with self._lock:
            if self._arn is None:
                meta = self._call("describe_key", KeyId=self._spec)["KeyMetadata"]
                self._arn = str(meta["Arn"])
            return self._arn

    def wrap(self, dek: DataKey, context: Mapping[str, str]) -> KeySlot:
        """Encrypt *dek* with this KMS key, binding *context* as the encryption context.

        Raises:
            KeyUnavailable: the key is disabled, pending deletion or not found.
            KeyReleaseDenied: the credentials may not use the key.
            BackendError: KMS is unreachable or failing.
        """
        params: dict[str, Any] = {"KeyId": self._spec, "Plaintext": dek.material()}
        if context:
            params["EncryptionContext"] = dict(context)
        out = self._call("encrypt", **params)
        return KeySlot(KIND, self.key_id, bytes(out["CiphertextBlob"]), {"arn": str(out["KeyId"])})

    def generate(self, context: Mapping[str, str]) -> tuple[DataKey, KeySlot]:
        """A data key made by KMS (``GenerateDataKey``, AES_256) and its slot.

        Returns:
            The data key (close it when done) and a slot that :meth:`unwrap` opens.

        Raises:
            KeyUnavailable, KeyReleaseDenied, BackendError: as for :meth:`wrap`.
        """
        params: dict[str, Any] = {"KeyId": self._spec, "KeySpec": "AES_256"}
        if context:
            params["EncryptionContext"] = dict(context)
        out = self._call("generate_data_key", **params)
        plaintext = out.pop("Plaintext")
        if len(plaintext) != DEK_SIZE:
            raise KeyUnavailable(f"aws-kms key {self.key_id}: KMS made a key of the wrong size")
        slot = KeySlot(KIND, self.key_id, bytes(out["CiphertextBlob"]), {"arn": str(out["KeyId"])})
        return DataKey(plaintext), slot

    def unwrap(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey:
        """Decrypt a slot this key made, under *context*.

        Raises:
            KeyUnavailable: another key's slot, a corrupt slot, a different
                context, or the key is disabled / pending deletion / not found.
            KeyReleaseDenied: KMS refused the credentials.
            BackendError: KMS is unreachable or failing.
        """
        if not self.can_unwrap(slot):
            raise KeyUnavailable(f"slot was not wrapped by aws-kms key {self.key_id}")
        if not slot.blob:
            raise KeyUnavailable(f"aws-kms key {self.key_id}: slot has an empty ciphertext")
        # Naming the key makes KMS refuse a ciphertext of any other key
        # (IncorrectKeyException) instead of decrypting with whatever key the
        # unauthenticated slot's blob points at. The slot's ARN is used only
        # when it is this key's: a slot must not steer the call to another key
        # the caller's credentials happen to reach.
        key = self._spec
        arn = slot.params.get("arn")
        if isinstance(arn, str) and arn and arn != key:
            try:
                if arn == self._key_arn():
                    key = arn
            except SealstoreError:
                pass
        params: dict[str, Any] = {"CiphertextBlob": slot.blob, "KeyId": key}
        if context:
            params["EncryptionContext"] = dict(context)
        out = self._call("decrypt", **params)
        plaintext = out.pop("Plaintext")
        if len(plaintext) != DEK_SIZE:
            raise KeyUnavailable(f"aws-kms key {self.key_id}: slot holds a key of the wrong size")
        return DataKey(plaintext)

    def rewrap(
        self, slot: KeySlot, context: Mapping[str, str], to_uri: str | None = None
    ) -> KeySlot:
        """Move a slot of this key to the key *to_uri* inside KMS (``ReEncrypt``).

        The data key never leaves KMS; the context stays the same. Without
        *to_uri* the slot is re-encrypted under this key's current backing
        key (what ``keys rotate --to`` the same URI does after a KMS rotation).

        Raises:
            ValueError: *to_uri* is not an aws-kms URI.
            KeyUnavailable, KeyReleaseDenied, BackendError: as for :meth:`unwrap`.
        """
        target = AwsKmsKey.from_uri(to_uri or self.key_id)
        if not self.can_unwrap(slot):
            raise KeyUnavailable(f"slot was not wrapped by aws-kms key {self.key_id}")
        arn = slot.params.get("arn")
        params: dict[str, Any] = {
            "CiphertextBlob": slot.blob,
            "SourceKeyId": arn if isinstance(arn, str) and arn else self._spec,
            "DestinationKeyId": target._spec,
        }
        if context:
            params["SourceEncryptionContext"] = dict(context)
            params["DestinationEncryptionContext"] = dict(context)
        out = self._call("re_encrypt", **params)
        return KeySlot(
            KIND, target.key_id, bytes(out["CiphertextBlob"]), {"arn": str(out["KeyId"])}
        )


def _names_no_key(message: str) -> bool:
    return not message or "ciphertext refers to" in message.lower()
