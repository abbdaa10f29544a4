"""Random access to a sealed file: any byte range, any chunk, in parallel."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag

from sealstore.chunks import ChunkLayout, Progress, chunk_nonce, new_aead, zero
from sealstore.errors import AuthenticationError, FormatError
from sealstore.format import (
    TAG_SIZE,
    Header,
    Preamble,
    open_payload_key,
    read_preamble_from,
)
from sealstore.keys import DataKey
from sealstore.parallel import Lanes, ordered_parallel, ring_slots
from sealstore.source import Source

__all__ = ["SealedFile", "peek_preamble"]


class SealedFile:
    """Random access to a sealed file's plaintext.

    Only the chunks a request covers are read and decrypted, which makes lazy
    tensor loads and ranged object-store reads cheap. Every returned byte has
    been authenticated; the file length is checked against the header's
    ``plaintext_size`` (or, without one, the final chunk is authenticated on
    the first read) so truncation never passes unnoticed.

    Args:
        src: a path, a bytes-like object, or a seekable binary file.
        dek: the data key (see ``sealstore.kms.open_sealed`` to use slots).
        preamble: a preamble already parsed from *src*.
        close_src: close the file object *src* when this closes.

    Raises:
        FormatError, UnsupportedVersion: a malformed preamble.
        AuthenticationError: wrong key, or an impossible payload length.
    """

    def __init__(
        self,
        src: Any,
        dek: DataKey,
        *,
        preamble: Preamble | None = None,
        close_src: bool = False,
    ) -> None:
        self._owned = src if close_src else None
        self._src = Source(src)
        try:
            if preamble is None:
                preamble = read_preamble_from(self._src.head)
            elif self._src.size < preamble.payload_offset:
                raise FormatError("file ends inside the preamble")
            header = preamble.header
            self.preamble = preamble
            self._aad = preamble.aad
            self._aead = new_aead(header.suite, open_payload_key(header, dek))
            self.layout = ChunkLayout(
                header, preamble.payload_offset, self._src.size - preamble.payload_offset
            )
        except BaseException:
            self._src.close()
            if self._owned is not None:
                self._owned.close()
            raise
        self._local = threading.local()
        # Nothing -- not even "this file is empty" -- is returned before the final
        # chunk has authenticated: that proves the header, the key and the length.
        self._end_verified = False

    @property
    def header(self) -> Header:
        return self.preamble.header

    @property
    def size(self) -> int:
        """The plaintext size in bytes."""
        return self.layout.plaintext_size

    @property
    def chunk_count(self) -> int:
        return self.layout.count

    def _scratch(self) -> bytearray:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(self.layout.chunk_size + TAG_SIZE)
        return buf

    def decrypt_chunk_into(self, i: int, buf: Any) -> int:
        """Authenticate and decrypt chunk *i* into the start of *buf*.

        The final chunk is authenticated first (once per file), so a truncated
        file never yields a chunk.

        Returns:
            The chunk's plaintext length.

        Raises:
            IndexError: no chunk *i*.
            ValueError: *buf* is too small.
            AuthenticationError: the chunk or the final one failed; *buf* is zeroed.
        """
        if 0 <= i < self.layout.count and i != self.layout.count - 1:
            try:
                self._verify_end()
            except AuthenticationError:
                zero(memoryview(buf).cast("B"))
                raise
        return self._decrypt_chunk(i, buf)

    def _decrypt_chunk(self, i: int, buf: Any) -> int:
        layout = self.layout
        if not 0 <= i < layout.count:
            raise IndexError(f"chunk {i} out of range (0..{layout.count - 1})")
        n = layout.plain_len(i)
        out = memoryview(buf).cast("B")
        if len(out) < n:
            raise ValueError(f"buffer of {len(out)} bytes is too small for chunk {i} ({n} bytes)")
        dst = out[:n]
        scratch = None if self._src.in_memory else self._scratch()
        ct = self._src.view(layout.offset(i), n + TAG_SIZE, scratch)
        nonce = chunk_nonce(self.header.nonce_prefix, i, i == layout.count - 1)
        try:
            self._aead.decrypt_into(nonce, ct, self._aad, dst)
        except InvalidTag:
            zero(dst)
            raise AuthenticationError(f"chunk {i} failed authentication") from None
        return n

    def _verify_end(self) -> None:
        if not self._end_verified:
            last = self.layout.count - 1
            scratch = bytearray(self.layout.plain_len(last))
            self._decrypt_chunk(last, scratch)
            zero(memoryview(scratch))
            self._end_verified = True

    def _run(
        self, jobs: list[tuple[int, memoryview]], threads: int, progress: Progress | None
    ) -> None:
        last = self.layout.count - 1
        if all(i != last for i, _ in jobs):
            self._verify_end()
        k = min(threads, len(jobs))
        if k <= 1:
            for job in jobs:
                self._decrypt_chunk(*job)
                if progress is not None:
                    progress(len(job[1]))
        else:
            # One lane per thread, each taking every k-th chunk: a future per chunk
            # costs more Python time under the GIL than it is worth (measured).
            stop = threading.Event()

            def lane(start: int) -> None:
                for job in jobs[start::k]:
                    if stop.is_set():
                        return
                    self._decrypt_chunk(*job)
                    if progress is not None:
                        progress(len(job[1]))

            Lanes(k, lane, stop).join()
        self._end_verified = True

    def read_into(
        self, offset: int, buf: Any, *, threads: int = 1, progress: Progress | None = None
    ) -> int:
        """Decrypt plaintext bytes ``[offset, offset + len(buf))`` into *buf*.

        Reads stop at the end of the plaintext. On any failure *buf* is zeroed.

        Returns:
            The number of bytes written.

        Raises:
            ValueError: a negative offset.
            AuthenticationError: a chunk the range covers failed.
        """
        if offset < 0:
            raise ValueError("offset must be non-negative")
        out = memoryview(buf).cast("B")
        end = min(offset + len(out), self.size)
        if end <= offset:
            self._verify_end()
            return 0
        cs = self.layout.chunk_size
        first, last = offset // cs, (end - 1) // cs
        jobs: list[tuple[int, memoryview]] = []
        edges: list[tuple[int, bytearray, int, int]] = []
        for i in range(first, last + 1):
            start = i * cs
            n = self.layout.plain_len(i)
            if start >= offset and start + n <= end:
                jobs.append((i, out[start - offset : start - offset + n]))
            else:
                # A chunk the range only partly covers goes through a scratch buffer.
                tmp = bytearray(n)
                lo, hi = max(offset, start), min(end, start + n)
                edges.append((i, tmp, lo - start, hi - start))
                jobs.append((i, memoryview(tmp)))
        try:
            self._run(jobs, threads, progress)
        except BaseException:
            zero(out)
            for _, tmp, _, _ in edges:
                zero(memoryview(tmp))
            raise
        for i, tmp, lo, hi in edges:
            dst = i * cs + lo - offset
            out[dst : dst + hi - lo] = memoryview(tmp)[lo:hi]
            zero(memoryview(tmp))
        return end - offset

    def read_scatter(
        self,
        pieces: Sequence[tuple[int, Any]],
        *,
        threads: int = 1,
        progress: Progress | None = None,
    ) -> None:
        """Decrypt several plaintext ranges, each into its own buffer, in one parallel pass.

        *pieces* are ``(offset, buffer)`` pairs (ranges must not overlap). Each
        chunk is decrypted once: straight into a buffer when one range covers
        it whole, else into scratch copied to every range it touches. On any
        failure every buffer is zeroed.

        Raises:
            ValueError: overlapping ranges, a negative offset or a range past the end.
            AuthenticationError: a chunk a range covers failed.
        """
        cs = self.layout.chunk_size
        outs = []
        for offset, buf in sorted(pieces, key=lambda p: p[0]):
            out = memoryview(buf).cast("B")
            if offset < 0 or offset + len(out) > self.size:
                raise ValueError("a range lies outside the plaintext")
            if outs and outs[-1][0] + len(outs[-1][1]) > offset:
                raise ValueError("ranges overlap")
            if len(out):
                outs.append((offset, out))
        direct: dict[int, memoryview] = {}
        shared: dict[int, list[tuple[memoryview, int, int]]] = {}
        for offset, out in outs:
            end = offset + len(out)
            for i in range(offset // cs, (end - 1) // cs + 1):
                start, n = i * cs, self.layout.plain_len(i)
                if start >= offset and start + n <= end:
                    direct[i] = out[start - offset : start - offset + n]
                else:
                    lo, hi = max(offset, start), min(end, start + n)
                    shared.setdefault(i, []).append(
                        (out[lo - offset : hi - offset], lo - start, hi - start)
                    )
        scratch = {i: bytearray(self.layout.plain_len(i)) for i in shared}
        jobs = [*direct.items(), *((i, memoryview(b)) for i, b in scratch.items())]
        jobs.sort(key=lambda j: j[0])
        try:
            if jobs:
                self._run(jobs, threads, progress)
            else:
                self._verify_end()
        except BaseException:
            for _, out in outs:
                zero(out)
            for b in scratch.values():
                zero(memoryview(b))
            raise
        for i, targets in shared.items():
            src = memoryview(scratch[i])
            for dst, lo, hi in targets:
                dst[:] = src[lo:hi]
            zero(src)

    def read_range(self, offset: int, n: int, *, threads: int = 1) -> bytes:
        """The plaintext bytes ``[offset, offset + n)``, shorter at the end of the file."""
        if n < 0:
            raise ValueError("n must be non-negative")
        buf = bytearray(max(0, min(n, self.size - offset)))
        got = self.read_into(offset, buf, threads=threads)
        return bytes(buf[:got])

    def decrypt_into(self, buf: Any, *, threads: int = 1, progress: Progress | None = None) -> int:
        """Decrypt the whole plaintext into *buf* (at least :attr:`size` bytes)."""
        if len(memoryview(buf).cast("B")) < self.size:
            raise ValueError("buffer is smaller than the plaintext")
        return self.read_into(0, buf, threads=threads, progress=progress)

    def iter_chunks(self, *, threads: int = 1) -> Iterator[memoryview]:
        """Yield the plaintext chunk by chunk, in order; each view is valid until the next.

        The final chunk is authenticated before the first is yielded; with
        *threads* > 1, chunks ahead are decrypted in parallel into a small ring.

        Raises:
            AuthenticationError: the first chunk that fails (none is yielded).
        """
        self._verify_end()
        return self._iter(threads)

    def _iter(self, threads: int) -> Iterator[memoryview]:
        """Every chunk's plaintext in order; no end check (callers decide)."""
        count, cs = self.layout.count, self.layout.chunk_size
        if threads <= 1:
            return self._iter_serial()
        # Lanes run ahead of the consumer through a ring of chunk buffers, each
        # lane taking every k-th chunk and blocking only when the ring is full;
        # the consumer takes the chunks in order. Waking a sleeping thread costs
        # ~0.1-1 ms on these VMs, so hand-offs must not sit on the critical path:
        # a future per chunk, or a batch per hand-off, measured no faster than
        # one thread.
        ring = [memoryview(bytearray(cs)) for _ in range(ring_slots(threads, cs))]
        return ordered_parallel(count, threads, ring, self._decrypt_chunk)

    def _iter_serial(self) -> Iterator[memoryview]:
        out = bytearray(self.layout.chunk_size)
        for i in range(self.layout.count):
            n = self._decrypt_chunk(i, out)
            yield memoryview(out)[:n]

    def verify(self, *, threads: int = 1, progress: Progress | None = None) -> None:
        """Authenticate every chunk, keeping no plaintext.

        Raises:
            AuthenticationError: the first chunk that fails.
        """
        # Every chunk is checked here, the last one too: no separate end check.
        for view in self._iter(threads):
            if progress is not None:
                progress(len(view))
            zero(view)
        self._end_verified = True

    def close(self) -> None:
        self._src.close()
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def __enter__(self) -> SealedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def peek_preamble(src: Any) -> Preamble:
    """Parse the preamble of a sealed source (path, bytes-like or seekable file); no key needed.

    Raises:
        FormatError, UnsupportedVersion: as :func:`sealstore.format.parse_preamble`.
    """
    source = Source(src)
    try:
        return read_preamble_from(source.head)
    finally:
        source.close()
