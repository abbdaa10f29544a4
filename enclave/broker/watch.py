"""The broker's metrics: its names on the shared incident-response path (``sealstore.watch``).

Each replica's own counters, rendered at ``GET /metrics`` (each replica is
scraped; a query sums them), among them the config reloads by outcome and
the expired tokens refused. The gauges that describe shared state
(lockouts, lockdowns) are read from the state at scrape time, so every
replica reports the same values. Alerts go through ``sealstore.watch.Alerts``
with the prefix ``sealstore_broker``.
"""

from __future__ import annotations

from sealstore.watch import Alerts, Metrics

__all__ = ["HELP", "LABELS", "Alerts", "Metrics", "broker_metrics"]

HELP = {
    "sealstore_broker_releases_total": ("counter", "Key release decisions by result/code."),
    "sealstore_broker_challenges_total": ("counter", "Challenge decisions by result/code."),
    "sealstore_broker_alerts_total": ("counter", "Alerts raised, by kind."),
    "sealstore_broker_audit_failures_total": ("counter", "Audit records not written."),
    # A refused reload leaves the old config in force: alert on outcome="refused".
    "sealstore_broker_config_reloads_total": ("counter", "Config reloads by trigger/outcome."),
    "sealstore_broker_token_refusals_total": ("counter", "Bearer tokens refused, by code."),
    # A release is a few ms in-process and a KMS round trip; the tail shows
    # key service and Redis trouble.
    "sealstore_broker_release_seconds": ("histogram", "Time to decide a release."),
}


# The counters' label names (sealstore.watch.Metrics: declared, they are exposed from the start).
LABELS = {
    "sealstore_broker_releases_total": ("result", "code"),
    "sealstore_broker_challenges_total": ("result", "code"),
    "sealstore_broker_alerts_total": ("kind",),
    "sealstore_broker_audit_failures_total": (),
    "sealstore_broker_config_reloads_total": ("trigger", "outcome"),
    "sealstore_broker_token_refusals_total": ("code",),
}


def broker_metrics() -> Metrics:
    return Metrics(HELP, labels=LABELS)
