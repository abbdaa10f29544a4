"""Local file writes that fail closed.

:func:`atomic_file` looks at what the path is before it writes:

- missing, or a regular file: the data goes to an anonymous file in the same
  folder (Linux ``O_TMPFILE``: it has no name, so nothing -- not even a
  SIGKILL -- can leave it behind), which is given a temporary name and renamed
  onto the path only when the block completes. A symlink to a regular file is
  followed: its target is replaced, the link is kept.
- a character or block device, a FIFO, or a ``/dev/fd/N``-style path
  (``/dev/stdout``, ``/proc/self/fd/N``, bash's ``>(cmd)``): written through,
  as it goes, like standard output -- renaming a regular file over
  ``/dev/null`` or ``/dev/stdout`` is exactly what must never happen.
- a directory, or a symlink to nothing: refused.

Where ``O_TMPFILE`` is not available (another OS, a file system without it)
the temporary file is a named ``.NAME.XXXXXXXX.tmp`` beside the path, held
under ``flock`` while it is written; the next write to the same path removes
those whose writer is gone (a lock nobody holds).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_file",
    "is_stream_target",
    "lock_folder",
    "remove_if_unlocked",
    "sweep_temporaries",
]

_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
# A file system or kernel without O_TMPFILE answers with one of these.
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL}
# The folders whose entries are a process's open files (magic links).
# The random part: 8 characters, as ours and tempfile.mkstemp's (older releases) make.
_TMP_TAIL = re.compile(r"[A-Za-z0-9_]{8}\.tmp")
_FD_FOLDER = re.compile(r"/proc/(self|thread-self|\d+)(/task/\d+)?/fd")
# Errors of writing the output itself (the device or the quota is full, the
# file too large), never of whatever the caller was reading from.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _fd_link(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """The (process, descriptor) that *path*, followed link by link, names, if any.

    ``/dev/stdout`` -> ``/proc/self/fd/1`` -> ``("self", "1")``. ``realpath``
    cannot tell: it turns ``/proc/self/fd/1`` into ``pipe:[123]`` or into the
    name of whatever file the descriptor has open.
    """
    p = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on a chain of links
        parent, name = os.path.split(p)
        parent = os.path.realpath(parent)
        m = _FD_FOLDER.fullmatch(parent)
        if m:
            return m.group(1), name
        try:
            link = os.readlink(os.path.join(parent, name))
        except OSError:
            return None  # not a link: the end of the chain
        p = os.path.join(parent, link)
    return None


def _via_fd_link(path: str | os.PathLike[str]) -> bool:
    """Whether *path*, followed link by link, names an open descriptor (``/dev/fd/N``)."""
    return _fd_link(path) is not None


def _own_fd(path: str | os.PathLike[str]) -> int | None:
    """The descriptor of this process that *path* names (``/dev/stdout``: 1), if any."""
    link = _fd_link(path)
    if link is None or link[0] not in ("self", "thread-self", str(os.getpid())):
        return None
    return int(link[1]) if link[1].isdigit() else None


def is_stream_target(path: str | os.PathLike[str]) -> bool:
    """Whether writing to *path* goes straight into it (a device, FIFO or ``/dev/fd/N``).

    Returns:
        False for a missing path, a regular file (or a link to one) and a directory.
    """
    try:
        st = os.stat(path)
    except OSError:
        return False
    if stat.S_ISDIR(st.st_mode):
        return False
    return not stat.S_ISREG(st.st_mode) or _via_fd_link(path)


@contextmanager
def atomic_file(path: str | os.PathLike[str], *, mode: int = 0o600) -> Iterator[IO[bytes]]:
    """A binary file that appears at *path* (with *mode*) only if the block completes.

    A regular (or missing) *path* is replaced by rename; on any exception --
    Ctrl-C and the ``Terminated`` of SIGTERM/SIGHUP included -- the temporary
    file is truncated and removed and *path* is left as it was. A device, FIFO
    or ``/dev/fd/N`` path is written through instead (nothing to roll back:
    a reader may see a prefix, as with standard output) and its mode is not
    touched.

    Args:
        path: the destination; a symlink to a regular file is followed and
            its target replaced.
        mode: the permission bits of a file created or replaced.

    Raises:
        FileNotFoundError: the folder of *path* does not exist, or *path* is
            a symlink to nothing (never created through, never replaced).
        IsADirectoryError: *path* is a directory.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            reason = "a symlink to a missing file (neither followed nor replaced)"
            raise FileNotFoundError(errno.ENOENT, reason, str(path)) from None
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        if st is not None and (not stat.S_ISREG(st.st_mode) or _via_fd_link(path)):
            with _write_through(path) as fp:
                yield fp
            return
        # Replace the link's target, never the link (a rename onto the link would).
        target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
        with _replacing(target, mode) as fp:
            yield fp
    except OSError as exc:
        if exc.filename is None and exc.errno in _FULL:
            # write() and fsync() name no file: say which output filled the disk.
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise


@contextmanager
def _write_through(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    own = _own_fd(path)
    if own is not None:
        # One of our own descriptors (/dev/stdout, /dev/fd/N): write through a
        # duplicate of it, so its position and O_APPEND are the shell's --
        # `-o /dev/stdout >> log` appends, as `> log` had already truncated.
        fd = os.dup(own)
    else:
        # No O_CREAT: the thing was there a moment ago; if it is gone, fail
        # rather than create a regular file in its place. O_NOCTTY: a terminal
        # named as output must not become our controlling terminal. A regular
        # file behind another process's descriptor is appended to, never
        # truncated: what that process meant by it is not ours to know.
        regular = stat.S_ISREG(os.stat(path).st_mode)
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY | (os.O_APPEND if regular else 0)
        fd = os.open(path, flags)
    fp = os.fdopen(fd, "wb")
    try:
        yield fp
        fp.flush()
    finally:
        with contextlib.suppress(OSError):  # never hide the exception that got us here
            fp.close()


def _temporary(folder: Path, name: str) -> tuple[int, Path | None]:
    """An anonymous file in *folder* (``O_TMPFILE``), else a named one; locked either way."""
    if _O_TMPFILE and os.path.isdir("/proc/self/fd"):
        try:
            fd = os.open(folder, _O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in _NO_TMPFILE:
                raise
        else:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd, None
    for _ in range(100):
        named = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(named, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        # Held until close: a sweep by another writer sees a live file and leaves it.
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, named
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder / name))


def _give_name(fd: int, folder: Path, name: str) -> Path:
    """Link the anonymous file *fd* into *folder* under a fresh temporary name."""
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _ in range(100):
            tmp = f".{name}.{secrets.token_hex(4)}.tmp"
            try:
                # linkat(AT_SYMLINK_FOLLOW) through /proc needs no privilege,
                # unlike AT_EMPTY_PATH on the descriptor itself. A dst_dir_fd
                # makes Python call linkat: plain link() would try to link
                # the /proc symlink itself (EXDEV).
                os.link(f"/proc/self/fd/{fd}", tmp, dst_dir_fd=dir_fd, follow_symlinks=True)
            except FileExistsError:
                continue
            return folder / tmp
    finally:
        os.close(dir_fd)
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder / name))


def _is_at(fd: int, path: Path) -> bool:
    with contextlib.suppress(OSError):
        a, b = os.fstat(fd), os.lstat(path)
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    return False


@contextmanager
def _replacing(target: Path, mode: int) -> Iterator[IO[bytes]]:
    folder = target.parent
    sweep_temporaries(target)
    fd, named = _temporary(folder, target.name)
    fp = os.fdopen(fd, "wb")
    try:
        os.fchmod(fd, mode)
        yield fp
        fp.flush()
        os.fsync(fd)
        # The path was checked before the block ran; it may have become a
        # device or FIFO since (a rename onto it would replace that).
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(target).st_mode):
                raise FileExistsError(
                    errno.EEXIST, "became something other than a regular file", str(target)
                )
        if named is None:
            named = _give_name(fd, folder, target.name)
        os.replace(named, target)
        named = None
    except BaseException:
        # Interrupted after the rename (a signal between two lines) the file
        # is complete and authenticated: keep it. Otherwise release the
        # plaintext's blocks now, whatever else still holds the inode.
        if not _is_at(fd, target):
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        raise
    finally:
        if named is not None:
            with contextlib.suppress(OSError):
                named.unlink()
        with contextlib.suppress(OSError):
            fp.close()


def sweep_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the ``.NAME.XXXXXXXX.tmp`` files beside *target* whose writer is gone.

    A writer holds an exclusive ``flock`` on its temporary file until it ends,
    so a file whose lock can be taken was left by a process that died
    (SIGKILL, power loss) on a system without ``O_TMPFILE``.

    Returns:
        The files removed.
    """
    path = Path(target)
    prefix, gone = f".{path.name}.", []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return gone
    for entry in entries:
        if not (entry.name.startswith(prefix) and _TMP_TAIL.fullmatch(entry.name[len(prefix) :])):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer
            if _is_at(fd, Path(entry.path)):
                os.unlink(entry.path)
                gone.append(Path(entry.path))
        except OSError:
            continue
        finally:
            os.close(fd)
    return gone


def lock_folder(folder: Path) -> int:
    """Lock the new private *folder* (a pull's or a load's); refuse if a sweep removed it first.

    The folder is held locked (``flock``) for as long as it is in use, so a
    later run's sweep (:func:`remove_if_unlocked`) tells a live folder from
    one whose process died. Between ``mkdtemp`` and this lock another run's
    sweep can take the free lock and remove the folder (it holds the lock
    while it removes): the descriptor then names a deleted folder, and files
    made "in" it would land in a fresh, unlocked one.

    Returns:
        The descriptor holding the lock; close it after removing the folder.

    Raises:
        FileNotFoundError: the folder was removed before it could be locked.
    """
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        a, b = os.fstat(fd), os.lstat(folder)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            raise FileNotFoundError(folder)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_if_unlocked(folder: str | os.PathLike[str]) -> bool:
    """Remove *folder* if no process holds its lock (its owner died); True if removed.

    It is removed while the lock is held here: a run that made the folder a
    moment ago and waits for its lock finds it gone, never half gone.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # another user's, or gone
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # in use
        shutil.rmtree(folder, ignore_errors=True)
        return True
    finally:
        os.close(fd)
