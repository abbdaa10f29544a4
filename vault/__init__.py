"""The model store: artifacts, versions, tenants, signed manifests, the Model BoM.

``Store.open(url)`` / ``Store.init(url)`` on ``file://``, ``memory://`` or
``s3://``; see docs/STORE.md.
"""

from sealstore.vault.manifest import FileEntry, Manifest, Ref, parse_ref
from sealstore.vault.store import Store, default_store_url, default_tenant, trust_store

__all__ = [
    "FileEntry",
    "Manifest",
    "Ref",
    "Store",
    "default_store_url",
    "default_tenant",
    "parse_ref",
    "trust_store",
]
