"""``save_file``, ``load_file``, ``save``, ``load`` for sealed safetensors, in numpy.

The counterpart of ``safetensors.numpy``, as ``sealstore.loaders.safetensors``
is of ``safetensors.torch``: the same sealed files, read into numpy arrays
(each with its own buffer, filled by decryption directly) and written from
them. ``safe_open(src, framework="np")`` gives lazy access. torch is never
imported here.

numpy has no bfloat16, float8 or float4: a file holding one of those loads
in torch only (``TypeError``, as ``safetensors.numpy`` raises).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sealstore.kms.envelope import IdentitySpec, KeySpec, atomic_output, open_sealed, seal_writer
from sealstore.loaders.sources import open_source
from sealstore.loaders.st_header import Layout, header_bytes
from sealstore.stream import SealedFile

__all__ = ["load", "load_file", "save", "save_file"]

_NP = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "C64": np.complex64,
}
_CODES = {np.dtype(v): k for k, v in _NP.items()}


def _threads(threads: int | None) -> int:
    from sealstore.loaders.safetensors import default_threads

    return threads or default_threads()


def _np_dtype(name: str, code: str) -> np.dtype:
    if code not in _NP:
        raise TypeError(f"tensor {name!r} is {code}: numpy has no such dtype; load it in torch")
    return np.dtype(_NP[code]).newbyteorder("<")  # safetensors is little-endian


def read_array(
    sf: SealedFile,
    layout: Layout,
    name: str,
    start: int,
    end: int,
    code: str,
    shape: list[int],
    threads: int,
) -> np.ndarray:
    """Bytes [start, end) of *layout*'s data region as an array of *code* / *shape*."""
    dtype = _np_dtype(name, code)
    buf = np.empty(end - start, dtype=np.uint8)
    if end > start:
        sf.read_into(layout.data_start + start, buf, threads=threads)
    return buf.view(dtype).reshape(shape)


def read_arrays(sf: SealedFile, layout: Layout, threads: int) -> dict[str, np.ndarray]:
    """Every tensor of *sf* in file order, decrypted in one pass into its own array."""
    names = layout.offset_keys()
    dtypes = {n: _np_dtype(n, layout.entries[n][0]) for n in names}  # refuse before decrypting
    bufs, pieces = {}, []
    for name in names:
        _, _, start, end = layout.entries[name]
        bufs[name] = np.empty(end - start, dtype=np.uint8)
        pieces.append((layout.data_start + start, bufs[name]))
    sf.read_scatter(pieces, threads=threads)
    return {n: bufs[n].view(dtypes[n]).reshape(layout.entries[n][1]) for n in names}


def load_file(
    src: Any,
    *,
    identities: Sequence[IdentitySpec] = (),
    store: Any = None,
    tenant: str | None = None,
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Load a sealed safetensors file: the dict ``safetensors.numpy.load_file`` gives.

    Args:
        src: a sealed file path or URL, or a store reference (as
            ``sealstore.loaders.load_file``).
        identities, store, tenant, threads: as ``sealstore.loaders.load_file``.

    Returns:
        name -> array in file order, each with its own buffer.

    Raises:
        TypeError: a tensor numpy has no dtype for (bfloat16, float8, float4).
        AuthenticationError, KeyUnavailable, NotFound, FormatError.
    """
    opened = open_source(src, store=store, tenant=tenant, identities=identities)
    with opened if opened is not src else contextlib.nullcontext(opened) as sf:
        return read_arrays(sf, Layout.before_full_read(sf), _threads(threads))


def load(
    data: bytes | bytearray | memoryview,
    *,
    identities: Sequence[IdentitySpec] = (),
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Load sealed safetensors bytes (what :func:`save` returns), as ``safetensors.numpy.load``.

    Raises:
        TypeError: *data* is not bytes-like, or a tensor numpy has no dtype for.
        AuthenticationError, KeyUnavailable, FormatError.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load() takes the sealed bytes, not {type(data).__name__}")
    with open_sealed(data, identities) as sf:
        return read_arrays(sf, Layout.before_full_read(sf), _threads(threads))


def _plan(
    tensor_dict: Mapping[str, Any], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[np.ndarray]]:
    if not isinstance(tensor_dict, Mapping):
        raise ValueError(f"expected a dict of str -> ndarray, not {type(tensor_dict).__name__}")
    items, arrays = [], []
    for name, a in tensor_dict.items():
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{name!r} is not a numpy.ndarray but {type(a).__name__}")
        code = _CODES.get(a.dtype.newbyteorder("="))
        if code is None:
            raise ValueError(f"{name!r} has a dtype safetensors cannot store: {a.dtype}")
        items.append((name, code, list(a.shape), a.nbytes))
        arrays.append(a)
    head, order = header_bytes(items, metadata)
    return head, [arrays[i] for i in order]


def _seal(
    head: bytes,
    arrays: list[np.ndarray],
    out: Any,
    keys: Sequence[KeySpec],
    context: Mapping[str, str] | None,
    dek_from: KeySpec | None,
    threads: int,
) -> None:
    total = len(head) + sum(a.nbytes for a in arrays)
    with seal_writer(
        out, keys, context=context, plaintext_size=total, threads=threads, dek_from=dek_from
    ) as writer:
        writer.write(head)
        for a in arrays:
            if a.size:
                # Little-endian and C order, copying only an array that is neither:
                # safetensors.numpy writes a non-contiguous array's raw memory instead.
                little = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
                writer.write(little.reshape(-1).view(np.uint8))


def save_file(
    tensor_dict: Mapping[str, np.ndarray],
    dst: str | os.PathLike[str],
    *,
    keys: Sequence[KeySpec],
    metadata: Mapping[str, str] | None = None,
    context: Mapping[str, str] | None = None,
    dek_from: KeySpec | None = None,
    threads: int = 2,
) -> None:
    """Write numpy arrays as a safetensors file sealed into *dst*, atomically (streamed).

    The plaintext is what ``safetensors.numpy.save_file`` writes for the same
    (contiguous) arrays; big-endian arrays are written little-endian, as it does.

    Args:
        tensor_dict: name -> array.
        dst, keys, metadata, context, dek_from, threads: as ``sealstore.loaders.save_file``.

    Raises:
        ValueError: not an array, or a dtype safetensors cannot store (nothing is written).
    """
    head, arrays = _plan(tensor_dict, metadata)
    with atomic_output(dst) as out:
        _seal(head, arrays, out, keys, context, dek_from, threads)


def save(
    tensor_dict: Mapping[str, np.ndarray],
    *,
    keys: Sequence[KeySpec],
    metadata: Mapping[str, str] | None = None,
    context: Mapping[str, str] | None = None,
    dek_from: KeySpec | None = None,
    threads: int = 2,
) -> bytes:
    """:func:`save_file` into memory: the sealed bytes (only ciphertext is assembled).

    Raises:
        ValueError: as :func:`save_file`.
    """
    head, arrays = _plan(tensor_dict, metadata)
    out = io.BytesIO()
    _seal(head, arrays, out, keys, context, dek_from, threads)
    return out.getvalue()
