"""A seekable binary file object over a sealed file: what the data stack reads through.

pyarrow, pandas, tarfile and Hugging Face ``datasets`` read a file object,
not a ``SealedFile``. :class:`SealedIO` is an ``io.RawIOBase`` whose reads
are served by :meth:`SealedFile.read_into`, so every byte it returns has been
authenticated, and only the chunks a read covers are fetched and decrypted:
one Parquet column chunk costs the few chunks it lies in, not the file.

Small reads (a Parquet footer, a tar header, a JSON line through the
buffer) are served from a few whole decrypted chunks kept in a bounded
least-recently-used cache; a read of a chunk or more is decrypted straight
into the caller's buffer and cached nowhere. Closing wipes the cache.

The object pickles as a *reference*: whatever opened the sealed file (a
path or URL with identity specs, a store reference, an fsspec filesystem
and path) is pickled, and the receiving process -- a DataLoader worker
started with ``spawn``, a Ray worker -- opens the file itself, unwrapping
the key through its own identities. Key material never enters the pickle;
a file opened from a data key or identity objects, which have no
reference, refuses to pickle.
"""

from __future__ import annotations

import io
import sys
from collections import OrderedDict
from typing import Any, Protocol

from sealstore.chunks import zero
from sealstore.errors import SealstoreError
from sealstore.stream import SealedFile

__all__ = ["Reopener", "SealedBufferedReader", "SealedIO", "named"]

DEFAULT_CACHE_CHUNKS = 4


class Reopener(Protocol):
    """A picklable recipe for opening one sealed file again (no key material in it).

    Attributes:
        name: what errors and ``repr`` call the file (a path, URL or store reference).
    """

    # Read-only, so that a frozen dataclass (loaders.fileio.SourceRef) is one.
    @property
    def name(self) -> str:
        """What errors and ``repr`` call the file."""
        ...

    def open(self) -> SealedFile:
        """Open the sealed file afresh (unwrapping its key through the opener's identities)."""
        ...


def named(exc: SealstoreError, name: str) -> SealstoreError:
    """*exc* with *name* leading its message (once): errors raised inside pyarrow,
    pandas or ``datasets`` say which of many shards failed."""
    if exc.args and isinstance(exc.args[0], str):
        if name not in exc.args[0]:
            exc.args = (f"{name}: {exc.args[0]}", *exc.args[1:])
    else:
        exc.args = (name, *exc.args)
    return exc


class SealedIO(io.RawIOBase):
    """A read-only, seekable raw file over a :class:`SealedFile`'s plaintext.

    Args:
        sealed: the open sealed file.
        name: what errors name the file (default: the reopener's name).
        reopener: how another process opens the same file (makes it picklable).
        cache_chunks: whole decrypted chunks kept for small reads (at least 1).
        threads: threads decrypting a large read.
        close_sealed: close *sealed* when this closes (default: yes).

    Raises:
        ValueError: *cache_chunks* < 1 or *threads* < 1.
    """

    def __init__(
        self,
        sealed: SealedFile,
        *,
        name: str | None = None,
        reopener: Reopener | None = None,
        cache_chunks: int = DEFAULT_CACHE_CHUNKS,
        threads: int = 1,
        close_sealed: bool = True,
    ) -> None:
        if cache_chunks < 1 or threads < 1:
            raise ValueError("cache_chunks and threads must be at least 1")
        super().__init__()
        self._sealed = sealed
        self._reopener = reopener
        self._name = name if name is not None else getattr(reopener, "name", "<sealed file>")
        self._cache_chunks = cache_chunks
        self._threads = threads
        self._close_sealed = close_sealed
        self._pos = 0
        self._cache: OrderedDict[int, memoryview] = OrderedDict()
        self.chunks_decrypted = 0  # chunks this object had decrypted (for tuning and tests)

    @property
    def name(self) -> str:
        return self._name

    @property
    def mode(self) -> str:
        return "rb"

    @property
    def size(self) -> int:
        """The plaintext size in bytes."""
        return self._sealed.size

    @property
    def sealed(self) -> SealedFile:
        return self._sealed

    def __repr__(self) -> str:
        return f"<SealedIO {self._name!r}{' closed' if self.closed else ''}>"

    def readable(self) -> bool:
        self._check_open()
        return True

    def seekable(self) -> bool:
        self._check_open()
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to *offset* (relative to *whence*); past the end reads return b""."""
        self._check_open()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence ({whence})")
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, b: Any) -> int:
        """Authenticate and decrypt up to ``len(b)`` bytes at the position into *b*.

        Raises:
            AuthenticationError: a chunk the read covers failed (wrong key,
                tampering, truncation); its message names the file, and *b*
                holds none of that chunk's bytes.
        """
        self._check_open()
        out = memoryview(b).cast("B")
        n = max(0, min(len(out), self.size - self._pos))
        try:
            if n >= self._sealed.layout.chunk_size:
                # A chunk or more: straight into the caller's buffer, cached nowhere.
                got = self._sealed.read_into(self._pos, out[:n], threads=self._threads)
                cs = self._sealed.layout.chunk_size
                self.chunks_decrypted += (self._pos + n - 1) // cs - self._pos // cs + 1
            else:
                got = self._copy_cached(self._pos, out[:n])
        except SealstoreError as exc:
            raise named(exc, self._name) from None
        self._pos += got
        return got

    def read_buffer(self, n: int = -1) -> Any:
        """Like :meth:`read`, into a new writable buffer that pyarrow (which calls
        this when a file object has it) takes as is, without ``read``'s copy.

        When pyarrow is loaded the buffer comes from its memory pool: reused
        memory, where a fresh ``bytearray`` of a large read is zero-filled and
        faulted in page by page first (measured 8x slower for 32 MiB).
        """
        self._check_open()
        if n < 0:
            n = self.size - self._pos
        k = max(0, min(n, self.size - self._pos))
        arrow = sys.modules.get("pyarrow")  # only pyarrow calls this: never imported here
        if arrow is not None and k:
            buf = arrow.allocate_buffer(k)
            got = self.readinto(memoryview(buf).cast("B"))
            return buf if got == k else buf.slice(0, got)
        out = bytearray(k)
        got = self.readinto(out) if k else 0
        del out[got:]
        return out

    def _fetch_range(self, start: int, end: int) -> bytes:
        """The plaintext bytes ``[start, end)`` (fsspec's name for a ranged read)."""
        self._check_open()
        buf = bytearray(max(0, min(end, self.size) - start))
        if buf:
            try:
                if len(buf) >= self._sealed.layout.chunk_size:
                    self._sealed.read_into(start, buf, threads=self._threads)
                else:
                    self._copy_cached(start, memoryview(buf))
            except SealstoreError as exc:
                raise named(exc, self._name) from None
        return bytes(buf)

    def _copy_cached(self, pos: int, out: memoryview) -> int:
        cs = self._sealed.layout.chunk_size
        done = 0
        while done < len(out):
            i, lo = divmod(pos + done, cs)
            chunk = self._chunk(i)
            k = min(len(out) - done, len(chunk) - lo)
            out[done : done + k] = chunk[lo : lo + k]
            done += k
        return done

    def _chunk(self, i: int) -> memoryview:
        """Chunk *i*'s plaintext, decrypted (and so authenticated) once while cached."""
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        if len(self._cache) >= self._cache_chunks:
            _, old = self._cache.popitem(last=False)
            zero(old)
            buf = old.obj  # reuse the evicted chunk's memory
        else:
            buf = bytearray(self._sealed.layout.chunk_size)
        view = memoryview(buf)
        n = self._sealed.decrypt_chunk_into(i, view)
        self.chunks_decrypted += 1
        self._cache[i] = view[:n]
        return view[:n]

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def close(self) -> None:
        """Wipe the cached plaintext and close the sealed file (if this owns it)."""
        if self.closed:
            return
        for view in self._cache.values():
            zero(view)
        self._cache.clear()
        if self._close_sealed:
            self._sealed.close()
        super().close()

    def __reduce__(self) -> tuple[Any, ...]:
        return _reopen, (self._reference(), self.tell(), self._cache_chunks, self._threads, False)

    def _reference(self) -> Reopener:
        if self._reopener is None:
            raise TypeError(
                f"{self._name} was opened from a key or an identity object, not a reference: "
                "open it by path, URL or store reference with identities given as file paths "
                "to pass it to another process"
            )
        return self._reopener


class SealedBufferedReader(io.BufferedReader):
    """A :class:`SealedIO` behind ``io.BufferedReader`` (cheap small reads, ``readline``,
    ``peek``); pickles as the raw file's reference, with its position."""

    raw: SealedIO

    def __init__(self, raw: SealedIO, buffer_size: int = io.DEFAULT_BUFFER_SIZE) -> None:
        super().__init__(raw, buffer_size)
        self.buffer_size = buffer_size

    def __reduce__(self) -> tuple[Any, ...]:
        raw = self.raw
        return _reopen, (raw._reference(), self.tell(), raw._cache_chunks, raw._threads, True)

    @property
    def size(self) -> int:
        return self.raw.size

    def read_buffer(self, n: int = -1) -> Any:
        """``read``, but a read larger than the buffer skips the buffer's copy (pyarrow)."""
        if 0 <= n <= self.buffer_size:
            return self.read(n)  # bytes may sit in the buffer already
        pos = self.tell()
        self.raw.seek(pos)
        data = self.raw.read_buffer(n)
        self.seek(pos + len(data))  # drops the stale buffer
        return data


def wrap(
    sealed: SealedFile,
    *,
    name: str | None = None,
    reopener: Reopener | None = None,
    cache_chunks: int = DEFAULT_CACHE_CHUNKS,
    threads: int = 1,
    buffered: bool = True,
    close_sealed: bool = True,
) -> SealedIO | SealedBufferedReader:
    """*sealed* as a binary file object (buffered unless *buffered* is false).

    Args: as :class:`SealedIO`.
    """
    raw = SealedIO(
        sealed,
        name=name,
        reopener=reopener,
        cache_chunks=cache_chunks,
        threads=threads,
        close_sealed=close_sealed,
    )
    return SealedBufferedReader(raw) if buffered else raw


def _reopen(
    reopener: Reopener, position: int, cache_chunks: int, threads: int, buffered: bool
) -> SealedIO | SealedBufferedReader:
    """Unpickling: open the file again through its reference and seek back."""
    fp = wrap(
        reopener.open(),
        reopener=reopener,
        cache_chunks=cache_chunks,
        threads=threads,
        buffered=buffered,
    )
    fp.seek(position)
    return fp
