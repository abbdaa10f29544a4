"""sealstore: sealed model artifacts, attested key release, streaming decryption.

The public facade. Errors and the key types are imported eagerly (they are
the ground floor); everything built on the floors above is re-exported
lazily (PEP 562), so ``import sealstore`` never imports a provider, the
store, torch or numba.
"""

from __future__ import annotations

import importlib
from typing import Any

from sealstore.errors import (
    AttestationError,
    AuthenticationError,
    BackendError,
    DeviceUnavailable,
    FormatError,
    KeyReleaseDenied,
    KeyUnavailable,
    NotFound,
    SealstoreError,
    UnsupportedVersion,
)
from sealstore.keys import DataKey, KeySlot, Unwrapper, Wrapper

__version__ = "0.1.0"

_LAZY = {
    "SealWriter": "sealstore.stream",
    "SealReader": "sealstore.stream",
    "SealedFile": "sealstore.stream",
    "Header": "sealstore.format",
    "seal_file": "sealstore.kms.envelope",
    "seal_stream": "sealstore.kms.envelope",
    "unseal_file": "sealstore.kms.envelope",
    "open_sealed": "sealstore.kms.envelope",
    "open_reader": "sealstore.kms.envelope",
    "verify_file": "sealstore.kms.envelope",
    "unwrap_dek": "sealstore.kms.envelope",
    "inspect_file": "sealstore.inspect",
    "create_keyring": "sealstore.kms.local",
    # New identities are HPKE (x25519 by default, kem="mlkem768x25519" for escrow that
    # must outlive a quantum computer); sealstore.kms.x25519.generate_identity still
    # makes the sealed-box kind.
    "generate_identity": "sealstore.kms.hpke",
    "load_identity": "sealstore.kms.registry",
    "wrapper_for": "sealstore.kms.registry",
    "Store": "sealstore.vault.store",
    "open": "sealstore.loaders.fileio",
}

__all__ = [
    "AttestationError",
    "AuthenticationError",
    "BackendError",
    "DeviceUnavailable",
    "DataKey",
    "FormatError",
    "KeyReleaseDenied",
    "KeySlot",
    "KeyUnavailable",
    "NotFound",
    "SealstoreError",
    "UnsupportedVersion",
    "Unwrapper",
    "Wrapper",
    # Not "open": a star import would shadow the builtin.
    *sorted(set(_LAZY) - {"open"}),
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sealstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
