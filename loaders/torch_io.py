"""``torch_save`` / ``torch_load``: sealed ``.pt`` payloads, never arbitrary unpickling.

``torch_load`` always calls ``torch.load(..., weights_only=True)``: tensors,
primitive containers and numbers only. A pickle that would run code is
refused by torch's restricted unpickler, even from a correctly sealed file:
a sealed file proves who sealed it, not that its pickle is harmless.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

from sealstore.kms.envelope import IdentitySpec, KeySpec, atomic_output, seal_stream
from sealstore.loaders.sources import open_source

__all__ = ["torch_load", "torch_save"]


def torch_save(
    obj: Any,
    dst: str | os.PathLike[str],
    *,
    keys: Sequence[KeySpec],
    context: Mapping[str, str] | None = None,
    dek_from: KeySpec | None = None,
    threads: int = 2,
) -> None:
    """``torch.save(obj)`` sealed into *dst* (atomically)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    with atomic_output(dst) as out:
        seal_stream(io.BytesIO(data), out, keys, context=context, plaintext_size=len(data),
                    threads=threads, dek_from=dek_from)  # fmt: skip


def torch_load(
    src: Any,
    *,
    map_location: Any = "cpu",
    store: Any = None,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    threads: int = 2,
) -> Any:
    """``torch.load(..., weights_only=True)`` of a sealed ``.pt`` (file, URL or store reference).

    Raises:
        AuthenticationError: any chunk fails (nothing is unpickled).
        pickle.UnpicklingError: the payload holds more than weights.
    """
    import torch

    sf = open_source(src, store=store, tenant=tenant, identities=identities, suffix=".pt")
    try:
        buf = bytearray(sf.size)
        sf.read_into(0, buf, threads=threads)  # every chunk authenticated before unpickling
    finally:
        if sf is not src:
            sf.close()
    try:
        return torch.load(io.BytesIO(buf), map_location=map_location, weights_only=True)
    finally:
        buf[:] = bytes(len(buf))  # the serialised plaintext is not left to the collector
