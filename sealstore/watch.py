"""What a running service tells its operators: Prometheus metrics and alerts (webhook + log).

The incident-response path shared by the key-release broker and the
inference guard. Metrics are the process's own counters, rendered in the
Prometheus text format (``render()``; ``serve_metrics`` answers
``GET /metrics`` for a process that has no HTTP server of its own).

An alert is a JSON object POSTed to the configured webhook by a background
thread -- a slow or dead receiver must not hold up a key release or an
inference call -- and is also logged and counted (``PREFIX_alerts_total``),
so an alert survives a webhook outage in the metrics and in the log. Alerts
carry names, codes and hashes only.
"""

from __future__ import annotations

import http.server
import json
import logging
import queue
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Alerts", "Metrics", "serve_metrics"]


log = logging.getLogger("sealstore.watch")

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
           for k, v in labels.items()}  # fmt: skip
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


class Metrics:
    """Counters, one histogram, and gauges computed at scrape time; thread-safe.

    Args:
        help: metric name -> (type, help text); the histogram is the one of type
            ``"histogram"`` (at most one), counters named here are rendered even at 0.
        buckets: the histogram's upper bounds (seconds).
    """

    def __init__(
        self, help: Mapping[str, tuple[str, str]], *, buckets: tuple[float, ...] = BUCKETS
    ) -> None:
        self.HELP = dict(help)
        hists = [n for n, (kind, _) in self.HELP.items() if kind == "histogram"]
        if len(hists) > 1:
            raise ValueError(f"one histogram per Metrics, not {hists}")
        self._hist_name = hists[0] if hists else None
        self._buckets = buckets
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._hist = [0] * (len(buckets) + 1)
        self._hist_sum = 0.0
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def inc(self, name: str, labels: Mapping[str, str] | None = None, value: float = 1) -> None:
        key = (name, tuple(sorted((labels or {}).items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def observe(self, seconds: float) -> None:
        with self._lock:
            n = len(self._buckets)
            i = next((i for i, b in enumerate(self._buckets) if seconds <= b), n)
            self._hist[i] += 1
            self._hist_sum += seconds

    def gauge(self, name: str, help_text: str, fn: Callable[[], float]) -> None:
        self._gauges[name] = (help_text, fn)

    def render(self) -> str:
        with self._lock:
            counters = dict(self._counters)
            hist, total = list(self._hist), self._hist_sum
        out: list[str] = []
        hist_name = self._hist_name
        names = sorted(({n for n, _ in counters} | set(self.HELP)) - {hist_name})
        for name in names:
            kind, text = self.HELP.get(name, ("counter", name))
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for (n, labels), v in sorted(counters.items()):
                if n == name:
                    out.append(f"{name}{_labels(dict(labels))} {v:g}")
        if hist_name is not None:
            name = hist_name
            out += [f"# HELP {name} {self.HELP[name][1]}", f"# TYPE {name} histogram"]
            running = 0
            for b, c in zip((*self._buckets, float("inf")), hist, strict=True):
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
        source: the sender's name in each alert.
        prefix: the metrics' prefix: alerts are counted in ``PREFIX_alerts_total``
            and failed webhook POSTs in ``PREFIX_webhook_failures_total``.
    """

    def __init__(
        self,
        webhook: str | None,
        metrics: Metrics,
        *,
        source: str = "",
        prefix: str = "sealstore",
        timeout: float = 5.0,
    ) -> None:
        if webhook is not None and not webhook.startswith(("http://", "https://")):
            raise ValueError(f"an alert webhook is an http(s) URL, not {webhook!r}")
        self.webhook = webhook
        self.prefix = prefix
        self.metrics = metrics
        self.source = source
        self.timeout = timeout
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=10_000)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def fire(self, kind: str, **fields: Any) -> dict[str, Any]:
        alert = {"alert": kind, "time": time.time(), "source": self.source, **fields}
        self.metrics.inc(f"{self.prefix}_alerts_total", {"kind": kind})
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
        req = urllib.request.Request(  # noqa: S310 (the scheme is checked: http/https)
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
                    self.metrics.inc(f"{self.prefix}_webhook_failures_total")
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


def serve_metrics(
    render: Callable[[], str], host: str = "127.0.0.1", port: int = 0
) -> http.server.ThreadingHTTPServer:
    """Answer ``GET /metrics`` with ``render()`` from a daemon thread; returns the server
    (``server_address`` has the port; ``shutdown()`` stops it). Loopback by default."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            data = render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
