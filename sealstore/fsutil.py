"""Atomic local file writes: a temporary file beside the target, renamed into place."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_file"]

# Errors of writing the output itself (the device or the quota is full, the
# file too large), never of whatever the caller was reading from.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


@contextmanager
def atomic_file(path: str | os.PathLike[str], *, mode: int = 0o600) -> Iterator[IO[bytes]]:
    """A binary file that appears at *path* (with *mode*) only if the block completes.

    On any exception the temporary file is removed and *path* is left as it was.

    Raises:
        FileNotFoundError: the folder of *path* does not exist.
    """
    target = Path(path)
    # The folder must exist: creating it here would leave it behind on failure.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fp:
            yield fp
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None and exc.errno in _FULL:
            # write() and fsync() name no file: say which output filled the disk.
            raise type(exc)(exc.errno, exc.strerror, str(target)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
