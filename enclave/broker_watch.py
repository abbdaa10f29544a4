"""What the broker tells its operators: Prometheus metrics and alerts (webhook + log).

Metrics are this replica's own counters, rendered in the Prometheus text
format at ``GET /metrics`` (each replica is scraped; a query sums them).
The gauges that describe shared state (lockouts, lockdowns) are read from
the state at scrape time, so every replica reports the same values.

An alert is a JSON object POSTed to the configured webhook by a background
thread -- a slow or dead receiver must not hold up a key release -- and is
also logged and counted (``sealstore_broker_alerts_total{kind=...}``), so
an alert survives a webhook outage in the metrics and in the log. Alerts
carry names, codes and hashes only.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Alerts", "Metrics"]

log = logging.getLogger("sealstore.broker")

# Release latency buckets (seconds): a release is a few ms in-process and a
# KMS round trip; the tail shows key service and Redis trouble.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
           for k, v in labels.items()}  # fmt: skip
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


class Metrics:
    """Counters, one histogram, and gauges computed at scrape time; thread-safe."""

    HELP = {
        "sealstore_broker_releases_total": ("counter", "Key release decisions by result/code."),
        "sealstore_broker_challenges_total": ("counter", "Challenge decisions by result/code."),
        "sealstore_broker_alerts_total": ("counter", "Alerts raised, by kind."),
        "sealstore_broker_audit_failures_total": ("counter", "Audit records not written."),
        "sealstore_broker_release_seconds": ("histogram", "Time to decide a release."),
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._hist = [0] * (len(BUCKETS) + 1)
        self._hist_sum = 0.0
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def inc(self, name: str, labels: Mapping[str, str] | None = None, value: float = 1) -> None:
        key = (name, tuple(sorted((labels or {}).items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def observe(self, seconds: float) -> None:
        with self._lock:
            i = next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))
            self._hist[i] += 1
            self._hist_sum += seconds

    def gauge(self, name: str, help_text: str, fn: Callable[[], float]) -> None:
        self._gauges[name] = (help_text, fn)

    def render(self) -> str:
        with self._lock:
            counters = dict(self._counters)
            hist, total = list(self._hist), self._hist_sum
        out: list[str] = []
        hist_name = "sealstore_broker_release_seconds"
        names = sorted(({n for n, _ in counters} | set(self.HELP)) - {hist_name})
        for name in names:
            kind, text = self.HELP.get(name, ("counter", name))
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for (n, labels), v in sorted(counters.items()):
                if n == name:
                    out.append(f"{name}{_labels(dict(labels))} {v:g}")
        name = "sealstore_broker_release_seconds"
        out += [f"# HELP {name} {self.HELP[name][1]}", f"# TYPE {name} histogram"]
        running = 0
        for b, c in zip((*BUCKETS, float("inf")), hist, strict=True):
            running += c
            le = "+Inf" if b == float("inf") else f"{b:g}"
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {total:.6f}", f"{name}_count {running}"]
        for gname, (text, fn) in sorted(self._gauges.items()):
            try:
                v = float(fn())
            except Exception as exc:  # a state backend that is down: the gauge is left out
                log.warning("metric %s: %s", gname, exc)
                continue
            out += [f"# HELP {gname} {text}", f"# TYPE {gname} gauge", f"{gname} {v:g}"]
        return "\n".join(out) + "\n"


class Alerts:
    """Raise alerts: counted, logged, and POSTed to *webhook* (if any) in the background.

    Args:
        webhook: an http(s) URL that takes a JSON POST, or None.
        metrics: where alerts are counted.
        source: this broker's name in each alert.
    """

    def __init__(
        self, webhook: str | None, metrics: Metrics, *, source: str = "", timeout: float = 5.0
    ) -> None:
        self.webhook = webhook
        self.metrics = metrics
        self.source = source
        self.timeout = timeout
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=10_000)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def fire(self, kind: str, **fields: Any) -> dict[str, Any]:
        alert = {"alert": kind, "time": time.time(), "source": self.source, **fields}
        self.metrics.inc("sealstore_broker_alerts_total", {"kind": kind})
        log.warning("ALERT %s: %s", kind, json.dumps(fields, sort_keys=True, default=str))
        if self.webhook is not None:
            self._start()
            try:
                self._queue.put_nowait(alert)
            except queue.Full:
                log.error("alert webhook queue is full: %s not sent", kind)
        return alert

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            alert = self._queue.get()
            try:
                if alert is None:
                    return
                self._post(alert)
            finally:
                self._queue.task_done()

    def _post(self, alert: dict[str, Any]) -> None:
        assert self.webhook is not None
        req = urllib.request.Request(  # noqa: S310 (the config checks the scheme is http/https)
            self.webhook,
            data=json.dumps(alert, sort_keys=True, default=str).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        for attempt in range(3):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                    resp.read(1024)
                return
            except OSError as exc:
                if attempt == 2:
                    log.error("alert webhook failed for %s: %s", alert["alert"], exc)
                    self.metrics.inc("sealstore_broker_webhook_failures_total")
                else:
                    time.sleep(0.2 * (attempt + 1))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued alert was sent (or given up); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True
