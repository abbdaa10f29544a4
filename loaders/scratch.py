"""A private, memory-backed folder for the small files a library reads only from a directory.

sentence-transformers reads its configs, and transformers its tokenizers
(other than a ``tokenizer.json``), only from a folder; ``save_pretrained``
of a tokenizer only writes to one. Those files -- never weights -- go
through a fresh folder on ``/dev/shm`` (or ``scratch_dir=``, which must be a
tmpfs), mode 0700, files 0600, held locked while in use and removed as soon
as the work is done: in a ``finally``, at interpreter exit, and, if the
process was killed outright, by the next use (a live folder's lock is held).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from sealstore.errors import FormatError
from sealstore.fsutil import lock_folder, remove_if_unlocked

__all__ = ["private_folder", "scratch_root", "write_private"]

# One prefix for every user of the folder, so any use sweeps what a killed one left.
PREFIX = "sealstore-st-"
_live: set[str] = set()  # folders in use, removed at exit if still there


def _remove_live() -> None:
    for folder in list(_live):
        shutil.rmtree(folder, ignore_errors=True)


atexit.register(_remove_live)


def _sweep(root: Path) -> None:
    """Remove folders left by processes that are gone (their lock is free)."""
    with contextlib.suppress(OSError), os.scandir(root) as entries:
        stale = [e.path for e in entries if e.name.startswith(PREFIX)]
    for folder in stale:
        remove_if_unlocked(folder)


def scratch_root(scratch_dir: str | os.PathLike[str] | None, caller: str) -> Path:
    """The memory-backed directory the private folders go in.

    Raises:
        ValueError: it is not a writable directory (naming ``scratch_dir=``).
    """
    # /dev/shm on purpose: memory-backed; each use makes its own 0700 folder with mkdtemp.
    root = Path(scratch_dir) if scratch_dir is not None else Path("/dev/shm")  # noqa: S108
    if not (root.is_dir() and os.access(root, os.W_OK | os.X_OK)):
        raise ValueError(
            f"{root} is not a writable directory: {caller} puts configs and tokenizer "
            "files through a memory-backed folder; pass scratch_dir= (a tmpfs)"
        )
    return root


def write_private(folder: Path, rel: str, data: bytes) -> None:
    """Write *data* as *folder*/*rel* (mode 0600, never through a link).

    Raises:
        FormatError: *rel* is not a relative path inside *folder*.
    """
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise FormatError(f"artifact file {rel!r} is not a relative path")
    path = folder.joinpath(*parts)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


@contextlib.contextmanager
def private_folder(root: Path) -> Iterator[Path]:
    """A fresh locked folder under *root* (from :func:`scratch_root`), removed on exit."""
    _sweep(root)
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))  # mode 0700
    _live.add(str(folder))
    lock: int | None = None
    try:
        # Held until the folder is gone: a later sweep leaves a live one alone.
        lock = lock_folder(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if lock is not None:
            os.close(lock)
        _live.discard(str(folder))
