"""The provider registry: URI scheme -> dotted class path, imported lazily."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sealstore.errors import FormatError, NotFound
from sealstore.keys import KeySlot, Refusal, Unwrapper, Wrapper

__all__ = [
    "default_keyring_path",
    "get_provider_class",
    "known_schemes",
    "load_identity",
    "register_provider",
    "sealstore_home",
    "unwrappers_for",
    "wrapper_for",
]

# scheme -> (dotted "module:Class", install hint when the import fails)
_REGISTRY: dict[str, tuple[str, str | None]] = {
    "local": ("sealstore.kms.local:LocalKeyring", None),
    "x25519": ("sealstore.kms.x25519:X25519Recipient", None),
    "hpke": ("sealstore.kms.hpke:HpkeRecipient", None),
    "age": ("sealstore.kms.age:AgeRecipient", 'pip install "sealstore[age]"'),
    "vault-transit": (
        "sealstore.kms.vault_transit:VaultTransitKey",
        'pip install "sealstore[vault]"',
    ),
    "aws-kms": ("sealstore.kms.aws_kms:AwsKmsKey", 'pip install "sealstore[aws]"'),
    # Providers that need attestation live on the enclave/ floor; named here by
    # path only, so kms/ never imports them.
    "tpm": ("sealstore.enclave.attestation.tpm_kek:TpmKek", 'pip install "sealstore[tpm]"'),
    "broker+https": ("sealstore.enclave.broker.client:BrokerKey", None),
}
_loaded: dict[str, type] = {}


def register_provider(
    scheme: str, target: str, hint: str | None = None, *, clobber: bool = False
) -> None:
    """Register *target* (``"package.module:Class"``) for URIs ``scheme:...``.

    Raises:
        ValueError: the scheme is taken and *clobber* is false.
    """
    if scheme in _REGISTRY and not clobber and _REGISTRY[scheme][0] != target:
        raise ValueError(f"key provider scheme {scheme!r} is already registered")
    _REGISTRY[scheme] = (target, hint)
    _loaded.pop(scheme, None)


def known_schemes() -> list[str]:
    return sorted(_REGISTRY)


def _scheme(uri: str) -> str:
    if uri.startswith("age1"):
        return "age"  # an age recipient as age-keygen prints it
    scheme, sep, _ = uri.partition(":")
    if not sep or not scheme:
        raise ValueError(
            f"key URI {uri!r} has no scheme (expected e.g. local:PATH or hpke:x25519:KEY)"
        )
    return scheme


def get_provider_class(scheme: str) -> type:
    """Import and return the provider class for *scheme*.

    Raises:
        ValueError: no provider is registered for it.
        ImportError: its optional dependency is missing (the message has the install hint).
    """
    if scheme in _loaded:
        return _loaded[scheme]
    try:
        target, hint = _REGISTRY[scheme]
    except KeyError:
        raise ValueError(
            f"unknown key provider scheme {scheme!r}; known: {', '.join(known_schemes())}"
        ) from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, attr, None)
        if cls is None:
            raise ImportError(f"{module_name} has no {attr}")
    except ImportError as exc:
        extra = f"; install it with: {hint}" if hint else ""
        raise ImportError(f"key provider {scheme!r} is not available ({exc}){extra}") from exc
    _loaded[scheme] = cls
    return cls


def wrapper_for(uri: str) -> Wrapper:
    """The wrapper for a key URI such as ``local:PATH`` or ``x25519:KEY``.

    Credentials and endpoints come from the URI and the environment. A provider's own
    options (a ready client, a token, a region) are its class's keyword arguments:
    ``VaultTransitKey(uri, token=...)``, ``AwsKmsKey.from_uri(uri, region=...)``.

    Args:
        uri: the key URI; its scheme picks the provider.

    Returns:
        The provider's wrapper for that key.

    Raises:
        ValueError: no scheme, an unknown scheme, or a URI the provider cannot parse.
        ImportError: the provider's optional dependency is missing (with the install hint).
    """
    provider: Any = get_provider_class(_scheme(uri))  # each provider's own from_uri
    wrapper: Wrapper = provider.from_uri(uri)
    return wrapper


def sealstore_home() -> Path:
    """``$SEALSTORE_HOME``, else ``~/.config/sealstore``: keyring, trust pins, default store."""
    home = os.environ.get("SEALSTORE_HOME")
    return Path(home) if home else Path.home() / ".config" / "sealstore"


def default_keyring_path() -> Path:
    """``$SEALSTORE_KEYRING``, else ``$SEALSTORE_HOME/keyring.json``, else ~/.config/sealstore."""
    env = os.environ.get("SEALSTORE_KEYRING")
    if env:
        return Path(env)
    return sealstore_home() / "keyring.json"


def load_identity(path: str | os.PathLike[str]) -> Unwrapper:
    """Load an identity file: HPKE, X25519, age (or an OpenSSH key), or a keyring.

    Raises:
        NotFound: no such file.
        FormatError: the file is neither.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"identity file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"cannot read identity file {p}: {exc.__class__.__name__}") from None
    if text.lstrip().startswith("{"):
        scheme = "local"
    elif "AGE-SECRET-KEY-1" in text or "-----BEGIN OPENSSH PRIVATE KEY-----" in text:
        scheme = "age"
    elif "SEALSTORE-HPKE-IDENTITY:" in text:
        scheme = "hpke"
    else:
        scheme = "x25519"
    provider: Any = get_provider_class(scheme)
    identity: Unwrapper = (
        provider.open(p) if scheme == "local" else provider.identity_from_text(text, source=str(p))
    )
    return identity


def unwrappers_for(slot: KeySlot, identities: Sequence[Unwrapper] = ()) -> Iterator[Unwrapper]:
    """The unwrappers worth trying on *slot*: matching identities, then its own provider."""
    for ident in identities:
        if getattr(ident, "can_unwrap", lambda s: True)(slot):
            yield ident
    try:
        cls = get_provider_class(slot.kind)
    except ValueError:
        yield Refusal(f"no key provider for slot kind {slot.kind!r}")
        return
    except ImportError as exc:
        yield Refusal(str(exc))
        return
    finder = getattr(cls, "unwrapper_for_slot", None)
    if finder is not None:
        found = finder(slot)
        if found is not None:
            yield found
