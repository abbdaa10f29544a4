"""The safetensors header, read and written without any tensor framework.

Shared by the torch loaders (``sealstore.loaders.safetensors``) and the numpy
ones (``sealstore.loaders.safetensors_np``): dtypes are safetensors' own
codes (``"F32"``, ``"F4"``...) and shapes the header's logical shapes, so
neither torch nor numpy is imported here. Written by hand because the
header has to be parsed from a decrypting buffer, not from a file
safetensors could map (see docs/LOADERS.md).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from safetensors import SafetensorError

from sealstore.errors import FormatError, NotFound
from sealstore.format import reject_duplicate_keys
from sealstore.stream import SealedFile

__all__ = ["BITS", "Layout", "TensorNotFound", "header_bytes"]

MAX_HEADER = 100_000_000  # safetensors' own limit

# Bits per element of every dtype code sealstore reads and writes. F4 packs
# two values per byte (torch.float4_e2m1fn_x2); the F6 codes safetensors
# knows have no torch or numpy dtype and are refused as unknown.
BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U64": 64,
    "U32": 32,
    "U16": 16,
    "U8": 8,
    "BOOL": 8,
    "C64": 64,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "F4": 4,
}

# safetensors' write order (its Dtype enum, descending), checked against
# ``safetensors.torch.save`` by tests/test_loaders.py and test_loaders_parity.py.
SAVE_ORDER = [
    "U64",
    "I64",
    "F64",
    "C64",
    "F32",
    "U32",
    "I32",
    "BF16",
    "F16",
    "U16",
    "I16",
    "F8_E5M2FNUZ",
    "F8_E4M3FNUZ",
    "F8_E8M0",
    "F8_E4M3",
    "F8_E5M2",
    "I8",
    "U8",
    "F4",
    "BOOL",
]


class TensorNotFound(NotFound, KeyError, SafetensorError):
    """The file has no tensor of that name.

    A ``KeyError`` (a missing key, as a mapping raises) and safetensors' own
    ``SafetensorError`` (what ``safetensors.safe_open`` raises), so code
    written against either catches it.
    """

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _is_uint(x: Any) -> bool:
    return type(x) is int and 0 <= x < (1 << 63)


class Layout:
    """The safetensors header of a sealed file, validated as strictly as safetensors does.

    Integer fields must be JSON integers (not floats, strings or booleans);
    tensors must tile the data region exactly -- sorted by offset, no gap, no
    overlap, nothing left over -- so no two tensors can alias; a sub-byte
    tensor must end on a byte boundary; metadata is a string-to-string map.

    Attributes:
        entries: name -> ``(code, shape, start, end)``, in header order;
            *shape* is the header's (logical) shape, offsets are relative to
            *data_start*.
        metadata: ``__metadata__``, or None when the header has none.
    """

    @classmethod
    def before_full_read(cls, sf: SealedFile) -> Layout:
        """The layout of *sf*, for a caller that reads every tensor next.

        The header is parsed without waiting for a whole-object check running
        beside (``SealedFile.check_beside``: the store's object digest); the
        full read that follows waits for it before returning anything, so the
        hash overlaps that read's decryption instead of preceding it. A header
        that does not parse is reported as a failed check if the check fails.
        """
        check = sf.detach_check()
        try:
            layout = cls(sf)
        except BaseException:
            if check is not None:
                check()  # a substituted object is reported as such
            raise
        finally:
            if check is not None:
                sf.check_beside(check)
        return layout

    def __init__(self, sf: SealedFile) -> None:
        head = sf.read_range(0, 8)
        if len(head) < 8:
            raise FormatError("not a safetensors file: shorter than 8 bytes")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > sf.size:
            raise FormatError(f"not a safetensors file: header length {n}")
        try:
            header = json.loads(
                sf.read_range(8, n),
                parse_constant=_reject_constant,
                object_pairs_hook=reject_duplicate_keys,
            )
        except FormatError:
            raise
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise FormatError(f"safetensors header is not valid: {exc}") from None
        if not isinstance(header, dict):
            raise FormatError("safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (
            isinstance(meta, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        ):
            raise FormatError("safetensors __metadata__ must map strings to strings")
        self.metadata: dict[str, str] | None = meta
        self.data_start = 8 + n
        self.data_size = sf.size - self.data_start
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}
        for name, spec in header.items():
            self.entries[name] = _entry(name, spec)
        pos = 0
        for name in self.offset_keys():
            _, _, start, end = self.entries[name]
            if start != pos:
                raise FormatError(f"safetensors entry {name!r} overlaps or leaves a gap")
            pos = end
        if pos != self.data_size:
            raise FormatError("safetensors data region does not match its tensors")

    def offset_keys(self) -> list[str]:
        """Tensor names in file order (by offset), as ``safe_open.offset_keys`` gives them."""
        return [k for k, _ in sorted(self.entries.items(), key=lambda e: e[1][2:])]

    def entry(self, name: str) -> tuple[str, list[int], int, int]:
        """``(code, shape, start, end)`` of *name*.

        Raises:
            TensorNotFound: no such tensor (safetensors' message).
        """
        try:
            return self.entries[name]
        except KeyError:
            raise TensorNotFound(f"File does not contain tensor {name}") from None


def _entry(name: str, spec: Any) -> tuple[str, list[int], int, int]:
    code = spec.get("dtype") if isinstance(spec, dict) else spec
    if not isinstance(spec, dict) or code not in BITS:
        raise FormatError(f"safetensors entry {name!r}: unknown dtype {str(code)[:40]!r}")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
        raise FormatError(f"safetensors entry {name!r} has a bad shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(x) for x in offsets)):
        raise FormatError(f"safetensors entry {name!r} has bad data_offsets")
    start, end = offsets
    count = math.prod(shape)
    if count * BITS[code] % 8:
        raise FormatError(f"safetensors entry {name!r}: {code} does not end on a byte boundary")
    if count >= (1 << 63) or not start <= end or (end - start) * 8 != count * BITS[code]:
        raise FormatError(f"safetensors entry {name!r}: shape and offsets disagree")
    return code, shape, start, end


def header_bytes(
    items: Sequence[tuple[str, str, Sequence[int], int]], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[int]]:
    """The safetensors header for *items*, and the order their bytes follow it in.

    Byte for byte what safetensors writes: tensors ordered by dtype as its
    ``Dtype`` enum sorts them, descending (so larger elements come first and
    every tensor starts aligned), then by name; the JSON compact, padded with
    spaces to a multiple of 8 bytes; ``metadata={}`` is written as ``{}``
    and ``None`` not at all.

    Args:
        items: ``(name, code, logical shape, nbytes)`` per tensor.
        metadata: the ``__metadata__`` map, or None.

    Returns:
        The header (length prefix included) and the indices of *items* in file order.

    Raises:
        ValueError: a name or a metadata key or value that is not a string.
    """
    for name, *_ in items:
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be strings, not {type(name).__name__}")
    order = sorted(range(len(items)), key=lambda i: (SAVE_ORDER.index(items[i][1]), items[i][0]))
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    pos = 0
    for i in order:
        name, code, shape, n = items[i]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order
