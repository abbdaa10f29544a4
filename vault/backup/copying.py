"""Copying objects between a store and a backup location: hashed on the way, in parallel.

The counters every long operation reports (:class:`Stats`) live here too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sealstore.errors import (
    AuthenticationError,
    BackendError,
    NotFound,
)
from sealstore.parallel import run_jobs
from sealstore.vault.digest import ObjectHasher, digests_equal
from sealstore.vault.s3limits import timed_out
from sealstore.vault.storage import Storage

_BLOCK = 8 << 20

ProgressFor = Callable[[str, int], Callable[[int], None]]


# -- the counters every long operation reports -------------------------------------------


@dataclass
class Stats:
    """What a backup or restore did. ``read_bytes`` counts object bytes read from the source."""

    versions: int = 0
    objects: int = 0
    copied: int = 0
    copied_bytes: int = 0
    read_bytes: int = 0
    docs_written: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, read: int = 0, copied: int = 0, copied_bytes: int = 0) -> None:
        with self._lock:
            self.read_bytes += read
            self.copied += copied
            self.copied_bytes += copied_bytes

    def summary(self, what: str) -> str:
        from sealstore.progress import counted, human_bytes

        rate = self.copied_bytes / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{what}: {counted(self.versions, 'version')}, {counted(self.objects, 'object')}, "
            f"{self.copied} copied ({human_bytes(self.copied_bytes)}, {human_bytes(rate)}/s), "
            f"{counted(self.docs_written, 'document')} written, {self.seconds:.1f} s"
        )


# -- copying -------------------------------------------------------------------------------


def _copy(
    src: Storage,
    src_path: str,
    dst: Storage,
    dst_path: str,
    digest: str,
    size: int,
    stats: Stats,
    progress: Callable[[int], None] | None,
) -> None:
    """Copy one object, hashing it on the way; it appears at *dst_path* only if it matches.

    Raises:
        NotFound: the source object is missing.
        AuthenticationError: the source's bytes are not the ones the manifest signs.
    """
    hasher = ObjectHasher(digest.partition(":")[0])
    n = 0
    with src.open_stream(src_path) as fp, dst.open_write(dst_path) as out:
        while block := fp.read(_BLOCK):
            hasher.update(block)
            out.write(block)
            n += len(block)
            stats.add(read=len(block))
            if progress is not None:
                progress(len(block))
        if n != size or not digests_equal(hasher.text(), digest):
            # Raised inside open_write: the partial copy is discarded, never published.
            raise AuthenticationError(f"{src_path} in {src.url} does not match its manifest")
    stats.add(copied=1, copied_bytes=n)


def _run_copies(jobs: list[Callable[[], None]], threads: int) -> list[BaseException | None]:
    """Run copy jobs on *threads* workers; each job's exception (or None), in order.

    A BaseException that is not an Exception (an interrupt) stops everything
    and is raised at once, as is a backend that stopped answering (a timeout:
    every later job would wait for it again): what was copied stays, and a
    re-run copies the rest.
    """

    def outcome(job: Callable[[], None]) -> Callable[[], BaseException | None]:
        def run() -> BaseException | None:
            try:
                job()
            except Exception as exc:
                if timed_out(exc):
                    raise
                return exc
            return None

        return run

    return run_jobs([outcome(job) for job in jobs], threads)


def _damage(outcomes: list[BaseException | None], stopped: str, kept: str) -> dict[int, Exception]:
    """The copies that found damage (missing, corrupt), by index.

    A failing backend (a server gone, a full disk) stops the whole operation
    instead: nothing after it could succeed, and a re-run resumes.
    """
    out: dict[int, Exception] = {}
    for i, exc in enumerate(outcomes):
        if exc is None:
            continue
        if isinstance(exc, BackendError):
            raise BackendError(f"{stopped}: {exc} ({kept}; run it again to resume)") from exc
        if not isinstance(exc, (AuthenticationError, NotFound)):
            raise exc
        out[i] = exc
    return out


def _hash_blob(
    dest: Storage, path: str, digest: str, progress: Callable[[int], None] | None
) -> bool:
    hasher = ObjectHasher(digest.partition(":")[0])
    with dest.open_stream(path) as fp:
        while block := fp.read(_BLOCK):
            hasher.update(block)
            if progress is not None:
                progress(len(block))
    return digests_equal(hasher.text(), digest)
