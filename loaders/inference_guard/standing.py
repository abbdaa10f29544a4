"""Where the guard learns of a lockdown: the brokers that released the model's key."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sealstore.loaders.inference_guard.policy import GuardPolicy


def _standing_source(source: Any) -> Callable[[], tuple[str, str]]:
    if callable(getattr(source, "standing", None)):
        return source.standing
    if callable(source):
        return source
    if isinstance(source, str):
        from sealstore.kms.registry import wrapper_for

        key = wrapper_for(source)
        if callable(getattr(key, "standing", None)):
            return key.standing
    raise ValueError(
        f"not a lockdown source (a broker key URI or an object with standing()): {source!r:.80}"
    )


def standing_sources(policy: GuardPolicy, found: Sequence[Any] = ()) -> list[Any]:
    """The lockdown sources of *policy*; *found*: the load's brokers, for ``"auto"``."""
    spec = policy.lockdown
    if spec is None or spec == "off":
        return []
    if spec == "auto":
        return list(found)
    return list(spec) if isinstance(spec, list | tuple) else [spec]


def brokers_for(slots: Sequence[Any], identities: Sequence[Any] = ()) -> list[Any]:
    """The key-release brokers among *slots* this process may ask (the identities given,
    or the slot's broker if ``SEALSTORE_BROKERS`` trusts it): the lockdown sources."""
    from sealstore.kms.registry import unwrappers_for

    objs = [i for i in identities if hasattr(i, "unwrap")]
    out: list[Any] = []
    for slot in slots:
        if not str(slot.kind).startswith("broker+"):
            continue
        for u in unwrappers_for(slot, objs):
            if callable(getattr(u, "standing", None)):
                out.append(u)
                break
    return out
