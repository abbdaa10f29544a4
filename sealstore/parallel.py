"""Lanes: the few threads that seal or open chunks in parallel.

Measured on the project's 2-vCPU VMs (docs/PERFORMANCE.md): waking a sleeping
thread costs 0.1-1 ms, so the designs here keep hand-offs off the critical
path -- one long-lived lane per thread instead of a future per chunk, and a
small ring of chunk buffers when results must come out in order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

__all__ = ["Lanes", "ordered_parallel", "ring_slots", "run_jobs"]

T = TypeVar("T")


def ring_slots(threads: int, chunk_size: int) -> int:
    """Ring buffers for *threads* ordered lanes: a multiple of *threads*.

    Four a lane on small chunks -- enough lead to hide wake-ups, little enough
    to stay in cache (measured best of 4..16 a lane on 1 MiB chunks) -- and as
    few as one a lane on 16 MiB and larger, where a hand-off is cheap against
    the chunk and memory is not (64 MiB chunks, 4 threads: 256 MiB).
    """
    return max(1, min(4, (32 << 20) // chunk_size // threads)) * threads


class Lanes:
    """*n* daemon threads running ``lane(k)``, k = 0..n-1, and a join that outlasts Ctrl-C.

    Daemon threads, not a thread pool: a reader left open when the interpreter
    exits must not keep it waiting for lanes blocked on its ring. On any
    exception a lane sets :attr:`stop` so the others quit at their next chunk.
    Signals reach only the main thread: Ctrl-C, and the CLI's ``Terminated``
    for SIGTERM/SIGHUP (a ``KeyboardInterrupt``), raise in :meth:`join` or in
    the consumer, which set :attr:`stop` and wait for every lane before the
    caller's cleanup removes buffers and temporary files.
    """

    def __init__(self, n: int, lane: Callable[[int], None], stop: threading.Event) -> None:
        self.stop = stop
        self.errors: list[BaseException] = []

        def run(k: int) -> None:
            try:
                lane(k)
            except BaseException as exc:
                self.errors.append(exc)
                stop.set()

        self._threads: list[threading.Thread] = []
        try:
            for k in range(n):
                thread = threading.Thread(
                    target=run, args=(k,), name=f"sealstore-lane-{k}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        except BaseException:
            # Interrupted while starting lanes: stop and wait for those running.
            stop.set()
            self._join_all()
            raise

    def join(self) -> None:
        """Wait for every lane; an interrupt stops them first and is re-raised after.

        Callers rely on this: once it returns or raises, no lane touches their
        buffers any more.
        """
        interrupted = self._join_all()
        if interrupted is not None:
            raise interrupted
        if self.errors:
            raise self.errors[0]

    def _join_all(self) -> BaseException | None:
        interrupted: BaseException | None = None
        for thread in self._threads:
            while True:
                try:
                    thread.join()
                    break
                except BaseException as exc:  # KeyboardInterrupt while joining
                    interrupted = interrupted or exc
                    self.stop.set()
        return interrupted


def ordered_parallel(
    count: int,
    threads: int,
    ring: list[memoryview],
    work: Callable[[int, memoryview], int],
) -> Iterator[memoryview]:
    """Run ``work(i, buf)`` for i in 0..count-1 on *threads* lanes; yield the results in order.

    Each result is ``buf[:n]`` for the *n* that ``work`` returned, valid until the
    next item is taken. The first exception stops the lanes and is raised here
    at once; nothing more is yielded. The number of *ring* buffers must be a
    multiple of *threads*: then a slot always belongs to one lane, which reuses
    it only after the consumer has taken the chunk it held.
    """
    slots = len(ring)
    if slots % threads:
        raise ValueError("the ring must hold a multiple of threads buffers")
    ready = [threading.Event() for _ in range(slots)]
    free = [threading.Event() for _ in range(slots)]
    for ev in free:
        ev.set()
    lengths = [0] * slots
    stop = threading.Event()

    def lane(start: int) -> None:
        for i in range(start, count, threads):
            slot = i % slots
            free[slot].wait()
            if stop.is_set():
                return
            free[slot].clear()
            try:
                lengths[slot] = work(i, ring[slot])
            except BaseException:
                stop.set()
                for ev in ready:  # wake the consumer wherever it waits
                    ev.set()
                raise
            ready[slot].set()

    lanes = Lanes(min(threads, count), lane, stop)
    try:
        for i in range(count):
            slot = i % slots
            ready[slot].wait()
            if stop.is_set():
                break  # a lane failed: join() below raises its error
            ready[slot].clear()
            yield ring[slot][: lengths[slot]]
            free[slot].set()
    finally:
        stop.set()
        for ev in free:
            ev.set()
        lanes.join()


def run_jobs(jobs: Sequence[Callable[[], T]], threads: int) -> list[T]:
    """Run *jobs* on *threads* daemon threads; their results, in order.

    Daemon threads, not a ``ThreadPoolExecutor``: leaving an executor's block
    -- and the interpreter's exit, which joins its threads -- waits for every
    job in flight, and a job blocked on a server that stopped answering would
    hold Ctrl-C up to that server's deadline. Here an interrupt is raised in
    the caller at once, and the jobs in flight are abandoned: they must leave
    nothing the caller relies on (uploads left half done, never published).

    Raises:
        BaseException: the first job's exception (once the jobs running then
            are done; no other job starts after it), or the caller's interrupt.
    """
    results: list[T | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    todo = iter(range(len(jobs)))
    lock = threading.Lock()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = jobs[i]()
            except BaseException as exc:
                errors.append(exc)
                stop.set()

    workers = [
        threading.Thread(target=run, name=f"sealstore-job-{k}", daemon=True)
        for k in range(max(1, min(threads, len(jobs))))
    ]
    try:
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
    finally:
        stop.set()  # interrupted: no thread starts another job
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]
