"""Progress: the CLI's dependency-free terminal bar, and tqdm.auto for library callers.

Two audiences. The ``sealstore`` command draws its own bar (:class:`Progress`):
one line on a terminal's stderr, nothing in a pipe or a log, no dependency.
A library caller who passes ``progress=True`` (``load_file``) may be in a
notebook or a job whose stderr is no terminal, where that bar shows nothing:
:func:`library_bar` gives tqdm.auto's bar there when tqdm is installed (the
``progress`` extra; a widget in Jupyter, text elsewhere), and the terminal bar
otherwise.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

__all__ = ["LibraryBar", "Progress", "counted", "eta", "human_bytes", "library_bar"]


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 version``, ``2 versions``, ``0 copies`` (*plural* when adding "s" is wrong)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def eta(done: int, total: int, elapsed: float) -> str:
    """``ETA 1:05`` (or ``ETA 2:03:10``) for the rest at the rate so far; ``""`` until known."""
    if done <= 0 or elapsed <= 0 or done >= total:
        return ""
    left = round((total - done) * elapsed / done)
    hours, rest = divmod(left, 3600)
    minutes, seconds = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
    return f"ETA {clock}"


class Progress:
    """Callable with a byte count; draws ``label [####....] 41% 1.2 GiB/s ETA 0:12``.

    Nothing is drawn until *delay* seconds have passed, so short commands stay
    quiet; nothing at all unless *stream* is a terminal or *force* is set.
    Thread-safe enough for its purpose: counts may be added from workers.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        delay: float = 0.5,
        force: bool = False,
    ) -> None:
        self.stream = stream or sys.stderr
        self.label = label
        self.total = total
        self.done = 0
        self.start = time.monotonic()
        self.enabled = enabled and (force or self.stream.isatty())
        self._delay = 0.0 if force else delay
        self._last = 0.0
        self._drawn = False
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start < self._delay or now - self._last < 0.1:
            return
        self._last = now
        self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            left = eta(self.done, self.total, elapsed)
            text = f"\r{self.label} [{bar:<30}] {frac:4.0%} {human_bytes(rate)}/s {left:<12}"
        else:
            text = f"\r{self.label} {human_bytes(self.done)} {human_bytes(rate)}/s"
        # The CLI's stdout and stderr escape control characters; a bar's own
        # carriage return goes through write_control where the stream has it.
        getattr(self.stream, "write_control", self.stream.write)(text)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LibraryBar:
    """The bar behind a library call's ``progress=True``: callable with a byte count.

    tqdm.auto's bar when tqdm is installed, else :class:`Progress` (a terminal
    only). Made by :func:`library_bar`; closed by whoever made it.
    """

    def __init__(self, label: str, total: int | None) -> None:
        self._lock = threading.Lock()
        try:
            from tqdm.auto import tqdm
        except ImportError:  # the progress extra is not installed: the terminal bar
            self._tqdm: Any = None
            self._plain: Progress | None = Progress(label, total)
            return
        self._plain = None
        # delay: like the terminal bar, short loads draw nothing.
        self._tqdm = tqdm(
            total=total,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            delay=0.5,
        )

    @property
    def uses_tqdm(self) -> bool:
        """Whether tqdm draws this bar."""
        return self._tqdm is not None

    def __call__(self, n: int) -> None:
        if self._plain is not None:
            self._plain(n)
            return
        with self._lock:  # tqdm's counter is not safe to bump from several workers
            self._tqdm.update(n)

    def close(self) -> None:
        if self._plain is not None:
            self._plain.close()
        else:
            self._tqdm.close()

    def __enter__(self) -> LibraryBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def library_bar(label: str, total: int | None) -> LibraryBar:
    """A progress bar for a library call that was given ``progress=True``.

    Args:
        label: what the bar is for (``"load"``).
        total: the byte count it goes to, or ``None`` when unknown.

    Returns:
        A :class:`LibraryBar`: tqdm.auto's when tqdm is installed (notebooks and
        non-terminals included), else the terminal bar. Call ``close()`` when done.
    """
    return LibraryBar(label, total)
