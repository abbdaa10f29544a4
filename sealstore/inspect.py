"""Describe a sealed file without any key: header, slots, chunk geometry."""

from __future__ import annotations

import os
from typing import Any, BinaryIO

from sealstore.errors import AuthenticationError
from sealstore.format import TAG_SIZE, Preamble, read_preamble, read_preamble_from
from sealstore.source import Source
from sealstore.stream import ChunkLayout

__all__ = ["inspect_file"]


_BLOCK = 1 << 20


def _from_stream(fp: BinaryIO) -> tuple[Preamble, int]:
    """The preamble and total length of a sealed stream read once (a pipe: no seek, no size)."""
    preamble = read_preamble(fp)
    size = preamble.payload_offset
    while block := fp.read(_BLOCK):  # only counted: the payload is never kept
        size += len(block)
    return preamble, size


def inspect_file(src: str | os.PathLike[str] | bytes | BinaryIO) -> dict[str, Any]:
    """The public facts of a sealed file. Authenticates nothing.

    Args:
        src: a path, the file's bytes, or a binary stream such as standard
            input (read to its end to learn the length; nothing is kept).

    Returns:
        A JSON-ready dict: version, suite, chunk size and count, sizes, context,
        slots (kind and key id), and ``layout_error`` if the length is impossible.

    Raises:
        FormatError, UnsupportedVersion: the preamble is malformed.
    """
    if hasattr(src, "read"):
        preamble, size = _from_stream(src)  # type: ignore[arg-type]
    else:
        source = Source(src)  # one open gives both the preamble and the size
        try:
            preamble = read_preamble_from(source.head)
            size = source.size
        finally:
            source.close()
    header = preamble.header
    info: dict[str, Any] = {
        "version": header.v,
        "suite": header.suite,
        "chunk_size": header.chunk_size,
        "context": dict(header.context),
        "declared_plaintext_size": header.plaintext_size,
        "file_size": size,
        "payload_offset": preamble.payload_offset,
        "slots_detached": preamble.slots_size == 0,
        "slots": [{"kind": s.kind, "key_id": s.key_id, **s.params} for s in preamble.slots],
    }
    try:
        layout = ChunkLayout(header, preamble.payload_offset, size - preamble.payload_offset)
    except AuthenticationError as exc:
        info["layout_error"] = str(exc)
    else:
        info["chunk_count"] = layout.count
        info["plaintext_size"] = layout.plaintext_size
        info["overhead"] = size - layout.plaintext_size
        info["tag_size"] = TAG_SIZE
    return info
