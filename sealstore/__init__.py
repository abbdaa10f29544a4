"""sealstore: sealed model artifacts, attested key release, streaming decryption.

The public facade. Errors and the key types are imported eagerly (they are
the ground floor); everything built on the floors above is re-exported
lazily (PEP 562), so ``import sealstore`` never imports a provider, the
store, torch or numba. The same names are imported under ``TYPE_CHECKING``
(never at run time), so a type checker sees each lazy name's real signature:
``from sealstore import Store, load_file`` is typed for mypy and pyright while
``import sealstore`` stays lazy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sealstore.errors import (
    AttestationError,
    AuthenticationError,
    BackendError,
    DeviceUnavailable,
    FormatError,
    InferenceRefused,
    KeyReleaseDenied,
    KeyUnavailable,
    NotFound,
    Refused,
    SealstoreError,
    Terminated,
    UnsupportedVersion,
)
from sealstore.keys import DataKey, KeySlot, Unwrapper, Wrapper

if TYPE_CHECKING:
    # One import per name of _LAZY, from the module _LAZY names
    # (tests/test_public_api.py holds the two lists together).
    from sealstore.format import Header
    from sealstore.inspect import inspect_file
    from sealstore.kms.envelope import (
        open_reader,
        open_sealed,
        seal_file,
        seal_stream,
        unseal_file,
        unwrap_dek,
        verify_file,
    )
    from sealstore.kms.hpke import generate_identity
    from sealstore.kms.local import create_keyring
    from sealstore.kms.registry import load_identity, wrapper_for
    from sealstore.loaders.fileio import open as open
    from sealstore.loaders.safetensors import load_file, safe_open, save_file
    from sealstore.stream import SealedFile, SealReader, SealWriter
    from sealstore.vault.store import Store

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
    # safetensors' three (sealstore.loaders has the rest of its API); torch loads on first use.
    "load_file": "sealstore.loaders.safetensors",
    "save_file": "sealstore.loaders.safetensors",
    "safe_open": "sealstore.loaders.safetensors",
}

# The errors, the key types and _LAZY's names but "open" (a star import would shadow the
# builtin); tests/test_public_api.py checks the list against _LAZY.
__all__ = [
    "AttestationError",
    "AuthenticationError",
    "BackendError",
    "DataKey",
    "DeviceUnavailable",
    "FormatError",
    "Header",
    "InferenceRefused",
    "KeyReleaseDenied",
    "KeySlot",
    "KeyUnavailable",
    "NotFound",
    "Refused",
    "SealReader",
    "SealWriter",
    "SealedFile",
    "SealstoreError",
    "Store",
    "Terminated",
    "UnsupportedVersion",
    "Unwrapper",
    "Wrapper",
    "create_keyring",
    "generate_identity",
    "inspect_file",
    "load_file",
    "load_identity",
    "open_reader",
    "open_sealed",
    "safe_open",
    "save_file",
    "seal_file",
    "seal_stream",
    "unseal_file",
    "unwrap_dek",
    "verify_file",
    "wrapper_for",
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
