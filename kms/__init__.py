"""Key providers, chosen by URI scheme through a lazy registry.

A provider class is named by a dotted path and imported only when a URI of
its scheme is used (fsspec's registry pattern), so a missing optional
dependency costs nothing until it is needed and then fails with an install
hint. Providers that need attestation register from ``sealstore.enclave``
the same way; this floor never imports it.
"""

from sealstore.kms.registry import (
    default_keyring_path,
    get_provider_class,
    known_schemes,
    load_identity,
    register_provider,
    unwrappers_for,
    wrapper_for,
)

__all__ = [
    "default_keyring_path",
    "get_provider_class",
    "known_schemes",
    "load_identity",
    "register_provider",
    "unwrappers_for",
    "wrapper_for",
]
