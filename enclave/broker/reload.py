"""Reloading a running broker's config: on SIGHUP, and when a file it was loaded from changes.

What reloads: identities and their tokens, tenants, rules and their reference
values (inline or in ``reference_file``\\ s), the detectors, ``challenge_ttl``
and the limits. What needs a restart (``RESTART_ONLY``: the listening
address, TLS, the state, the audit log, the webhook, the pinned signing key)
cannot change by a reload: a new config that changes one is refused whole.

A new config is loaded and checked in full, off to the side, exactly as at
start (signature included when ``signing.public_key`` is pinned, and its
serial must be above the running one's); only then is it put in force, in one
assignment (``Broker.replace_config``). Anything wrong and the old config
stays in force, untouched. Every attempt that is not a no-op is a record in
the audit log (``config.reload``: the trigger, the outcome, the old and new
digests, what changed, or why it was refused) and a count in
``sealstore_broker_config_reloads_total``; a refused one is also an alert
(``config-refused``). An applied change is recorded before it is in force: a
change the audit log cannot hold is refused.

The files are polled (every ``reload.interval`` seconds, the SHA-256 of each:
they are a few KiB, and a digest cannot be fooled by an mtime kept or a size
unchanged, which inotify-free polling of mtime and size alone could). A
change is acted on once two polls agree, so an editor's half-written file is
not loaded and refused.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sealstore.enclave.broker.config import RESTART_ONLY, BrokerConfig
from sealstore.enclave.broker.server import Broker
from sealstore.errors import FormatError

__all__ = ["Reloader"]

log = logging.getLogger("sealstore.broker")

# Fields a reload may change, reported by name when they do.
_RELOADABLE = (
    "challenge_ttl",
    "max_challenges",
    "max_challenges_per_identity",
    "admin_remote",
    "metrics_remote",
    "detectors",
    "reload_watch",
    "reload_interval",
)


_MAX_ITEMS = 60  # an audit record's lists and maps hold 64 at most


def _bounded(items: list[str]) -> list[str]:
    if len(items) <= _MAX_ITEMS:
        return items
    return [*items[: _MAX_ITEMS - 1], f"... and {len(items) - _MAX_ITEMS + 1} more"]


def _key_id(config: BrokerConfig) -> str | None:
    """The pinned signing key's id (what serials are counted per), or None if unsigned."""
    if config.signing_key is None:
        return None
    from sealstore.enclave.broker.bundle import key_id

    return key_id(config.signing_key)


def _digests(paths: list[Path]) -> dict[str, str | None]:
    from sealstore.enclave.broker.config import _digest_of

    return {str(p): _digest_of(p) for p in paths}


def changes(old: BrokerConfig, new: BrokerConfig) -> list[str]:
    """What differs between two configs, by name (never a value: tokens are secrets)."""
    out: list[str] = []

    def diff(where: str, a: dict[str, Any], b: dict[str, Any]) -> None:
        for name in sorted(a.keys() | b.keys()):
            if name not in a:
                out.append(f"{where}.{name} added")
            elif name not in b:
                out.append(f"{where}.{name} removed")
            elif a[name] != b[name]:
                out.append(f"{where}.{name}")

    diff("identities", old.identities, new.identities)
    for t in sorted(old.tenants.keys() | new.tenants.keys()):
        a, b = old.tenants.get(t), new.tenants.get(t)
        if a is None or b is None:
            out.append(f"tenants.{t} {'added' if a is None else 'removed'}")
            continue
        if a.keys != b.keys:
            out.append(f"tenants.{t}.keys")
        diff(f"tenants.{t}.artifacts", a.artifacts, b.artifacts)
    out += [f for f in _RELOADABLE if getattr(old, f) != getattr(new, f)]
    return out


class Reloader:
    """Reloads *broker*'s config with *load* (``BrokerConfig.load`` and the serve overrides).

    Args:
        broker: the running broker.
        load: makes a new config from the files (raises ``FormatError``).
    """

    def __init__(self, broker: Broker, load: Callable[[], BrokerConfig]) -> None:
        self.broker = broker
        self._load = load
        self._lock = threading.Lock()  # one reload at a time (SIGHUP and the watcher)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_force = _digests(broker.config.watched())  # the files as loaded
        self._tried = self._in_force  # the files as last loaded or refused
        self._last = self._tried  # the files at the last poll

    # -- one reload -------------------------------------------------------------
    def reload(self, trigger: str) -> str:
        """Load the files and put the new config in force if it passes every check.

        Returns:
            ``"applied"``, ``"refused"`` (the old config stays in force) or
            ``"unchanged"`` (the files hold what is in force).
        """
        with self._lock:
            old = self.broker.config
            before = _digests(old.watched())
            try:
                new = self._load()
                self._check(old, new)
            except FormatError as exc:
                self._tried = before
                return self._refused(trigger, old, str(exc))
            self._tried = _digests(new.watched())
            if (new.digest, new.bundle_serial) == (old.digest, old.bundle_serial):
                if trigger == "sighup":  # an operator asked: say that nothing changed
                    self._count(trigger, "unchanged")
                    log.info("config reload (%s): unchanged (%s)", trigger, old.digest[:16])
                return "unchanged"
            detail = {
                "trigger": trigger,
                "outcome": "applied",
                "old": old.digest,
                "new": new.digest,
                "serial": new.bundle_serial,
                "key": _key_id(new),
                "changed": _bounded(changes(old, new)),
                **self._files(old, new),
            }
            try:
                self.broker._record(
                    "config.reload", "-", None, None, "ok", None, None, required=True, **detail
                )
            except Exception as exc:
                self.broker.metrics.inc("sealstore_broker_audit_failures_total")
                return self._refused(
                    trigger, old, f"the audit log cannot record it: {exc}", new=new, record=False
                )
            self.broker.replace_config(new)
            self._in_force = self._tried
            self._count(trigger, "applied")
            log.warning(
                "config reloaded (%s): %s -> %s; changed: %s",
                trigger,
                old.digest[:16],
                new.digest[:16],
                ", ".join(detail["changed"]) or "files only",
            )
            for warning in new.warnings:
                log.warning("config: %s", warning)
            return "applied"

    def _check(self, old: BrokerConfig, new: BrokerConfig) -> None:
        for name in RESTART_ONLY:
            if getattr(old, name) != getattr(new, name):
                raise FormatError(
                    f"broker config {new.path}: {name} changes only on a restart; nothing reloaded"
                )
        if (
            old.bundle_serial is not None
            and new.bundle_serial is not None
            and (
                (new.digest != old.digest and new.bundle_serial <= old.bundle_serial)
                or new.bundle_serial < old.bundle_serial
            )
        ):
            raise FormatError(
                f"bundle signature {new.signature_path}: serial {new.bundle_serial} is not "
                f"above the running {old.bundle_serial} (an older bundle replayed?)"
            )

    def _refused(
        self,
        trigger: str,
        old: BrokerConfig,
        why: str,
        *,
        new: BrokerConfig | None = None,
        record: bool = True,
    ) -> str:
        self._count(trigger, "refused")
        log.error(
            "config reload (%s) refused; %s stays in force: %s", trigger, old.digest[:16], why
        )
        # An alert too: whoever rolled the change believes it is in force, and a
        # badly signed bundle may be someone else's. (Not _alert: the record
        # below is the audit record.)
        self.broker.alerts.fire(
            "config-refused", trigger=trigger, reason=why[:500], in_force=old.digest
        )
        if record:
            now = _digests(old.watched())
            moved = [p for p, d in self._in_force.items() if now.get(p) != d][:_MAX_ITEMS]
            self.broker._record(
                "config.reload",
                "-",
                None,
                None,
                "denied",
                "config-refused",
                why[:500],
                trigger=trigger,
                outcome="refused",
                old=old.digest,
                new=new.digest if new else None,
                old_files={self._name(old, p): self._in_force[p] for p in moved},
                new_files={self._name(old, p): now.get(p) for p in moved},
            )
        return "refused"

    @staticmethod
    def _name(config: BrokerConfig, p: str) -> str:
        """*p* as the audit record names it: relative to the config's folder if inside it."""
        path, base = Path(p), config.path.parent
        return path.relative_to(base).as_posix() if path.is_relative_to(base) else p

    def _files(self, old: BrokerConfig, new: BrokerConfig) -> dict[str, dict[str, str | None]]:
        """The source files whose digest changed: ``old_files`` and ``new_files``, name ->
        SHA-256 (None: not a source on that side)."""
        moved = [
            p
            for p in sorted(old.sources.keys() | new.sources.keys())
            if old.sources.get(p) != new.sources.get(p)
        ][:_MAX_ITEMS]
        return {
            "old_files": {self._name(new, p): old.sources.get(p) for p in moved},
            "new_files": {self._name(new, p): new.sources.get(p) for p in moved},
        }

    def _count(self, trigger: str, outcome: str) -> None:
        self.broker.metrics.inc(
            "sealstore_broker_config_reloads_total", {"trigger": trigger, "outcome": outcome}
        )

    # -- watching ---------------------------------------------------------------
    def poll(self) -> str | None:
        """Look at the files once; reload if they changed and agree with the last look.

        Returns:
            the reload's outcome, or None if none was tried.
        """
        now = _digests(self.broker.config.watched())
        stable, self._last = now == self._last, now
        if now == self._tried or not stable:
            return None
        return self.reload("watch")

    def request(self) -> None:
        """Ask for a reload now (what SIGHUP does; safe from a signal handler)."""
        self._wake.set()

    def start(self) -> None:
        """Watch the files in a thread (if ``reload.watch``) and serve ``request``."""
        self._thread = threading.Thread(target=self._run, name="broker-reload", daemon=True)
        self._thread.start()

    def install_sighup(self) -> Callable[[], None]:
        """SIGHUP asks for a reload (main thread only; uvicorn leaves SIGHUP alone).

        Returns:
            A function that puts the previous handler and wakeup fd back.
        """
        old = signal.signal(signal.SIGHUP, lambda _sig, _frame: self.request())
        # The CLI's termination guard (cli/main.py) watches a wakeup fd and sends a
        # caught SIGHUP again until *its* handler has run, which here it never
        # does: a reload every 0.2 s. A server's main thread sits in the event
        # loop's select, which a signal interrupts anyway; the guard is not needed.
        fd = signal.set_wakeup_fd(-1)

        def restore() -> None:
            signal.set_wakeup_fd(fd)
            signal.signal(signal.SIGHUP, old)

        return restore

    def stop(self) -> None:
        """Stop the watcher thread (waits up to 10 s for a reload under way)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            asked = self._wake.wait(self.broker.config.reload_interval)
            if self._stop.is_set():
                return
            try:
                if asked:
                    self._wake.clear()
                    self.reload("sighup")
                elif self.broker.config.reload_watch:
                    self.poll()
            except Exception:  # a bug here must not stop the watcher, nor the broker
                log.exception("config reload failed; the config in force stays")

    def record_start(self) -> None:
        """Check the starting bundle against the audit log, then record the start.

        Refused, as a reload would refuse it: a signed bundle whose serial is
        below one this key's bundles already had in force (on any replica
        writing to this audit log), or equal to it with other files (an older
        or another bundle put back). Refused too, unless the config says
        ``allow_bundle_key_change`` (``serve --allow-bundle-key-change``, an
        override recorded in the audit log): a start unsigned, or under
        another key, when the last config in force was signed -- else deleting
        ``signing:`` from the config and restarting would undo signing.

        Raises:
            FormatError: one of those; nothing is recorded.
        """
        c = self.broker.config
        key = _key_id(c)
        last = self._last_key()
        override = None
        if last is not None and last != key:
            now = "unsigned" if key is None else f"signed by key {key}"
            if not c.allow_bundle_key_change:
                raise FormatError(
                    f"broker config {c.path}: the audit log shows bundles signed by key {last} "
                    f"in force, and this config is {now}; refused (start with "
                    "--allow-bundle-key-change to accept it, which is audited)"
                )
            override = "bundle-key-change"
            log.warning(
                "starting %s although key %s signed the last config in force: "
                "--allow-bundle-key-change (audited)",
                now,
                last,
            )
        if c.bundle_serial is not None:
            highest, digests = self._highest_serial(key)
            if highest is not None and (
                c.bundle_serial < highest
                or (c.bundle_serial == highest and c.digest not in digests)
            ):
                raise FormatError(
                    f"bundle signature {c.signature_path}: serial {c.bundle_serial} is not above "
                    f"{highest}, already in force by the audit log with other files (an older "
                    "bundle put back?)"
                )
        extra: dict[str, Any] = {}
        if override is not None:
            extra = {"override": override, "previous_key": last}
        self.broker._record(
            "config.load",
            "-",
            None,
            None,
            "ok",
            None,
            None,
            digest=c.digest,
            serial=c.bundle_serial,
            key=key,
            signed=c.signing_key is not None,
            **extra,
        )

    def _configs_in_force(self) -> list[dict[str, Any]]:
        """The details of the audit log's configs in force (loads, applied reloads), in order."""
        from sealstore.audit import read_records

        out = []
        for r in read_records(self.broker.audit.storage):
            d = r.get("detail")
            if r.get("action") not in ("config.load", "config.reload") or not isinstance(d, dict):
                continue
            if d.get("outcome", "applied") == "applied":
                out.append(d)
        return out

    def _last_key(self) -> str | None:
        """The signing key id of the last config the audit log records in force (None: unsigned)."""
        records = self._configs_in_force()
        key = records[-1].get("key") if records else None
        return key if isinstance(key, str) else None

    def _highest_serial(self, key: str | None) -> tuple[int | None, set[str]]:
        """The highest bundle serial of *key* the audit log records in force, if any, and
        the config digests recorded with it."""
        best: int | None = None
        digests: set[str] = set()
        for d in self._configs_in_force():
            if d.get("key") != key:
                continue
            serial = d.get("serial")
            if not isinstance(serial, int) or isinstance(serial, bool):
                continue
            digest = d.get("digest", d.get("new"))
            if best is None or serial > best:
                best, digests = serial, set()
            if serial == best and isinstance(digest, str):
                digests.add(digest)
        return best, digests
