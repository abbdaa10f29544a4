"""sealstore.watch: the metrics on prometheus_client, read back with its own parser.

The broker's and the guard's metric names and labels are the operators'
contract (dashboards, alert rules): these tests pin them, check that the
exposition parses as Prometheus text, and that the core stays import-light.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sealstore.enclave.broker.watch import broker_metrics
from sealstore.loaders.inference_guard import HELP as GUARD_HELP
from sealstore.loaders.inference_guard.hook import LABELS as GUARD_LABELS
from sealstore.watch import Alerts, Metrics, serve_metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def families(text: str) -> dict[str, str]:
    """Family name -> type (prometheus_client's parser names a counter without _total)."""
    return {fam.name: fam.type for fam in text_string_to_metric_families(text)}


def test_broker_names_and_labels_are_the_same_as_before() -> None:
    m = broker_metrics()
    fams = families(m.render())
    # Declared counters are exposed before the first event (alert rules on absence).
    for name in ("releases", "challenges", "alerts", "audit_failures"):
        assert fams[f"sealstore_broker_{name}"] == "counter", name
    assert fams["sealstore_broker_release_seconds"] == "histogram"
    got = samples(m.render())
    assert got[("sealstore_broker_audit_failures_total", ())] == 0.0
    # Labels given in any order land on the declared names; values accumulate.
    m.inc("sealstore_broker_releases_total", {"result": "denied", "code": "tpm-signature"})
    m.inc("sealstore_broker_releases_total", {"code": "tpm-signature", "result": "denied"}, 2)
    m.inc("sealstore_broker_releases_total", {"result": "granted", "code": ""})
    m.observe(0.03)
    m.observe(7.0)
    text = m.render()
    got = samples(text)
    key = (("code", "tpm-signature"), ("result", "denied"))
    assert got[("sealstore_broker_releases_total", key)] == 3.0
    assert got[("sealstore_broker_releases_total", (("code", ""), ("result", "granted")))] == 1.0
    # Labels are rendered sorted, as the hand-written exposition did.
    assert 'sealstore_broker_releases_total{code="tpm-signature",result="denied"} 3.0' in (
        text.splitlines()
    )
    assert got[("sealstore_broker_release_seconds_count", ())] == 2.0
    assert got[("sealstore_broker_release_seconds_bucket", (("le", "0.05"),))] == 1.0
    assert got[("sealstore_broker_release_seconds_bucket", (("le", "+Inf"),))] == 2.0
    assert got[("sealstore_broker_release_seconds_sum", ())] == pytest.approx(7.03)


def test_guard_names_and_labels() -> None:
    m = Metrics(GUARD_HELP, labels=GUARD_LABELS)
    fams = families(m.render())
    for name in ("calls", "queries", "findings", "alerts", "audit_failures"):
        assert fams[f"sealstore_guard_{name}"] == "counter", name
    assert fams["sealstore_guard_observe_seconds"] == "histogram"
    with pytest.raises(ValueError):  # a label the counter does not have
        m.inc("sealstore_guard_calls_total", {"outcome": "ok"})


def test_gauges_at_scrape_time_and_a_failing_one_is_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = broker_metrics()
    state = {"lockouts": 2}
    m.gauge("sealstore_broker_lockouts", "Identities locked out now.", lambda: state["lockouts"])

    def down() -> float:
        raise ConnectionError("redis is down")

    m.gauge("sealstore_broker_lockdowns", "Lockdowns in force.", down)
    got = samples(m.render())
    assert got[("sealstore_broker_lockouts", ())] == 2.0
    assert ("sealstore_broker_lockdowns", ()) not in got  # left out, the scrape still answers
    assert "sealstore_broker_lockdowns: redis is down" in caplog.text
    state["lockouts"] = 0
    assert samples(m.render())[("sealstore_broker_lockouts", ())] == 0.0


def test_alerts_are_counted_and_undeclared_counters_made_on_first_use() -> None:
    m = broker_metrics()
    alerts = Alerts(None, m, prefix="sealstore_broker")
    alerts.fire("lockout", identity="trainer")
    alerts.fire("lockout", identity="trainer")
    m.inc("sealstore_broker_webhook_failures_total")
    got = samples(m.render())
    assert got[("sealstore_broker_alerts_total", (("kind", "lockout"),))] == 2.0
    assert got[("sealstore_broker_webhook_failures_total", ())] == 1.0
    with pytest.raises(ValueError, match="_total"):
        m.inc("sealstore_broker_oops")
    with pytest.raises(ValueError, match="Duplicated"):  # the histogram's series: refused
        m.inc("sealstore_broker_release_seconds_total")
    with pytest.raises(ValueError, match="one histogram"):
        Metrics({"a_seconds": ("histogram", "a"), "b_seconds": ("histogram", "b")})


def test_each_metrics_has_its_own_registry() -> None:
    a, b = broker_metrics(), broker_metrics()  # two brokers in one process: no clash
    a.inc("sealstore_broker_audit_failures_total")
    assert samples(a.render())[("sealstore_broker_audit_failures_total", ())] == 1.0
    assert samples(b.render())[("sealstore_broker_audit_failures_total", ())] == 0.0


def test_serve_metrics_answers_only_metrics() -> None:
    m = broker_metrics()
    m.inc("sealstore_broker_audit_failures_total", value=3)
    server = serve_metrics(m.render)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            got = samples(resp.read().decode())
        assert got[("sealstore_broker_audit_failures_total", ())] == 3.0
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        assert err.value.code == 404
    finally:
        server.shutdown()


def test_without_prometheus_client_a_service_fails_with_the_install_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"sealstore\[broker\]") as err:
        broker_metrics()
    assert "sealstore[guard]" in str(err.value)


def _fresh(code: str) -> Any:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_core_stays_import_light() -> None:
    # prometheus_client is imported when a Metrics is made, not by importing the
    # modules that use it (nor the guard's package, which needs torch only to run).
    out = _fresh(
        "import sys, sealstore, sealstore.watch, sealstore.loaders.inference_guard\n"
        "print(sorted(m for m in ('prometheus_client', 'torch') if m in sys.modules))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
