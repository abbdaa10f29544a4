"""Positional reads served by ranged fetches (an object store), fetched ahead in a bounded window.

A :class:`RangedSource` stands where :class:`sealstore.source.Source` does for
an object that is only reachable through ranged GETs. Small reads (the
preamble, the final chunk, a lazily read tensor) are one fetch each. A large
read goes through :meth:`RangedSource.window`: the byte spans it needs are
fetched by *concurrency* threads at once, in order, and handed to the
decrypting lanes as they arrive. A span is fetched only when one of the
window's *concurrency* slots is free, and a slot frees only once the lanes are
done with its span, so at most ``concurrency * range_size`` bytes of
ciphertext are fetched ahead whatever the size of the object, its tensors or
its chunks (plus the span each lane is still decrypting).

The fetch itself is the caller's (``fetch(start, end) -> bytes``): this floor
knows no S3 client. Retrying a failed fetch is the client's job too (botocore's
``standard`` retry mode, for the store's S3 backend). An optional *tap* sees
every byte of the object once, in order, as the ranges arrive -- the store
hashes the object there instead of downloading it a second time.

Written here, not taken from a library: the prefetching readers that exist
(fsspec's caches, s3fs files) serve one reader sequentially, with a lock;
what the lanes need is many ranges in flight, and out-of-order completion
with in-order hand-out.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from contextlib import contextmanager
from typing import Any

from sealstore.errors import AuthenticationError, BackendError

__all__ = ["DEFAULT_CONCURRENCY", "DEFAULT_RANGE_SIZE", "RangedSource"]

DEFAULT_CONCURRENCY = 8
# Measured on SeaweedFS over loopback (docs/PERFORMANCE.md): 8 in flight were
# the fastest of 1-16 for bare ranged GETs; in a load, 16 MiB ranges or 16 in
# flight came out within the machine's noise of 8 x 8 MiB, at twice the memory.
DEFAULT_RANGE_SIZE = 8 << 20
_HEAD = 64 << 10  # first fetch: the whole preamble in one request, for most files

Fetch = Callable[[int, int], Any]


class RangedSource:
    """An object read by ranges, through *fetch* (``fetch(start, end)`` -> the bytes).

    Args:
        fetch: returns bytes ``[start, end)`` of the object (a bytes-like
            object); raises on failure. Called from several threads at once.
        size: the object's size in bytes.
        name: what error messages call the object.
        concurrency: fetches in flight at once (at least 1).
        range_size: bytes a window fetch asks for at a time (at least 1).
        fail: turns a fetch's exception into the one raised (default: as is).
        deadline: seconds a fetch may take, retries included, before the read
            fails with ``BackendError`` (None: only the client's own timeouts).
            The fetch itself cannot be interrupted: it is abandoned, and ends
            on its client's timeouts in a daemon thread.

    Raises:
        ValueError: a concurrency or range size below 1.
    """

    in_memory = False

    def __init__(
        self,
        fetch: Fetch,
        size: int,
        *,
        name: str,
        concurrency: int = DEFAULT_CONCURRENCY,
        range_size: int = DEFAULT_RANGE_SIZE,
        fail: Callable[[BaseException], BaseException] | None = None,
        deadline: float | None = None,
    ) -> None:
        if concurrency < 1 or range_size < 1:
            raise ValueError("concurrency and range_size must be at least 1")
        self._fetch = fetch
        self.size = size
        self.name = name
        self.concurrency = concurrency
        self.range_size = range_size
        self._fail = fail or (lambda exc: exc)
        self.deadline = deadline
        self._head: bytes | None = None
        self._tap: _Tap | None = None
        self._pool: _Pool | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RangedSource({self.name!r}, size={self.size})"

    def fetch(self, start: int, end: int) -> memoryview:
        """Bytes ``[start, end)`` in one fetch.

        Raises:
            AuthenticationError: the server returned another length (the object
                changed, or a range past its end).
            Whatever *fail* makes of the fetch's own error.
        """
        if end <= start:
            return memoryview(b"")
        try:
            data = self._fetch(start, end)
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise self._fail(exc) from exc
        view = memoryview(data).cast("B")
        if len(view) != end - start:
            raise AuthenticationError(f"{self.name} changed size while being read")
        return view

    def _pool_started(self) -> _Pool:
        with self._lock:
            if self._pool is None:
                self._pool = _Pool(self.concurrency)
            return self._pool

    def wait(self, future: Future[memoryview], stop: threading.Event | None = None) -> Any:
        """*future*'s bytes; None once *stop* is set first.

        Polled, not waited on: once another lane has failed, this one returns
        at once instead of waiting out a GET to a server that stopped
        answering; a fetch running past the deadline fails the read.

        Raises:
            Whatever the fetch raised; ``BackendError`` past the deadline.
        """
        started = time.monotonic()
        while True:
            done, _ = wait([future], timeout=0.1)
            if done:
                return future.result()
            if stop is not None and stop.is_set():
                return None
            if self.deadline is not None and time.monotonic() - started > self.deadline:
                future.cancel()
                raise BackendError(
                    f"cannot read {self.name}: no answer within the {self.deadline:g} s deadline"
                )

    def view(self, offset: int, n: int, scratch: Any = None) -> memoryview:
        """Bytes ``[offset, offset + n)``: one fetch, or the cached head of the object."""
        if self._head is not None and offset + n <= len(self._head):
            return memoryview(self._head)[offset : offset + n]
        return self._fetch_now(offset, offset + n)

    def _fetch_now(self, start: int, end: int) -> memoryview:
        """One fetch on a fetch thread, waited for here (under the deadline)."""
        data: memoryview = self.wait(self._pool_started().submit(self.fetch, start, end))
        return data

    def head(self, n: int) -> bytes:
        """The first *n* bytes (fewer at the end of the object); the first call fetches 64 KiB."""
        n = min(n, self.size)
        if self._head is None or len(self._head) < n:
            self._head = bytes(self._fetch_now(0, min(self.size, max(n, _HEAD))))
        return self._head[:n]

    def release(self, offset: int, n: int) -> None:
        """Nothing to drop: a window's ranges are freed as soon as the lanes are done with them."""

    def tap(self, update: Callable[[memoryview], None]) -> Callable[[], None]:
        """Show *update* every byte of the object once, in order, as reads fetch them.

        Returns:
            ``finish()``: fetches (in ranges, *concurrency* at a time) and
            shows whatever the reads so far have not, so that *update* has
            seen the whole object when it returns.
        """
        tap = _Tap(update)
        if self._head is not None:  # the preamble, already fetched to parse it
            tap.feed(0, memoryview(self._head), threading.Event())
        self._tap = tap

        def finish() -> None:
            if tap.pos < self.size:
                spans = _split(tap.pos, self.size, self.range_size)
                with self.window(spans) as ranges:
                    for k, _ in ranges:
                        ranges.done(k)
            if tap.pos != self.size:
                raise AuthenticationError(f"{self.name} changed while being read")

        return finish

    @contextmanager
    def window(
        self, spans: Sequence[tuple[int, int]], stop: threading.Event | None = None
    ) -> Iterator[_Window]:
        """Fetch *spans* (``(start, end)`` pairs, in order) ahead of use, *concurrency* at once.

        Yields a :class:`_Window`: iterate it (from any number of threads) for
        ``(index, bytes)`` in the order of *spans*, and call ``done(index)``
        once each is used; that frees its slot for the next fetch. Leaving the
        block cancels the fetches not started; those in flight finish on
        their own (bounded by the client's timeouts) and are dropped.
        """
        win = _Window(self, spans, self._pool_started(), stop or threading.Event())
        try:
            yield win
        finally:
            win.close()

    def __enter__(self) -> RangedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the fetch threads (those in flight end on their own)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()
        self._head = None


class _Pool:
    """Fetch threads that never hold the process up at exit.

    ``ThreadPoolExecutor``'s threads are joined when the interpreter exits,
    so a GET to a frozen server would keep a failed command alive for its
    client's timeouts; these are daemons: an abandoned fetch dies with the
    process.
    """

    def __init__(self, n: int) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name="sealstore-range", daemon=True)
            for _ in range(n)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, fn, args))
        return future

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Let the threads end once their current fetch has (queued ones still run)."""
        for _ in self._threads:
            self._jobs.put(None)


class _Tap:
    """The in-order consumer of fetched bytes; ranges wait here for those before them."""

    def __init__(self, update: Callable[[memoryview], None]) -> None:
        self.update = update
        self.pos = 0
        self.cond = threading.Condition()

    def feed(self, start: int, data: memoryview, stop: threading.Event) -> None:
        with self.cond:
            # Ranges complete out of order; each waits for the one before it
            # (a window feeds only spans that run on from the tap's position).
            while self.pos < start and not stop.is_set():
                self.cond.wait(0.1)
            end = start + len(data)
            if start <= self.pos < end:
                self.update(data[self.pos - start :])
                self.pos = end
                self.cond.notify_all()


def _split(start: int, end: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, end)) for lo in range(start, end, size)]


class _Window:
    """The spans of one large read, fetched ahead through a bounded number of slots."""

    def __init__(
        self,
        src: RangedSource,
        spans: Sequence[tuple[int, int]],
        pool: _Pool,
        stop: threading.Event,
    ) -> None:
        self._src = src
        self._spans = spans
        self._pool = pool
        self._stop = stop
        self._lock = threading.Lock()
        self._queued: deque[tuple[int, Future[memoryview]]] = deque()
        self._next = 0
        self._closed = False
        self.fetched = 0  # ranges fetched, and the most bytes held at once (for tests)
        self._held = 0
        self.max_held = 0
        # The tap sees the spans that run on, without a gap, from its position;
        # a read that skips bytes leaves the rest to the tap's finish().
        self._tap_upto = -1
        tap = src._tap
        if tap is not None:
            pos = tap.pos
            for k, (start, end) in enumerate(spans):
                if start > pos:
                    break
                pos, self._tap_upto = max(pos, end), k
        with self._lock:
            for _ in range(min(src.concurrency, len(spans))):
                self._submit()

    def _submit(self) -> None:
        # With the lock held.
        if self._next >= len(self._spans) or self._closed:
            return
        k = self._next
        self._next += 1
        start, end = self._spans[k]
        self._held += end - start
        self.max_held = max(self.max_held, self._held)
        self._queued.append((k, self._pool.submit(self._get, k, start, end)))

    def _get(self, k: int, start: int, end: int) -> memoryview:
        if self._stop.is_set():
            raise _Stopped
        data = self._src.fetch(start, end)
        tap = self._src._tap
        if tap is not None and k <= self._tap_upto:
            tap.feed(start, data, self._stop)
        return data

    def __iter__(self) -> Iterator[tuple[int, memoryview]]:
        while True:
            with self._lock:
                if not self._queued or self._stop.is_set():
                    return
                k, future = self._queued.popleft()
            try:
                data = self._src.wait(future, self._stop)
            except _Stopped:
                return
            except BaseException:
                self._stop.set()
                raise
            if data is None:  # another lane failed, or the read ended
                return
            yield k, data

    def done(self, k: int) -> None:
        """Span *k* is used: its slot takes the next span."""
        with self._lock:
            start, end = self._spans[k]
            self._held -= end - start
            self.fetched += 1
            self._submit()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stop.set()  # fetches not yet running, and taps waiting, give up
            for _, future in self._queued:
                future.cancel()
            self._queued.clear()


class _Stopped(Exception):
    """A fetch skipped because the read had already failed or ended."""
