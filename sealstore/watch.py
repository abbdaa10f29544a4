"""What a running service tells its operators: Prometheus metrics and alerts (webhook + log).

The incident-response path shared by the key-release broker and the
inference guard. Metrics are prometheus_client's counters, histogram and
gauges in a registry of the service's own (each broker, each guarded model:
several live in one process), rendered in the Prometheus text format by
``render()``; ``serve_metrics`` answers ``GET /metrics`` for a process that
has no HTTP server of its own.

prometheus_client is an extra (``sealstore[broker]``, ``sealstore[guard]``),
not a dependency of the core: it is imported when a ``Metrics`` is made, so
``import sealstore.watch`` (and everything that imports it) stays light, and
a service made without it fails at start with the install line.

One process, one registry: the broker runs one uvicorn process per replica
and each replica is scraped (a query sums them). A deployment that runs one
replica under several worker processes needs prometheus_client's
multiprocess mode instead (``PROMETHEUS_MULTIPROC_DIR`` set before the
workers start, a ``MultiProcessCollector`` at ``/metrics``); the scrape-time
gauges read the shared state, so any worker's value is the replica's.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

__all__ = ["Alerts", "Metrics", "serve_metrics"]


log = logging.getLogger("sealstore.watch")

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
INSTALL = "pip install 'sealstore[broker]' (the broker) or 'sealstore[guard]' (the guard)"


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(f"metrics need prometheus_client ({exc}): {INSTALL}") from None
    return prometheus_client


class _Computed:
    """prometheus_client collector of gauges computed at scrape time.

    A custom collector rather than ``Gauge.set_function``: a gauge whose
    source is down (the broker's Redis) is left out of the scrape with a
    warning, instead of failing the whole ``/metrics`` answer.
    """

    def __init__(self) -> None:
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def describe(self) -> list[Any]:
        return []  # registered before any gauge: nothing to check for clashes

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        for name, (text, fn) in sorted(self.gauges.items()):
            try:
                value = float(fn())
            except Exception as exc:  # a state backend that is down: the gauge is left out
                log.warning("metric %s: %s", name, exc)
                continue
            yield GaugeMetricFamily(name, text, value=value)


class Metrics:
    """Counters, one histogram, and gauges computed at scrape time; thread-safe.

    Args:
        help: metric name -> (type, help text); the histogram is the one of type
            ``"histogram"`` (at most one). Counters end in ``_total``.
        buckets: the histogram's upper bounds (seconds).
        labels: counter name -> its label names. A counter named here is exposed
            from the start (an unlabelled one at 0); any other is made on its
            first ``inc``, with the label names that call gives.

    Raises:
        ImportError: prometheus_client is not installed (the message says how).
    """

    def __init__(
        self,
        help: Mapping[str, tuple[str, str]],
        *,
        buckets: tuple[float, ...] = BUCKETS,
        labels: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        prom = _prometheus()
        self.HELP = dict(help)
        hists = [n for n, (kind, _) in self.HELP.items() if kind == "histogram"]
        if len(hists) > 1:
            raise ValueError(f"one histogram per Metrics, not {hists}")
        self.registry = prom.CollectorRegistry()
        self._lock = threading.Lock()
        self._counters: dict[str, Any] = {}
        self._hist: Any = None
        if hists:
            self._hist = prom.Histogram(
                hists[0], self.HELP[hists[0]][1], buckets=buckets, registry=self.registry
            )
        self._computed = _Computed()
        self.registry.register(self._computed)
        for name, names in (labels or {}).items():
            self._counter(name, names)

    def _counter(self, name: str, label_names: Sequence[str]) -> Any:
        with self._lock:
            counter = self._counters.get(name)
            if counter is None:
                if not name.endswith("_total"):
                    raise ValueError(f"a counter's name ends in _total, not {name!r}")
                kind, text = self.HELP.get(name, ("counter", name))
                if kind != "counter":
                    raise ValueError(f"{name} is a {kind}, not a counter")
                from prometheus_client import Counter

                counter = self._counters[name] = Counter(
                    name, text, sorted(label_names), registry=self.registry
                )
            return counter

    def inc(self, name: str, labels: Mapping[str, str] | None = None, value: float = 1) -> None:
        counter = self._counters.get(name) or self._counter(name, list(labels or ()))
        if labels:
            counter = counter.labels(**{k: str(v) for k, v in labels.items()})
        counter.inc(value)

    def observe(self, seconds: float) -> None:
        if self._hist is None:
            raise ValueError("these metrics have no histogram")
        self._hist.observe(seconds)

    def gauge(self, name: str, help_text: str, fn: Callable[[], float]) -> None:
        """Expose ``fn()`` as the gauge *name*, computed at each scrape."""
        self._computed.gauges[name] = (help_text, fn)

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of every metric.

        Without prometheus_client's ``*_created`` series: the exposition kept
        before it had none, and they double the series a scrape stores. (Not
        ``disable_created_metrics()``: that is process-wide, and vLLM's own
        metrics live in the same process.)
        """
        from prometheus_client import generate_latest

        return generate_latest(_WithoutCreated(self.registry)).decode()


class _WithoutCreated:
    """A registry's metric families, less their ``*_created`` samples."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Any:
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


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
    (``server_address`` has the port; ``shutdown()`` stops it). Loopback by default.

    Not prometheus_client's ``start_http_server``: that answers the metrics on
    every path, and takes a registry where this takes any ``render``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            data = render().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
