"""Random access to a sealed file: any byte range, any chunk, in parallel."""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag

from sealstore.chunks import ChunkLayout, Progress, chunk_nonce, copy_into, new_aead, zero
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
from sealstore.ranged import RangedSource
from sealstore.source import Source

__all__ = ["SealedFile", "peek_preamble"]

_LANE_RUN = 4 << 20  # bytes of adjacent chunks a lane takes at a time
_SHARED, _UNUSED = -1, -2


class _Plan:
    """Which buffer each chunk of a scatter read goes to, without an object per chunk.

    ``owner[i - first]`` is the index in *outs* of the range that covers chunk
    *i* whole, ``_SHARED`` for a chunk split between ranges (or only partly
    read; its pieces are in ``shared[i]``), ``_UNUSED`` for a chunk no range
    touches. A plain int array: a load of thousands of chunks allocates no
    per-chunk Python objects, which would set off the cyclic garbage
    collector mid-load (a full collection took 100 ms with torch imported).
    """

    def __init__(self, outs: list[tuple[int, memoryview]], layout: ChunkLayout) -> None:
        cs = layout.chunk_size
        self.outs = outs
        self.first = outs[0][0] // cs
        span = (outs[-1][0] + len(outs[-1][1]) - 1) // cs + 1 - self.first
        self.owner = array("q", [_UNUSED]) * span
        self.shared: dict[int, list[tuple[memoryview, int, int]]] = {}
        for k, (offset, out) in enumerate(outs):
            end = offset + len(out)
            a, b = offset // cs, (end - 1) // cs  # chunks the range touches
            whole_a = a if a * cs >= offset else a + 1
            whole_b = b if b * cs + layout.plain_len(b) <= end else b - 1
            if whole_a <= whole_b:
                n = whole_b - whole_a + 1
                self.owner[whole_a - self.first : whole_b + 1 - self.first] = array("q", [k]) * n
            for i in {a, b}:
                if whole_a <= i <= whole_b:
                    continue
                lo, hi = max(offset, i * cs), min(end, i * cs + layout.plain_len(i))
                self.owner[i - self.first] = _SHARED
                part = (out[lo - offset : hi - offset], lo - i * cs, hi - i * cs)
                self.shared.setdefault(i, []).append(part)


class SealedFile:
    """Random access to a sealed file's plaintext.

    Only the chunks a request covers are read and decrypted, which makes lazy
    tensor loads and ranged object-store reads cheap. Every returned byte has
    been authenticated; the file length is checked against the header's
    ``plaintext_size`` (or, without one, the final chunk is authenticated on
    the first read) so truncation never passes unnoticed.

    Args:
        src: a path, a bytes-like object, a seekable binary file, or a
            :class:`~sealstore.ranged.RangedSource` (an object store's object:
            large reads fetch many ranges at once, see :meth:`read_scatter`).
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
        self._pending: Callable[[], None] | None = None
        self._observer: Callable[[int, memoryview], None] | None = None
        self._src: Source | RangedSource = src if isinstance(src, RangedSource) else Source(src)
        try:
            if preamble is None:
                preamble = read_preamble_from(self._src.head)
            elif self._src.size < preamble.payload_offset:
                raise FormatError("file ends inside the preamble")
            header = preamble.header
            self.preamble = preamble
            self._aad = preamble.aad
            payload_key = open_payload_key(header, dek)
            self._aead = new_aead(header.suite, payload_key)
            # Kept (wiped on close) only for decrypting on a GPU, whose kernels
            # need the key itself; nothing on the CPU path reads it.
            self._payload_key = bytearray(payload_key)
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

    def check_beside(self, check: Callable[[], None]) -> None:
        """Hold back every plaintext byte until *check* has passed.

        *check* is a whole-object check already running on its own (the
        store's object digest, hashed on a thread): it is called -- it joins
        and raises on a mismatch -- before any read returns. A read that
        decrypts into the caller's buffers (:meth:`read_scatter`,
        :meth:`read_into`) calls it after decrypting, so the hash overlaps
        the decryption, and zeroes the buffers if it raises; the other reads
        call it before they start. It is called again on every read until it
        passes, so a failed check keeps failing.
        """
        self._pending = check

    def observe_plaintext(self, observer: Callable[[int, memoryview], None] | None) -> None:
        """Hand every range decrypted into a caller's buffer to *observer* as well.

        ``observer(offset, view)`` is called from the decrypting lane, right
        after the chunk authenticated, with the plaintext offset and the
        destination buffer holding it (no copy): a hash of the plaintext
        runs beside the decryption instead of as a second pass (the OMS model
        signature, ``sealstore.vault.oms.PlaintextDigest``). Ranges arrive in
        any order and may repeat; the observer must not keep them past the
        read unless the caller keeps its buffers. Pair it with
        :meth:`check_beside` so nothing is returned before its verdict.
        """
        self._observer = observer

    def detach_check(self) -> Callable[[], None] | None:
        """Take back the pending check of :meth:`check_beside` (None if there is none).

        For a reader that parses a small part first (a safetensors header)
        and then decrypts everything: it detaches the check for the parse and
        puts it back with :meth:`check_beside`, so the full read that follows
        overlaps the check and nothing leaves the reader unchecked.
        """
        check, self._pending = self._pending, None
        return check

    def _settle(self) -> None:
        """Run the pending whole-object check, if any (it raises on a mismatch)."""
        check = self._pending  # read once: another thread may settle it meanwhile
        if check is not None:
            check()
            self._pending = None

    def _lane_buffer(self, name: str, size: int) -> memoryview:
        """This thread's reusable buffer *name* (ciphertext or plaintext scratch)."""
        buf = getattr(self._local, name, None)
        if buf is None:
            buf = memoryview(bytearray(size))
            setattr(self._local, name, buf)
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
        self._settle()
        if 0 <= i < self.layout.count and i != self.layout.count - 1:
            try:
                self._verify_end()
            except AuthenticationError:
                zero(memoryview(buf).cast("B"))
                raise
        return self._decrypt_chunk(i, buf)

    def _decrypt_chunk(self, i: int, buf: Any, sealed: memoryview | None = None) -> int:
        layout = self.layout
        if not 0 <= i < layout.count:
            raise IndexError(f"chunk {i} out of range (0..{layout.count - 1})")
        n = layout.plain_len(i)
        out = memoryview(buf).cast("B")
        if len(out) < n:
            raise ValueError(f"buffer of {len(out)} bytes is too small for chunk {i} ({n} bytes)")
        dst = out[:n]
        if sealed is not None:  # fetched already (a window of ranged reads)
            ct = sealed
        else:
            scratch = None
            if not self._src.in_memory:
                scratch = self._lane_buffer("sealed", self.layout.chunk_size + TAG_SIZE)
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

    def _decrypt_from(self, i: int, buf: Any, sealed: memoryview | None) -> int:
        # The plain two-argument call when nothing was fetched ahead: what
        # wrappers of _decrypt_chunk (tests counting decryptions) expect.
        if sealed is None:
            return self._decrypt_chunk(i, buf)
        return self._decrypt_chunk(i, buf, sealed)

    def _do_chunk(self, plan: _Plan, i: int, sealed: memoryview | None = None) -> int:
        k = plan.owner[i - plan.first]
        if k >= 0:  # one range covers chunk i whole: decrypt straight into it
            offset, out = plan.outs[k]
            start = i * self.layout.chunk_size - offset
            dst = out[start : start + self.layout.plain_len(i)]
            n = self._decrypt_from(i, dst, sealed)
            if self._observer is not None:
                self._observer(i * self.layout.chunk_size, dst[:n])
            return n
        if k == _UNUSED:
            return 0
        # Ranges share chunk i or cover only part of it: decrypted (and so
        # authenticated) into this lane's scratch, copied out, then wiped.
        tmp = self._lane_buffer("plain", self.layout.chunk_size)
        n = self._decrypt_from(i, tmp, sealed)
        try:
            for out, lo, hi in plan.shared[i]:
                copy_into(out, tmp[lo:hi])
                if self._observer is not None:
                    self._observer(i * self.layout.chunk_size + lo, out)
        finally:
            zero(tmp[:n])
        return sum(hi - lo for _, lo, hi in plan.shared[i])

    def _run(self, plan: _Plan, threads: int, progress: Progress | None) -> None:
        last = self.layout.count - 1
        if not plan.first <= last < plan.first + len(plan.owner):
            self._verify_end()
        span = len(plan.owner)
        end = plan.first + span
        k = min(threads, span)
        stop = threading.Event()
        if isinstance(self._src, RangedSource):
            self._run_ranged(plan, self._src, max(1, k), stop, progress)
            self._end_verified = True
            return

        def do_run(first: int, stop_at: int) -> None:
            for i in range(first, stop_at):
                if stop.is_set():
                    return
                n = self._do_chunk(plan, i)
                if progress is not None and n:
                    progress(n)
            # The run's ciphertext leaves the resident set (a mapped file: it
            # stays in the page cache), so a full load's peak is the plaintext
            # once, not plaintext and ciphertext.
            lo, tail = self.layout.offset(first), stop_at - 1
            hi = self.layout.offset(tail) + self.layout.plain_len(tail) + TAG_SIZE
            self._src.release(lo, hi - lo)

        if k <= 1:
            run = max(1, _LANE_RUN // self.layout.chunk_size)
            for first in range(plan.first, end, run):
                do_run(first, min(first + run, end))
        else:
            # One lane per thread, not a future per chunk (a future costs more
            # Python time under the GIL than it is worth, measured). Lanes take
            # runs of adjacent chunks (~4 MiB) from a shared counter: two lanes
            # writing into one 2 MiB page-table range contend on its lock while
            # faulting in fresh pages, which is most of a load's time.
            # ... but at least four runs a lane, so small reads still spread out.
            run = max(1, min(_LANE_RUN // self.layout.chunk_size, span // (4 * k)))
            starts = iter(range(plan.first, end, run))

            def lane(_: int) -> None:
                for first in starts:  # next() on a shared iterator is atomic
                    do_run(first, min(first + run, end))

            Lanes(k, lane, stop).join()
        self._end_verified = True

    def _run_ranged(
        self,
        plan: _Plan,
        src: RangedSource,
        lanes: int,
        stop: threading.Event,
        progress: Progress | None,
    ) -> None:
        """Decrypt the plan's chunks as *src* fetches them: many ranges in flight, bounded.

        Each range is a run of whole chunks (``range_size`` rounded down to
        whole sealed chunks, at least one), so a lane decrypts straight out
        of the fetched bytes; ranges whose chunks the plan does not need are
        not fetched.
        """
        layout = self.layout
        stride = layout.chunk_size + TAG_SIZE
        per = max(1, src.range_size // stride)
        end = plan.first + len(plan.owner)
        runs = [
            (a, min(a + per, end))
            for a in range(plan.first, end, per)
            if any(plan.owner[i - plan.first] != _UNUSED for i in range(a, min(a + per, end)))
        ]

        def span(a: int, b: int) -> tuple[int, int]:
            return layout.offset(a), layout.offset(b - 1) + layout.plain_len(b - 1) + TAG_SIZE

        with src.window([span(a, b) for a, b in runs], stop) as ranges:

            def lane(_: int) -> None:
                for j, data in ranges:  # in order, shared by the lanes
                    a, b = runs[j]
                    base = layout.offset(a)
                    for i in range(a, b):
                        if stop.is_set():
                            return
                        lo = layout.offset(i) - base
                        n = self._do_chunk(plan, i, data[lo : lo + layout.plain_len(i) + TAG_SIZE])
                        if progress is not None and n:
                            progress(n)
                    ranges.done(j)

            Lanes(lanes, lane, stop).join()

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
        n = max(0, min(len(out), self.size - offset))
        if n == 0:
            self._verify_end()
            self._settle()
            return 0
        try:
            self.read_scatter([(offset, out[:n])], threads=threads, progress=progress)
        except BaseException:
            zero(out)
            raise
        return n

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
        it whole, else into a lane's scratch copied to every range it touches.
        On any failure every buffer is zeroed.

        Raises:
            ValueError: overlapping ranges, a negative offset or a range past the end.
            AuthenticationError: a chunk a range covers failed.
        """
        outs = []
        for offset, buf in sorted(pieces, key=lambda p: p[0]):
            out = memoryview(buf).cast("B")
            if offset < 0 or offset + len(out) > self.size:
                raise ValueError("a range lies outside the plaintext")
            if outs and outs[-1][0] + len(outs[-1][1]) > offset:
                raise ValueError("ranges overlap")
            if len(out):
                outs.append((offset, out))
        try:
            if outs:
                self._run(_Plan(outs, self.layout), threads, progress)
            else:
                self._verify_end()
            self._settle()  # after decrypting: the check ran beside the lanes
        except BaseException:
            for _, out in outs:
                zero(out)
            raise

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
        self._settle()
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
        self._settle()
        for view in self._iter(threads):
            if progress is not None:
                progress(len(view))
            zero(view)
        self._end_verified = True

    def chunk_nonce(self, i: int) -> bytes:
        """The 12-byte nonce chunk *i* is sealed under."""
        return chunk_nonce(self.header.nonce_prefix, i, i == self.layout.count - 1)

    def read_raw_chunks(self, first: int, count: int, buf: Any) -> int:
        """Copy the sealed bytes (ciphertext + tag) of chunks first..first+count-1 into *buf*.

        For decrypting elsewhere (the GPU path stages these in pinned memory).
        Nothing is decrypted or authenticated here. Returns the bytes copied.
        """
        if not (first >= 0 and count >= 0 and first + count <= self.layout.count):
            raise IndexError("chunk range out of bounds")
        self._settle()  # what is decrypted elsewhere is returned there: checked first
        if count == 0:
            return 0
        start = self.layout.offset(first)
        end = self.layout.offset(first + count - 1) + self.layout.plain_len(first + count - 1)
        n = end + TAG_SIZE - start
        out = memoryview(buf).cast("B")[:n]
        if len(out) < n:
            raise ValueError("buffer too small for the chunks")
        if isinstance(self._src, Source) and not self._src.in_memory:
            self._src.view(start, n, out)  # read straight into the caller's buffer
        else:
            copy_into(out, self._src.view(start, n))
        return n

    def device_key(self) -> bytearray:
        """A copy of the payload key, for a GPU kernel; the caller wipes it after use.

        Raises:
            ValueError: the file is closed.
        """
        if not any(self._payload_key):
            raise ValueError("the sealed file is closed")
        return bytearray(self._payload_key)

    def _wipe_key(self) -> None:
        key = getattr(self, "_payload_key", None)
        if key is not None:
            key[:] = bytes(len(key))
        close = getattr(getattr(self, "_aead", None), "close", None)
        if close is not None:  # the native engine's key schedule
            close()

    def __del__(self) -> None:
        self._wipe_key()

    def close(self) -> None:
        self._wipe_key()
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
    if isinstance(src, RangedSource):  # the caller's: not closed here
        return read_preamble_from(src.head)
    source = Source(src)
    try:
        return read_preamble_from(source.head)
    finally:
        source.close()
