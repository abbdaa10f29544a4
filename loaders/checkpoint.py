"""Encrypted training checkpoints in the store: save each step, resume from the newest good one.

``save_checkpoint`` serialises a training state (model and optimizer state
dicts, step, RNG state...) with ``torch.save`` straight into the sealing
writer of a push, as version ``STEP`` of an artifact: no plaintext file and
no plaintext copy in memory (tensors are sealed from their own storage), and
committed atomically like every push: a save killed midway leaves no
version. ``load_latest_checkpoint`` walks the versions newest
first and returns the first whose signature, object digest and every chunk
verify; a newest checkpoint that fails (tampered, truncated, its object
lost) is skipped with a warning, so training resumes from the one before.

Checkpoints load weights-only, plus :data:`RNG_STATE_GLOBALS`: what
``numpy.random.get_state()`` and a ``numpy.random.Generator``'s
``bit_generator.state`` pickle to (arrays of unsigned integers), and nothing
else. torch's and Python's RNG states (a uint8 tensor; tuples of ints) need
no allowance.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from sealstore.errors import AuthenticationError, FormatError, NotFound
from sealstore.kms.envelope import IdentitySpec, KeySpec

__all__ = [
    "RNG_STATE_GLOBALS",
    "CheckpointWarning",
    "load_latest_checkpoint",
    "save_checkpoint",
]

FILE = "checkpoint.pt"


def _rng_state_globals() -> list[Any]:
    """The checkpoint allowlist (see :data:`RNG_STATE_GLOBALS`), imported when needed."""
    try:
        import numpy as np
    except ImportError:  # without numpy, no checkpoint holds numpy state either
        return []
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

    return [
        # ndarray.__reduce__: _reconstruct(ndarray, ...) then ndarray.__setstate__.
        _reconstruct,
        # numpy < 2 wrote the same function under its old module name.
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        # The dtypes of RNG state arrays: MT19937's key (uint32); Philox's and
        # SFC64's counters and keys (uint64). Any other dtype is refused.
        np.dtypes.UInt32DType,
        np.dtypes.UInt64DType,
    ]


#: What a checkpoint may hold beyond torch's weights-only set, by name.
RNG_STATE_GLOBALS = (
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "numpy.dtypes.UInt64DType",
)


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

    ``torch.save`` writes straight into the sealing writer: the plaintext is
    never held whole in memory nor written to disk.

    Args:
        state: the training state (state dicts, step, RNG states...).
        store: the :class:`~sealstore.vault.store.Store`.
        name: the artifact.
        step: the version, a non-negative integer.
        keys, dek_from, tenant: as for ``Store.push``.

    Returns:
        The committed manifest.

    Raises:
        ValueError: a bad step, or no keys.
        FileExistsError: that step was already saved.
    """
    import torch

    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError("step must be a non-negative integer")
    return store.push(
        {FILE: lambda out: torch.save(state, out)},
        f"{name}:{step}",
        keys=keys,
        dek_from=dek_from,
        tenant=tenant,
    )


def load_latest_checkpoint(
    store: Any,
    name: str,
    *,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    map_location: Any = "cpu",
) -> tuple[int, Any]:
    """(step, state) of the newest checkpoint that verifies.

    The state is unpickled weights-only, with :data:`RNG_STATE_GLOBALS` allowed.

    Args:
        store: the :class:`~sealstore.vault.store.Store`.
        name: the artifact.
        tenant, identities: the tenant and the keys to open it with.
        map_location: as for ``torch.load``.

    Returns:
        The step and the state.

    Raises:
        NotFound: no checkpoint of *name* verifies (or none exists).
        KeyUnavailable: the keys are missing -- never a reason to fall back.
        pickle.UnpicklingError: a checkpoint that verifies holds a type
            outside the allowlist (named) -- never a reason to fall back either.
    """
    from sealstore.loaders.torch_io import torch_load

    steps = sorted(
        (int(v) for v in store.versions(name, tenant=tenant) if v.isdigit()), reverse=True
    )
    failures = []
    for step in steps:
        try:
            m = store.manifest(f"{name}:{step}", tenant=tenant)
            if m.shredded:
                continue
            state = torch_load(
                f"{name}:{step}/{FILE}",
                store=store,
                tenant=tenant,
                identities=identities,
                map_location=map_location,
                safe_globals=_rng_state_globals(),
            )
        # An UnpicklingError is not caught: the object's digest was checked
        # against the signed manifest and every byte the unpickler read was
        # authenticated, so a refusal means the payload holds more than the
        # allowlist -- falling back would silently lose training.
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
