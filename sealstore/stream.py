"""STREAM: chunked authenticated encryption of a sealed file's payload.

Chunk ``i`` of ``n`` is sealed with the payload key under the nonce
``nonce_prefix (7) || u32_be(i) || last (1)`` and the AAD
``SHA-256(magic || hlen || header)``. The index in the nonce pins each chunk
to its place, the last flag makes truncation at a chunk boundary fail, and
the AAD binds every chunk to this file's header (Hoang et al., "Online
authenticated-encryption and its nonce-reuse misuse-resistance", 2015).

Three ways in:

* :class:`SealWriter` -- a binary file object; the input length need not be known.
* :class:`SealReader` -- a streaming binary file object, chunk after chunk.
* :class:`SealedFile` -- random access: any byte range, or chunk ``i`` into a
  caller's buffer, decrypting only the chunks needed, in parallel if asked.

None of them calls a key provider: they take the data key.
"""

from __future__ import annotations

import contextlib
import io
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, BinaryIO

from cryptography.exceptions import InvalidTag

from sealstore.chunks import ChunkLayout, Progress, chunk_nonce, new_aead, zero
from sealstore.errors import AuthenticationError
from sealstore.format import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SUITE,
    TAG_SIZE,
    Header,
    Preamble,
    build_preamble,
    header_aad,
    open_payload_key,
    read_preamble,
)
from sealstore.keys import DataKey, KeySlot
from sealstore.parallel import ordered_parallel, ring_slots
from sealstore.sealed_file import SealedFile, peek_preamble
from sealstore.source import map_regular_file

# SealedFile, peek_preamble, ChunkLayout and chunk_nonce live in their own
# modules and are re-exported here, where the format's readers are found.
__all__ = [
    "ChunkLayout",
    "SealReader",
    "SealWriter",
    "SealedFile",
    "chunk_nonce",
    "peek_preamble",
]


class SealWriter(io.BufferedIOBase):
    """Seal a byte stream into *fp* as it is written.

    The preamble is written at once; chunks are sealed once later input shows
    they are not the last (a whole batch at a time when the writes are small),
    and the final chunk only by :meth:`close`. Leaving a ``with`` block on an
    exception -- or dropping the writer unclosed -- calls :meth:`abort`, so a
    failed producer never yields a file that authenticates as a shorter
    plaintext.

    Args:
        fp: the binary destination (only ``write`` is used).
        dek: the data key.
        slots: key slots to store in the file; empty when a manifest holds them.
        suite: ``"AES-256-GCM"`` (default) or ``"CHACHA20-POLY1305"``.
        chunk_size: plaintext bytes per chunk, a power of two in 64 KiB..64 MiB.
        context: the encryption context, authenticated in the header.
        plaintext_size: the total, if known; recorded in the header and checked on close.
        threads: chunks sealed in parallel (1 = in the caller's thread).

    Raises:
        ValueError: bad parameters, or a declared size that the input did not match.
    """

    def __init__(
        self,
        fp: IO[bytes],
        dek: DataKey,
        *,
        slots: Sequence[KeySlot] = (),
        suite: str = DEFAULT_SUITE,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        context: Mapping[str, str] | None = None,
        plaintext_size: int | None = None,
        threads: int = 1,
    ) -> None:
        super().__init__()
        if threads < 1:
            raise ValueError("threads must be at least 1")
        header, key = Header.new(
            dek, suite=suite, chunk_size=chunk_size, context=context, plaintext_size=plaintext_size
        )
        preamble = build_preamble(header, slots)
        self.header = header
        self._fp = fp
        self._aead = new_aead(suite, key)
        self._aad = header_aad(header.encode())
        self._cs = chunk_size
        # Input is sealed in batches of whole chunks with encrypt_into into
        # preallocated buffers -- no allocation per chunk (fresh 1 MiB buffers in
        # worker threads page-fault: measured 3-5x slower). With threads, lanes
        # seal a batch into a small ring while this thread writes it out in order.
        self._threads = threads
        self._batch = chunk_size * (1 if threads == 1 else max(threads, (16 << 20) // chunk_size))
        self._inbuf = bytearray()  # allocated when a write leaves a partial batch
        self._fill = 0
        self._ring: list[memoryview] = []  # made by the first _seal
        self._index = 0
        self._total = 0
        self._done = False
        fp.write(preamble)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # bytes-like
        if self._done:
            raise ValueError("write to a closed SealWriter")
        view = memoryview(data).cast("B")
        n, pos, batch = len(view), 0, self._batch
        declared = self.header.plaintext_size
        if declared is not None and self._total + n > declared:
            self.abort()  # the output must not authenticate
            raise ValueError(
                f"plaintext_size was declared as {declared}, but more bytes were written"
            )
        while pos < n:
            if self._fill == batch:
                # More input exists, so no chunk of the buffered batch is the last one.
                self._seal(memoryview(self._inbuf), last=False)
                self._fill = 0
            if self._fill == 0:
                # Whole chunks known to have input after them -- because this
                # write goes on past them, or because the declared size does --
                # are sealed straight from the caller's buffer, all in one go
                # (lanes start once, not per batch; no copy into the batch buffer).
                after = n - pos - 1
                if declared is not None:
                    after = max(after, declared - (self._total + pos) - 1)
                take = min(after, n - pos) // self._cs * self._cs
                if take and (n - pos > batch or declared is not None):
                    self._seal(view[pos : pos + take], last=False)
                    pos += take
                    continue
            if not self._inbuf:
                # Never more than the declared input still to come (checked above).
                left = batch if declared is None else declared - (self._total + pos)
                self._inbuf = bytearray(min(batch, max(1, left)))
            take = min(batch - self._fill, n - pos)
            self._inbuf[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take
        self._total += n
        return n

    def _seal(self, data: memoryview, last: bool) -> None:
        """Seal *data* as consecutive chunks (the final one flagged if *last*) and write them."""
        cs = self._cs
        if not self._ring:
            # A file declared smaller than a chunk gets buffers of its size:
            # pushing thousands of small dataset shards must not zero
            # megabytes per file.
            declared = self.header.plaintext_size
            one = cs if declared is None else max(1, min(cs, declared))
            slots = 1 if self._threads == 1 or one < cs else ring_slots(self._threads, cs)
            self._ring = [memoryview(bytearray(one + TAG_SIZE)) for _ in range(slots)]
        count = max(1, -(-len(data) // cs))
        first, self._index = self._index, self._index + count
        prefix = self.header.nonce_prefix

        def work(j: int, out: memoryview) -> int:
            chunk = data[j * cs : (j + 1) * cs]
            nonce = chunk_nonce(prefix, first + j, last and j == count - 1)
            n = len(chunk) + TAG_SIZE
            self._aead.encrypt_into(nonce, chunk, self._aad, out[:n])
            return n

        if self._threads == 1 or count == 1:
            for j in range(count):
                self._fp.write(self._ring[0][: work(j, self._ring[0])])
        else:
            for sealed in ordered_parallel(count, self._threads, self._ring, work):
                self._fp.write(sealed)

    @property
    def plaintext_written(self) -> int:
        return self._total

    def close(self) -> None:
        """Seal the final chunk and flush. Does not close the underlying file."""
        if self._done:
            return
        try:
            declared = self.header.plaintext_size
            if declared is not None and declared != self._total:
                raise ValueError(
                    f"plaintext_size was declared as {declared}, "
                    f"but {self._total} bytes were written"
                )
            self._seal(memoryview(self._inbuf)[: self._fill], last=True)
            flush = getattr(self._fp, "flush", None)
            if flush is not None:
                flush()
        except BaseException:
            self.abort()
            raise
        self._finish()

    def abort(self) -> None:
        """Stop without sealing the final chunk: the output will not authenticate."""
        self._finish()

    def __del__(self) -> None:
        # io.IOBase.__del__ would call close() and seal the final chunk: a writer
        # dropped without close() must leave output that does not authenticate.
        if not getattr(self, "_done", True):
            self.abort()

    def _finish(self) -> None:
        self._done = True
        # The batch buffer holds plaintext (a partial batch): wiped, not left to the collector.
        zero(memoryview(self._inbuf))
        self._inbuf = bytearray()
        self._ring = []
        super().close()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


class SealReader(io.BufferedIOBase):
    """Stream the authenticated plaintext of a sealed file.

    Each chunk is authenticated before any of its bytes are returned. From a
    pipe or socket, truncation shows only when the final chunk is reached, as
    in any online scheme, so a consumer that must not act on a prefix writes
    to a temporary file and renames it after the last read (the CLI does).
    From a regular file the reader memory-maps it and authenticates the final
    chunk before the first byte is returned.

    Args:
        fp: the sealed source, positioned at the preamble (``read``/``readinto``;
            ``fileno`` and ``tell`` too when it is a regular file).
        dek: the data key; ``sealstore.kms.envelope.open_reader`` unwraps it
            from the slots first.
        preamble: the preamble if the caller already read it from *fp*.
        threads: chunks decrypted in parallel, read ahead in order.

    Raises:
        FormatError, UnsupportedVersion: the preamble is malformed.
        AuthenticationError: wrong key, or any chunk fails (from ``read``).
    """

    def __init__(
        self,
        fp: BinaryIO,
        dek: DataKey,
        *,
        preamble: Preamble | None = None,
        threads: int = 1,
    ) -> None:
        super().__init__()
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.preamble = preamble if preamble is not None else read_preamble(fp)
        header = self.preamble.header
        self._aead = new_aead(header.suite, open_payload_key(header, dek))
        self._aad = self.preamble.aad
        self._fp = fp
        self._cs = header.chunk_size
        self._chunks: Iterator[memoryview] = iter(())
        self._file: SealedFile | None = None
        self._map = map_regular_file(fp)
        if self._map is None:
            self._chunks = self._iter_chunks(threads)
        else:
            # A regular file: decrypt straight out of the page cache, in parallel,
            # instead of copying every chunk through read() first.
            try:
                start = fp.tell() - self.preamble.payload_offset
                if start < 0:
                    raise ValueError("fp is not positioned after the given preamble")
                self._file = SealedFile(memoryview(self._map)[start:], dek, preamble=self.preamble)
                self._chunks = self._file.iter_chunks(threads=threads)
            except BaseException:
                self.close()
                raise
        self._cur = memoryview(b"")
        self._pos = 0
        self._failed = False

    @property
    def header(self) -> Header:
        return self.preamble.header

    def readable(self) -> bool:
        return True

    def _read_block(self, buf: bytearray) -> int:
        """Fill *buf* from the source; fewer bytes only at end of input."""
        view, got = memoryview(buf), 0
        readinto = getattr(self._fp, "readinto", None)
        while got < len(buf):
            if readinto is not None:
                n = readinto(view[got:]) or 0
            else:
                part = self._fp.read(len(buf) - got)
                n = len(part)
                view[got : got + n] = part
            if not n:
                break
            got += n
        return got

    def _iter_chunks(self, threads: int) -> Iterator[memoryview]:
        """Yield each chunk's plaintext as a view that is valid until the next one."""
        full = self._cs + TAG_SIZE
        depth = threads + 1
        # A ring of buffers: each chunk is read and decrypted into preallocated
        # memory, avoiding an allocation and its page faults per chunk. In use at
        # once: the chunk being read, the one about to be queued, up to depth-1
        # queued and the one the consumer holds -- depth + 2 slots.
        size = depth + 2 if threads > 1 else 2
        ring = [(bytearray(full), bytearray(self._cs)) for _ in range(size)]
        pool = ThreadPoolExecutor(threads, "seal-reader") if threads > 1 else None
        pending: deque[Future[memoryview]] = deque()
        slot, index, seen = 0, 0, 0
        declared = self.preamble.header.plaintext_size
        ct_buf, _ = ring[slot]
        got = self._read_block(ct_buf)
        try:
            while True:
                if got < TAG_SIZE or (index > 0 and got == TAG_SIZE):
                    # Cut inside a tag, or an empty last chunk after full ones.
                    raise AuthenticationError("sealed payload is truncated")
                last = got < full
                nxt_slot = (slot + 1) % len(ring)
                nxt_got = 0
                if not last:
                    nxt_got = self._read_block(ring[nxt_slot][0])
                    last = nxt_got == 0
                seen += got - TAG_SIZE
                if declared is not None and (seen > declared or (last and seen != declared)):
                    raise AuthenticationError("sealed payload length does not match the header")
                job = (index, last, slot, got)
                if pool is None:
                    yield self._decrypt(ring, *job)
                else:
                    pending.append(pool.submit(self._decrypt, ring, *job))
                    while len(pending) >= depth:
                        yield pending.popleft().result()
                if last:
                    break
                slot, got, index = nxt_slot, nxt_got, index + 1
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()
            if pool is not None:
                pool.shutdown(wait=True)

    def _decrypt(
        self, ring: list[tuple[bytearray, bytearray]], index: int, last: bool, slot: int, got: int
    ) -> memoryview:
        ct, out = ring[slot]
        dst = memoryview(out)[: got - TAG_SIZE]
        nonce = chunk_nonce(self.preamble.header.nonce_prefix, index, last)
        try:
            self._aead.decrypt_into(nonce, memoryview(ct)[:got], self._aad, dst)
        except InvalidTag:
            zero(dst)
            raise AuthenticationError(f"chunk {index} failed authentication") from None
        return dst

    def _next(self) -> bool:
        if self.closed:
            raise ValueError("read from a closed SealReader")
        if self._failed:
            raise AuthenticationError("sealed stream already failed authentication")
        try:
            self._cur = next(self._chunks)
        except StopIteration:
            return False
        except BaseException:
            self._failed = True
            self._cur = memoryview(b"")
            raise
        self._pos = 0
        return True

    def iter_chunks(self) -> Iterator[memoryview]:
        """Yield the plaintext chunk by chunk; each view is valid until the next."""
        while True:
            if self._pos < len(self._cur):
                view = self._cur[self._pos :]
                self._pos = len(self._cur)
                yield view
            if not self._next():
                return

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        n = 0
        while n < len(out):
            if self._pos == len(self._cur) and not self._next():
                break
            take = min(len(out) - n, len(self._cur) - self._pos)
            out[n : n + take] = self._cur[self._pos : self._pos + take]
            self._pos += take
            n += take
        return n

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(bytes(v) for v in self.iter_chunks())
        buf = bytearray(size)
        n = self.readinto(buf)
        del buf[n:]
        return bytes(buf)

    read1 = read

    def copy_to(self, dst: IO[bytes], progress: Progress | None = None) -> int:
        """Write the whole plaintext to *dst*; returns the byte count."""
        total = 0
        for view in self.iter_chunks():
            dst.write(view)
            total += len(view)
            if progress is not None:
                progress(len(view))
        return total

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        self._cur = memoryview(b"")
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view
                self._map.close()
            self._map = None
        super().close()
