"""Encrypted training checkpoints in the store: save each step, resume from the newest good one.

``save_checkpoint`` serialises a training state (model and optimizer state
dicts, step, RNG state...) with ``torch.save`` in memory and pushes it as
version ``STEP`` of an artifact -- sealed from memory, so no plaintext file
exists, and committed atomically like every push: a save killed midway
leaves no version. ``load_latest_checkpoint`` walks the versions newest
first and returns the first whose signature, object digest and every chunk
verify; a newest checkpoint that fails (tampered, truncated, its object
lost) is skipped with a warning, so training resumes from the one before.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

from sealstore.errors import AuthenticationError, FormatError, NotFound
from sealstore.kms.envelope import IdentitySpec, KeySpec

__all__ = ["CheckpointWarning", "load_latest_checkpoint", "save_checkpoint"]

FILE = "checkpoint.pt"


class CheckpointWarning(UserWarning):
    """A checkpoint failed verification and an older one was used."""


def save_checkpoint(
    state: Any,
    store: Any,
    name: str,
    step: int,
    *,
    keys: Sequence[KeySpec] = (),
    dek_from: KeySpec | None = None,
    tenant: str | None = None,
) -> Any:
    """Seal *state* as ``NAME:STEP`` in *store* (``torch.save`` format, loaded weights-only).

    Returns:
        The committed manifest.

    Raises:
        FileExistsError: that step was already saved.
    """
    import torch

    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError("step must be a non-negative integer")
    buf = io.BytesIO()
    torch.save(state, buf)
    return store.push({FILE: buf.getbuffer()}, f"{name}:{step}", keys=keys, dek_from=dek_from,
                      tenant=tenant)  # fmt: skip


def load_latest_checkpoint(
    store: Any,
    name: str,
    *,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    map_location: Any = "cpu",
) -> tuple[int, Any]:
    """(step, state) of the newest checkpoint that verifies.

    Raises:
        NotFound: no checkpoint of *name* verifies (or none exists).
        KeyUnavailable: the keys are missing -- never a reason to fall back.
    """
    from sealstore.loaders.torch_io import torch_load

    steps = sorted((int(v) for v in store.versions(name, tenant=tenant) if v.isdigit()),
                   reverse=True)  # fmt: skip
    failures = []
    for step in steps:
        try:
            m = store.manifest(f"{name}:{step}", tenant=tenant)
            if m.shredded:
                continue
            state = torch_load(f"{name}:{step}/{FILE}", store=store, tenant=tenant,
                               identities=identities, map_location=map_location)  # fmt: skip
        # An UnpicklingError is not caught: every byte was authenticated by then,
        # so a refusal means the payload holds more than weights (or the
        # allow-list is wrong) -- falling back would silently lose training.
        except (AuthenticationError, FormatError, NotFound) as exc:
            failures.append(f"{step}: {exc}")
            warnings.warn(
                f"checkpoint {name}:{step} failed verification ({exc}); trying an older one",
                CheckpointWarning,
                stacklevel=2,
            )
            continue
        return step, state
    detail = f" ({'; '.join(failures)})" if failures else ""
    raise NotFound(f"no checkpoint of {name} verifies{detail}")
