"""A transformer-shaped state dict, its tensor-parallel rules, and a decrypted-bytes counter.

Shared by benchmarks/rank_load.py and tests/test_partition.py, so both measure
the same model and count bytes the same way.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

# Megatron's split: qkv and up column-parallel (dim 0 of [out, in] and the
# bias), proj and down row-parallel (dim 1; the bias whole), the embedding by
# vocabulary (dim 0), the norms replicated.
RULES = {
    "column": ("*.qkv.*", "*.up.*"),
    "row": ("*.proj.*", "*.down.*"),
    "vocab": ("embed.*",),
}


def synthetic(hidden: int, ff: int, vocab: int, layers: int, dtype: Any = None) -> dict[str, Any]:
    """A seeded random state dict shaped like a *layers*-layer transformer (fp32 by default)."""
    import torch

    g = torch.Generator().manual_seed(7)
    dtype = dtype or torch.float32

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    out = {"embed.weight": randn(vocab, hidden)}
    for i in range(layers):
        for name, shape in {
            "qkv.weight": (3 * hidden, hidden),
            "qkv.bias": (3 * hidden,),
            "proj.weight": (hidden, hidden),
            "proj.bias": (hidden,),
            "up.weight": (ff, hidden),
            "up.bias": (ff,),
            "down.weight": (hidden, ff),
            "down.bias": (hidden,),
            "norm.weight": (hidden,),
        }.items():
            out[f"layers.{i}.{name}"] = randn(*shape)
    return out


@contextlib.contextmanager
def decrypted() -> Iterator[list[int]]:
    """Sum the plaintext bytes of every chunk decrypted meanwhile (into the list's one item).

    Every chunk decryption goes through ``SealedFile._decrypt_chunk`` (the final
    chunk's end check and the header's reads too); ``read_scatter``'s progress
    counts bytes copied out instead, which is not what a partial load saves.
    """
    from sealstore.stream import SealedFile

    real = SealedFile._decrypt_chunk
    total = [0]
    lock = threading.Lock()  # the lanes decrypt on several threads

    def counting(self: SealedFile, i: int, buf: Any) -> int:
        n = real(self, i, buf)
        with lock:
            total[0] += n
        return n

    SealedFile._decrypt_chunk = counting  # type: ignore[method-assign]
    try:
        yield total
    finally:
        SealedFile._decrypt_chunk = real  # type: ignore[method-assign]
