"""Data keys, key slots, and the two protocols key providers implement.

As in age: a :class:`Wrapper` turns a data key (DEK) into a :class:`KeySlot`,
an :class:`Unwrapper` turns a slot back into the DEK. Providers live in
``sealstore.kms`` (and ``sealstore.enclave`` for attested ones); this module
knows none of them.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sealstore.errors import (
    AuthenticationError,
    BackendError,
    FormatError,
    KeyReleaseDenied,
    KeyUnavailable,
    SealstoreError,
)

__all__ = [
    "DEK_SIZE",
    "DataKey",
    "KeySlot",
    "Refusal",
    "Unwrapper",
    "Wrapper",
    "unwrap_first",
]

DEK_SIZE = 32


class DataKey:
    """An opaque handle on a 256-bit data key.

    It has no useful ``repr``, refuses pickling and copying, and wipes its
    buffer on :meth:`close` (or leaving a ``with`` block). Python cannot
    promise that no other copy of the bytes exists -- the AEAD objects keep
    their own -- so this limits exposure rather than guaranteeing erasure.
    """

    __slots__ = ("_buf",)

    def __init__(self, material: bytes | bytearray | memoryview) -> None:
        if len(material) != DEK_SIZE:
            raise ValueError(f"a data key is {DEK_SIZE} bytes")
        self._buf: bytearray | None = bytearray(material)

    @classmethod
    def generate(cls) -> DataKey:
        """A fresh random data key from the OS CSPRNG."""
        return cls(os.urandom(DEK_SIZE))

    def material(self) -> bytes:
        """The key bytes, for the cipher and the wrappers only.

        Raises:
            ValueError: the key was closed.
        """
        if self._buf is None:
            raise ValueError("data key is closed")
        return bytes(self._buf)

    @property
    def closed(self) -> bool:
        return self._buf is None

    def close(self) -> None:
        """Overwrite the key bytes and release them."""
        if self._buf is not None:
            self._buf[:] = bytes(len(self._buf))
            self._buf = None

    def __enter__(self) -> DataKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<DataKey closed>" if self._buf is None else "<DataKey (redacted)>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("data keys cannot be pickled")

    def __copy__(self) -> DataKey:
        raise TypeError("data keys cannot be copied")

    def __deepcopy__(self, memo: object) -> DataKey:
        raise TypeError("data keys cannot be copied")

    def __eq__(self, other: object) -> bool:
        # Identity only: comparing key bytes with == would not be constant time.
        return self is other

    __hash__ = object.__hash__


@dataclass(frozen=True)
class KeySlot:
    """One wrapped copy of a data key.

    Attributes:
        kind: the wrapping scheme (``"local"``, ``"x25519"``, ...).
        key_id: the URI of the key-encryption key that wrapped it.
        blob: the wrapped DEK (opaque to everyone but the provider).
        params: scheme-specific public fields (nonce, KEK version...).
    """

    kind: str
    key_id: str
    blob: bytes
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        obj = dict(self.params)
        obj.update(kind=self.kind, key_id=self.key_id, blob=base64.b64encode(self.blob).decode())
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> KeySlot:
        """Parse one slot object. Raises ``FormatError`` if malformed."""
        if not isinstance(obj, dict):
            raise FormatError("a key slot must be a JSON object")
        kind, key_id, blob = obj.get("kind"), obj.get("key_id"), obj.get("blob")
        if not isinstance(kind, str) or not kind:
            raise FormatError("key slot field 'kind' must be a non-empty string")
        if not isinstance(key_id, str):
            raise FormatError("key slot field 'key_id' must be a string")
        if not isinstance(blob, str):
            raise FormatError("key slot field 'blob' must be a base64 string")
        try:
            raw = base64.b64decode(blob.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise FormatError("key slot field 'blob' is not valid base64") from exc
        params = {k: v for k, v in obj.items() if k not in ("kind", "key_id", "blob")}
        return cls(kind=kind, key_id=key_id, blob=raw, params=params)

    def __repr__(self) -> str:
        return f"KeySlot(kind={self.kind!r}, key_id={self.key_id!r}, blob=<{len(self.blob)} bytes>)"


@runtime_checkable
class Wrapper(Protocol):
    """Wraps data keys under one key-encryption key."""

    # Read-only, so that a provider may make it a property (LocalKeyring does).
    @property
    def key_id(self) -> str:
        """The URI of the key-encryption key, as the slots it makes record it."""
        ...

    def wrap(self, dek: DataKey, context: Mapping[str, str]) -> KeySlot:
        """Wrap *dek*, binding *context*. Raises a ``SealstoreError`` on failure."""
        ...


@runtime_checkable
class Unwrapper(Protocol):
    """Recovers data keys from the slots it can open."""

    def unwrap(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey:
        """Unwrap *slot* under *context*.

        Raises:
            KeyUnavailable: this unwrapper does not hold the slot's key, or it
                cannot tell a missing key from a slot that does not open under
                *context* (a key service's answer).
            AuthenticationError: it holds the slot's key and can tell that the
                slot does not open under *context*: the slot or the context
                changed after sealing.
            KeyReleaseDenied, BackendError: the key service refused or failed.
        """
        ...


class Refusal:
    """An unwrapper that opens nothing and says why.

    Providers return one for a slot they cannot serve (an identity file is
    needed, the keyring is damaged, the optional dependency is missing), so
    the slot's cause in ``KeyUnavailable`` names the real reason.
    """

    def __init__(self, why: str) -> None:
        self.why = why

    def unwrap(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey:
        raise KeyUnavailable(self.why)


def unwrap_first(
    slots: Sequence[KeySlot],
    unwrappers_for: Callable[[KeySlot], Iterable[Unwrapper]],
    context: Mapping[str, str],
    accept: Callable[[DataKey], None],
    on_success: Callable[[KeySlot, DataKey], None] | None = None,
) -> DataKey:
    """Try *slots* in order and return the first DEK that *accept* takes.

    Args:
        slots: the file's key slots.
        unwrappers_for: the unwrappers to try on one slot.
        context: the encryption context bound into the slots.
        accept: checks a candidate DEK (the header's key commitment) and raises
            ``AuthenticationError`` if it is not the file's key.
        on_success: told which slot gave the accepted DEK (a cache remembers it).

    Raises:
        AuthenticationError: a slot unwrapped, but to a key the header does not
            commit to -- the slots were swapped or tampered with -- or an
            unwrapper that holds a slot's key found the slot altered or bound to
            another context (it raised ``AuthenticationError``), and no other
            slot gave the right key.
        KeyReleaseDenied: no slot opened and a key service refused one.
        BackendError: no slot opened and a key service failed for one.
        KeyUnavailable: no slot could be unwrapped otherwise; lists each slot's cause.
    """
    if not slots:
        raise KeyUnavailable("the file has no key slots (they are held in a store manifest)")
    causes: list[tuple[str, str]] = []
    mismatched = False
    tampered: str | None = None  # the first slot whose own key says it was altered
    # If no slot opens, the error says the strongest reason any slot gave: a
    # refusal, else a failing backend, else plain unavailability.
    strongest: type[SealstoreError] = KeyUnavailable
    for slot in slots:
        cause = "no identity or key provider for this slot"
        try:
            candidates = list(unwrappers_for(slot))
        except SealstoreError as exc:
            causes.append((slot.key_id, str(exc)))
            continue
        for unwrapper in candidates:
            try:
                dek = unwrapper.unwrap(slot, context)
            except AuthenticationError as exc:
                # The unwrapper holds this slot's key, yet the slot does not open
                # under this context: it or the context changed after sealing.
                cause = str(exc)
                if tampered is None:
                    tampered = f"key slot {len(causes)} ({slot.key_id}): {exc}"
                continue
            except SealstoreError as exc:
                cause = str(exc)
                for kind in (KeyReleaseDenied, BackendError):
                    if isinstance(exc, kind) and strongest is not KeyReleaseDenied:
                        strongest = kind
                continue
            try:
                accept(dek)
            except AuthenticationError:
                dek.close()
                mismatched = True
                cause = "unwrapped key does not match the header's key commitment"
                continue
            if on_success is not None:
                on_success(slot, dek)
            return dek
        causes.append((slot.key_id, cause))
    if tampered is not None:
        raise AuthenticationError(tampered)
    if mismatched:
        raise AuthenticationError(
            "no key slot holds the key this file was sealed with (slots swapped or tampered)"
        )
    if strongest is KeyUnavailable:
        raise KeyUnavailable("no key slot could be unwrapped", causes)
    detail = "; ".join(f"slot {i} ({kid}): {why}" for i, (kid, why) in enumerate(causes))
    raise strongest(f"no key slot could be unwrapped: {detail}")
