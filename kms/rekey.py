"""Re-keying: a sealed file's payload re-encrypted under a fresh data key.

Rotation (:mod:`sealstore.kms.rotate`) only re-wraps the DEK a file already
has, which does nothing if the DEK itself leaked. Re-keying draws a new DEK,
streams the payload through a reader under the old key into a writer under
the new one (every chunk authenticated on the way), wraps the new DEK to the
same keys the old slots named (or to ``to``), and replaces the file
atomically. The old file's bytes -- its payload under the old key and the
slots holding it -- are then overwritten with zeros, best effort: on a
copy-on-write file system or an SSD the old blocks may survive (FORMAT.md,
KEYS.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from sealstore.errors import FormatError
from sealstore.format import read_preamble
from sealstore.fsutil import atomic_file
from sealstore.keys import DataKey, KeySlot, Wrapper
from sealstore.kms.envelope import IdentitySpec, make_slots, unwrap_dek
from sealstore.kms.registry import wrapper_for
from sealstore.stream import SealReader, SealWriter

__all__ = ["rekey_file", "target_wrappers"]

_COPY = 4 * 1024 * 1024


def target_wrappers(uris: Sequence[str]) -> list[Wrapper]:
    """A wrapper per key URI in *uris* (each once, in order): where a new DEK goes.

    Raises:
        ValueError: a key that cannot be wrapped to (named, with the remedy).
    """
    out: list[Wrapper] = []
    for uri in dict.fromkeys(uris):  # once per key, in order
        try:
            out.append(wrapper_for(uri))
        except (ValueError, ImportError) as exc:
            raise ValueError(
                f"cannot wrap a new data key to {uri} ({exc}): name the keys with --to"
            ) from None
    return out


def _shred(fp: int, size: int) -> None:
    """Overwrite *size* bytes of the open file descriptor *fp* with zeros and sync."""
    zeros = bytes(min(size, _COPY) or 1)
    os.lseek(fp, 0, os.SEEK_SET)
    left = size
    while left > 0:
        left -= os.write(fp, zeros[: min(left, len(zeros))])
    os.fsync(fp)


def rekey_file(
    path: str | os.PathLike[str],
    *,
    identities: Sequence[IdentitySpec] = (),
    to: Sequence[str] = (),
    threads: int = 1,
) -> list[KeySlot]:
    """Re-encrypt the sealed file at *path* under a fresh DEK, atomically.

    Args:
        identities: identity files or unwrappers to open the current slots.
        to: key URIs to wrap the new DEK to; default: the keys the current
            slots name (``slot.key_id``), each once.
        threads: AEAD threads for the reader and the writer.

    Returns:
        The new slots.

    Raises:
        ValueError: the slots are held in a store manifest, the file has other
            hard links (the old bytes would stay under those names), or a key
            cannot be wrapped to again.
        KeyUnavailable, AuthenticationError: the old DEK cannot be recovered or
            a chunk does not authenticate (the file is then left as it was).
    """
    source = Path(path).resolve()
    with source.open("rb") as fin:
        try:
            preamble = read_preamble(fin)
        except FormatError as exc:
            raise type(exc)(f"{source}: {exc}") from None
        if preamble.slots_size == 0:
            raise ValueError(f"{source}: its key slots are held in a store manifest")
        st = os.fstat(fin.fileno())
        if st.st_nlink > 1:
            raise ValueError(
                f"{source} has {st.st_nlink} hard links: the old bytes would stay reachable "
                "under the other names (remove them first)"
            )
        header = preamble.header
        wrappers = target_wrappers(list(to) or [slot.key_id for slot in preamble.slots])
        old_fd = os.open(source, os.O_WRONLY)
        try:
            with unwrap_dek(preamble, identities, cache=None) as old_dek:
                reader = SealReader(fin, old_dek, preamble=preamble, threads=threads)
            with reader, DataKey.generate() as dek:
                slots = make_slots(dek, wrappers, header.context)
                with atomic_file(source, mode=st.st_mode & 0o777) as fout:
                    with contextlib.suppress(PermissionError):
                        os.fchown(fout.fileno(), st.st_uid, st.st_gid)
                    with SealWriter(
                        fout,
                        dek,
                        slots=slots,
                        suite=header.suite,
                        chunk_size=header.chunk_size,
                        context=header.context,
                        plaintext_size=header.plaintext_size,
                        threads=threads,
                    ) as writer:
                        while True:
                            block = reader.read(_COPY)
                            if not block:
                                break
                            writer.write(block)
            # Replaced: the old inode is reachable only through old_fd now.
            _shred(old_fd, st.st_size)
        finally:
            os.close(old_fd)
    return slots
