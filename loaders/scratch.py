"""A private scratch folder for the small non-weight files of a sealed model.

Some libraries read configs and tokenizers only from a directory
(sentence-transformers, transformers' tokenizers, vLLM's config resolution),
so those files -- never the weights -- are decrypted into a fresh folder on a
memory-backed file system (``/dev/shm`` by default), mode 0700, files 0600.
The folder is held locked (``flock``) while it is in use and removed by its
owner when done, at interpreter exit, and -- if the process was killed -- by
the next scratch folder made under the same root (a live folder's lock is
held, so only dead ones are swept).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from sealstore.errors import FormatError
from sealstore.fsutil import lock_folder, remove_if_unlocked

__all__ = ["WEIGHT_SUFFIXES", "ScratchFolder", "is_weight", "scratch_root"]

# Weights and exported graphs: never written to a scratch folder.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".onnx",
    ".h5",
    ".msgpack",
    ".gguf",
    ".xml",
    ".npy",
    ".npz",
    ".pkl",
    ".pickle",
    ".joblib",
    ".keras",
    ".tflite",
    ".pdparams",
    ".ot",
)

_live: dict[str, int] = {}  # folder -> the pid that made it; removed at exit if still there


def _remove_live() -> None:
    # Only the process that made a folder removes it: a forked child (a server's
    # worker) exits while its parent still serves from the folder.
    for folder, pid in list(_live.items()):
        if pid == os.getpid():
            shutil.rmtree(folder, ignore_errors=True)


atexit.register(_remove_live)


def is_weight(path: str) -> bool:
    """True for a file that holds weights or arrays (by suffix, any case): never
    written in plaintext."""
    return path.lower().endswith(WEIGHT_SUFFIXES)


def scratch_root(scratch_dir: str | os.PathLike[str] | None, caller: str) -> Path:
    """The directory scratch folders are made in (default ``/dev/shm``), checked.

    Args:
        caller: the loader's name, for the error line.

    Raises:
        ValueError: not a writable directory (never a silent fall-back to disk).
    """
    # /dev/shm on purpose: memory-backed; each folder is its own 0700 mkdtemp.
    root = Path(scratch_dir) if scratch_dir is not None else Path("/dev/shm")  # noqa: S108
    if not (root.is_dir() and os.access(root, os.W_OK | os.X_OK)):
        raise ValueError(
            f"{root} is not a writable directory: {caller} decrypts the configs and "
            "tokenizer into a memory-backed folder; name another with scratch_dir (a tmpfs)"
        )
    return root


def _sweep(root: Path, prefix: str) -> None:
    """Remove scratch folders left by processes that are gone (their lock is free)."""
    with contextlib.suppress(OSError), os.scandir(root) as entries:
        stale = [e.path for e in entries if e.name.startswith(prefix)]
    for folder in stale:
        remove_if_unlocked(folder)


class ScratchFolder:
    """A new locked 0700 folder under *scratch_dir* (default ``/dev/shm``); a context manager.

    Args:
        scratch_dir: a memory-backed directory to make the folder in.
        prefix: the folder's name prefix; stale folders with it are swept first.
        caller: the loader's name, for the error line.

    Raises:
        ValueError: *scratch_dir* is not a writable directory.
    """

    def __init__(
        self,
        scratch_dir: str | os.PathLike[str] | None = None,
        *,
        prefix: str = "sealstore-scratch-",
        caller: str,
    ) -> None:
        root = scratch_root(scratch_dir, caller)
        _sweep(root, prefix)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))  # mode 0700
        _live[str(self.path)] = os.getpid()
        self._lock: int | None = None
        try:
            # Held until the folder is gone: a later sweep leaves a live one alone.
            self._lock = lock_folder(self.path)
        except BaseException:
            self.remove()
            raise

    def write(self, rel: str, data: bytes) -> None:
        """Write *data* as the artifact file *rel* (0600; never a weight file).

        Raises:
            FormatError: *rel* is absolute or climbs out of the folder.
            ValueError: *rel* names a weight file.
        """
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise FormatError(f"artifact file {rel!r} is not a relative path")
        if is_weight(rel):
            raise ValueError(f"{rel} holds weights: never written to a scratch folder")
        path = self.path.joinpath(*parts)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(path, flags, 0o600), "wb") as out:
            out.write(data)

    def remove(self) -> None:
        """Remove the folder and release its lock (a second call does nothing)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        _live.pop(str(self.path), None)

    def __enter__(self) -> ScratchFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
