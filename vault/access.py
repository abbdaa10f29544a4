"""Roles per tenant in the store: reader, publisher, admin.

The store config (signed by the root key) carries an ``access`` map,
``{TENANT or "*": {KEY_ID: ROLE}}``. A principal of the store is a signing
key; what it may do in a tenant is the higher of its role there and its role
under ``"*"``. The root key is admin everywhere.

Every write to a store is a signed document, so the roles are enforced where
it counts -- on reading: a manifest or tag of tenant T is accepted only if
its signer is at least a publisher of T, and so is T's signed sequence (the
freshness record every tag and manifest write re-signs,
``sealstore.vault.freshness``); a crypto-shred tombstone, a rotated manifest
or a safe-mode state only if an admin signed it. A key with the
wrong role can write bytes into the bucket, but every reader refuses them.
Writers also check their own role first, to fail before uploading anything.

Reading itself is not a store permission: ciphertext is useless without the
data key, and who may have the key is the key service's and the broker's
decision (the broker's identities carry the same three roles).

A config without ``access`` (stores made before roles existed) gives every
signer admin everywhere, as those stores did; ``sealstore store grant``
writes an ``access`` map and ends that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sealstore.errors import FormatError
from sealstore.signing import public_key_bytes
from sealstore.vault.manifest import check_name

__all__ = [
    "ROLES",
    "WILDCARD",
    "check_access",
    "covers",
    "higher",
    "keys_with",
    "role_of",
    "roles_by_key",
    "with_grant",
]

ROLES = ("reader", "publisher", "admin")  # each includes the ones before it
WILDCARD = "*"


def _rank(role: str | None) -> int:
    return ROLES.index(role) + 1 if role in ROLES else 0


def higher(a: str | None, b: str | None) -> str | None:
    """The higher of two roles (None: no role)."""
    best = max(a, b, key=_rank)
    return best if _rank(best) else None


def covers(have: str | None, need: str) -> bool:
    """Whether the role *have* includes *need*."""
    return _rank(have) >= _rank(check_role(need))


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return role


def check_access(config: Mapping[str, Any], where: str) -> None:
    """Raise FormatError if the config's access map is malformed."""
    access = config.get("access")
    if access is None:
        return
    if not isinstance(access, dict):
        raise FormatError(f"{where}: access is not a map")
    for tenant, grants in access.items():
        if tenant != WILDCARD:
            try:
                check_name(tenant, "tenant")
            except ValueError:
                raise FormatError(f"{where}: access names a bad tenant {tenant!r}") from None
        if not isinstance(grants, dict) or not all(
            isinstance(k, str) and v in ROLES for k, v in grants.items()
        ):
            raise FormatError(f"{where}: access.{tenant} is not a map of key -> role")


def role_of(config: Mapping[str, Any], key_id: str, tenant: str) -> str | None:
    """The role of *key_id* in *tenant* (None: no role at all)."""
    if key_id == config.get("root"):
        return "admin"
    if key_id not in config.get("signers", ()):
        return None
    access = config.get("access")
    if access is None:
        return "admin"  # a store from before roles: every signer could do everything
    here = access.get(tenant, {}).get(key_id) if tenant != WILDCARD else None
    everywhere = access.get(WILDCARD, {}).get(key_id)
    return higher(here, everywhere)


def roles_by_key(config: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Signing key -> {tenant or ``"*"`` -> role}, as the config grants them."""
    out: dict[str, dict[str, str]] = {k: {} for k in config.get("signers", ())}
    access = config.get("access")
    for key in out:
        if key == config.get("root") or access is None:
            out[key][WILDCARD] = "admin"
    for tenant, grants in (access or {}).items():
        for key, role in grants.items():
            if key in out and key != config.get("root"):
                out[key][tenant] = role
    return out


def keys_with(config: Mapping[str, Any], tenant: str, role: str) -> list[str]:
    """The signing keys with at least *role* in *tenant* (for ``"*"``: in every tenant)."""
    return [k for k in config.get("signers", ()) if covers(role_of(config, k, tenant), role)]


def with_grant(
    config: Mapping[str, Any], key_id: str, tenant: str, role: str | None
) -> dict[str, Any]:
    """A copy of the config body with *key_id*'s role in *tenant* set (None: revoked).

    A granted key joins the signers; a key left with no role anywhere leaves them.
    """
    try:
        public_key_bytes(key_id)
    except FormatError as exc:
        raise ValueError(str(exc)) from None
    if tenant != WILDCARD:
        check_name(tenant, "tenant")
    if role is not None:
        check_role(role)
    if key_id == config.get("root"):
        raise ValueError("the root key is admin everywhere; its role cannot change")
    body = {k: v for k, v in config.items() if k not in ("signer", "signature")}
    signers = list(body.get("signers", []))
    # Writing the first grant turns roles on: the signers of an old store keep
    # what they could do, as admins everywhere, until someone narrows them.
    access = {t: dict(g) for t, g in body.get("access", {}).items()}
    if "access" not in body:
        access = {WILDCARD: {k: "admin" for k in signers if k != body.get("root")}}
    grants = access.setdefault(tenant, {})
    if role is None:
        grants.pop(key_id, None)
    else:
        grants[key_id] = role
    access = {t: g for t, g in access.items() if g}
    granted = {k for g in access.values() for k in g}
    body["signers"] = [k for k in signers if k == body.get("root") or k in granted]
    if role is not None and key_id not in body["signers"]:
        body["signers"].append(key_id)
    body["access"] = access
    return body
