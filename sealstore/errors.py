"""The exceptions sealstore raises.

One base class, then a short flat list named for what went wrong. Messages
name the file, key or URL concerned and the cause; they never carry key
material. Misuse of the API (wrong types, impossible arguments) raises the
built-in ``ValueError`` / ``TypeError`` instead.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

__all__ = [
    "AttestationError",
    "AuthenticationError",
    "BackendError",
    "DeviceUnavailable",
    "FormatError",
    "InferenceRefused",
    "KeyReleaseDenied",
    "KeyUnavailable",
    "NotFound",
    "Refused",
    "SealstoreError",
    "Terminated",
    "UnsupportedVersion",
]


class SealstoreError(Exception):
    """Base class of every error sealstore raises on purpose."""


class AuthenticationError(SealstoreError):
    """Sealed data failed authentication.

    One type for every cause -- a changed header or chunk, chunks reordered,
    dropped, duplicated or spliced, truncation, trailing bytes, or the wrong
    key -- so the error itself tells an attacker nothing about which check
    failed first.
    """


class FormatError(SealstoreError):
    """The input is not a well-formed sealed file (bad magic, bad header...)."""


class UnsupportedVersion(FormatError):
    """A sealed file of a format version or suite this release cannot read."""


class KeyUnavailable(SealstoreError):
    """No key slot of a file could be unwrapped.

    Attributes:
        causes: one ``(key_id, cause)`` pair per slot tried, in slot order.
    """

    def __init__(self, message: str, causes: Sequence[tuple[str, str]] = ()) -> None:
        self.causes: list[tuple[str, str]] = list(causes)
        if self.causes:
            detail = "; ".join(f"slot {i} ({kid}): {why}" for i, (kid, why) in enumerate(causes))
            message = f"{message}: {detail}"
        super().__init__(message)


class KeyReleaseDenied(SealstoreError):
    """A key service refused to release a key (permission, policy, attestation)."""


class AttestationError(SealstoreError):
    """Attestation evidence could not be collected or did not verify.

    Attributes:
        code: a short stable name of the check that failed (``snp-signature``,
            ``tpm-pcr-mismatch``...): what a broker may tell the caller, while
            the message, with the detail, goes only to its log.
    """

    def __init__(self, message: str, code: str = "evidence-invalid") -> None:
        super().__init__(message)
        self.code = code


class BackendError(SealstoreError):
    """A storage or key backend failed (unreachable, 5xx, I/O error)."""


class NotFound(SealstoreError):
    """A named file, artifact, version or key does not exist."""


class DeviceUnavailable(SealstoreError):
    """A CUDA device was asked for and cannot be used (no device, driver or toolchain)."""


class Refused(SealstoreError):
    """The store refuses to serve by policy: safe mode (only ``known-good`` versions)."""


class InferenceRefused(Refused):
    """The inference guard refuses a call to a guarded model.

    Attributes:
        code: ``refused`` or ``throttled`` (a detector's finding about this
            caller), ``locked-down`` / ``locked-out`` (incident response at the
            broker), ``standing-unknown`` (the broker has not answered for too
            long), ``audit-unavailable`` (a finding could not be recorded),
            ``no-caller`` (the policy requires one).
        caller: the caller the call was attributed to.
    """

    def __init__(self, message: str, code: str, caller: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.caller = caller


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal it can catch (SIGTERM, SIGHUP).

    A ``KeyboardInterrupt`` on purpose: every place that cleans up after
    Ctrl-C (temporary files, parallel lanes, half-made pulls) then cleans up
    after ``docker stop``, Kubernetes and ``timeout`` the same way. Not a
    :class:`SealstoreError`: nothing went wrong with the data.

    Attributes:
        signum: the signal's number (the CLI exits with 128 + signum).
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")
