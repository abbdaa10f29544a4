"""Key rotation: re-wrap a file's data key into new slots; the payload is never touched.

The key slots sit outside the authenticated header on purpose (FORMAT.md):
rotating a KEK rewrites only the slot section, so the payload bytes stay
identical and a rotation costs a copy, not a re-encryption. A slot whose key
is rotated in place (a Vault Transit key version n -> n+1) is moved with the
provider's own ``rewrap`` when it has one, so the DEK need not leave the
key service for it.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from sealstore.errors import KeyUnavailable
from sealstore.format import Preamble, read_preamble
from sealstore.fsutil import atomic_file
from sealstore.keys import KeySlot
from sealstore.kms.envelope import IdentitySpec, unwrap_dek
from sealstore.kms.registry import get_provider_class, unwrappers_for, wrapper_for

__all__ = ["rotate_file", "rotate_slots"]


def _names(uri: str, slot: KeySlot) -> bool:
    """Whether key *uri* is the key of *slot*: the same URI, or one the provider equates.

    ``local:`` and ``local:~/k.json`` name the keyring a slot recorded as
    ``local:/home/me/k.json``; a plain string compare would add a second slot
    for it, or fail to find the one to remove.
    """
    if slot.key_id == uri:
        return True
    scheme = uri.partition(":")[0]
    if scheme != slot.kind:
        return False
    try:
        names = getattr(get_provider_class(scheme), "names_slot", None)
    except (ValueError, ImportError):
        return False
    return bool(names is not None and names(uri, slot))


def rotate_slots(
    preamble: Preamble,
    to: Sequence[str],
    *,
    remove: Sequence[str] = (),
    identities: Sequence[IdentitySpec] = (),
    slots: Sequence[KeySlot] | None = None,
    context: Mapping[str, str] | None = None,
) -> list[KeySlot]:
    """The new slot list of a sealed object.

    Args:
        preamble: the object's preamble (its header gives the context).
        to: key URIs to wrap the DEK to. A URI that already has a slot is
            re-wrapped in place (the provider's ``rewrap`` when it has one).
        remove: key URIs whose slots are dropped.
        identities: identity files or unwrappers to open the current slots.
        slots: the current slots when they are held outside the file.
        context: the context the slots are bound to (default: the header's;
            a store manifest's slots are bound to the version's context).

    Raises:
        KeyUnavailable, AuthenticationError: the DEK cannot be recovered.
        ValueError: nothing to do, a --remove key with no slot, or no slot would remain.
    """
    if not to and not remove:
        raise ValueError("nothing to rotate: give --to and/or --remove")
    current = list(preamble.slots if slots is None else slots)
    context = preamble.header.context if context is None else dict(context)
    unmatched = [uri for uri in remove if not any(_names(uri, slot) for slot in current)]
    if unmatched:
        # A typo here would otherwise leave the key one meant to revoke in place.
        raise ValueError(f"no key slot to remove for: {', '.join(unmatched)}")
    # Rotation proves access to the current slots: never from a cache.
    with unwrap_dek(preamble, identities, slots=current, cache=None, context=context) as dek:
        result = [slot for slot in current if not any(_names(uri, slot) for uri in remove)]
        for uri in to:
            existing = [i for i, slot in enumerate(result) if _names(uri, slot)]
            if not existing:
                result.append(wrapper_for(uri).wrap(dek, context))
                continue
            for i in existing:
                provider = next(iter(unwrappers_for(result[i])), None)
                rewrap = getattr(provider, "rewrap", None)
                if rewrap is None:
                    result[i] = wrapper_for(uri).wrap(dek, context)
                    continue
                moved = rewrap(result[i], context)
                # The old slot is about to be replaced: prove the new one opens
                # to the same key first, or a bad rewrap would lose the file.
                with provider.unwrap(moved, context) as check:
                    if not hmac.compare_digest(check.material(), dek.material()):
                        raise KeyUnavailable(f"{uri}: the rewrapped slot holds another key")
                result[i] = moved
    if not result:
        raise ValueError("refusing to remove every key slot: the file could never be opened")
    return result


def rotate_file(
    path: str | os.PathLike[str],
    to: Sequence[str],
    *,
    remove: Sequence[str] = (),
    identities: Sequence[IdentitySpec] = (),
) -> list[KeySlot]:
    """Rewrite the slot section of the sealed file at *path*, atomically.

    The payload bytes are copied unchanged after the new preamble.

    Returns:
        The new slots.

    Raises:
        ValueError: the file's slots are detached (held in a store manifest).
        As :func:`rotate_slots` otherwise.
    """
    # Through a symlink, rotate the file it points at (the link stays a link).
    source = Path(path).resolve()
    with source.open("rb") as fin:
        preamble = read_preamble(fin)
        if preamble.slots_size == 0:
            raise ValueError(f"{source}: its key slots are held in a store manifest")
        new_slots = rotate_slots(preamble, to, remove=remove, identities=identities)
        st = os.fstat(fin.fileno())
        with atomic_file(source, mode=st.st_mode & 0o777) as fout:
            with contextlib.suppress(PermissionError):
                os.fchown(fout.fileno(), st.st_uid, st.st_gid)
            fout.write(preamble.with_slots(new_slots))
            shutil.copyfileobj(fin, fout, 4 << 20)
    return new_slots
