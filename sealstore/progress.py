"""A dependency-free progress bar on stderr, shown only for long work on a terminal."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

__all__ = ["Progress", "counted", "human_bytes"]


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 version``, ``2 versions``, ``0 copies`` (*plural* when adding "s" is wrong)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Callable with a byte count; draws ``label [####....] 41% 1.2 GiB/s``.

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
        rate = self.done / max(now - self.start, 1e-9)
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            text = f"\r{self.label} [{bar:<30}] {frac:4.0%} {human_bytes(rate)}/s"
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
