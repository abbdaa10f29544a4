"""The broker's shared state: challenges, lockouts, throttles, rate windows.

One broker replica may keep this in its own memory (:class:`MemoryState`, the
default). Several replicas behind a load balancer may not: a caller's challenge
is issued by one and redeemed at another, so they must agree that a nonce is
used once, that an identity is locked out or throttled, that a tenant is in
lockdown, and on the failure and release counts the limits are computed from.
:class:`RedisState` keeps all of it in one Redis server, each check-and-change
done atomically there (a Lua script), so two replicas racing for one nonce give
it to exactly one caller.

The state is a cache of what the audit log records, not the record itself:
the state's *epoch* marker, set when the broker put the recorded lockdowns
and lockouts into it, is missing from a state that was reset (a Redis that
came back empty, a new server, this process's memory at start). A broker
that finds it missing refuses until it has put them back (:meth:`reassert`).

Limitations: one Redis primary, not Redis Cluster (a script's keys span slots).
Replication to a Redis replica is asynchronous: after a failover a nonce taken
just before it may be taken again, and a fresh lockout may be gone. Expiry is
judged by the replicas' clocks (and Redis's, for TTLs): keep them in sync.
"""

from __future__ import annotations

import heapq
import json
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from sealstore.errors import BackendError

__all__ = [
    "MemoryState",
    "RedisState",
    "State",
    "StateFull",
    "StateReset",
    "StateUnavailable",
    "open_state",
]

Clock = Callable[[], float]


class StateFull(Exception):
    """Too many challenges outstanding: *scope* is ``"total"`` or ``"identity"``."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"too many challenges outstanding ({scope})")
        self.scope = scope


class StateUnavailable(BackendError):
    """The shared state cannot be reached or failed (Redis down, a timeout)."""


class StateReset(Exception):
    """The state has no epoch: it was reset (or is new) and the recorded
    lockdowns and lockouts have not been put back into it yet."""


class State(Protocol):
    """What a broker shares with its other replicas. Every method is atomic."""

    def add_challenge(
        self,
        nonce: bytes,
        identity: str,
        record: dict[str, Any],
        expires: float,
        *,
        max_total: int,
        max_per_identity: int,
    ) -> None:
        """Keep *record* (JSON-able) for *nonce*, issued to *identity*, until *expires*.

        Expired challenges are purged first and never count.

        Raises:
            StateFull: ``"total"`` if *max_total* are outstanding, else
                ``"identity"`` if *identity* has *max_per_identity*.
            TypeError: *record* is not JSON-able.
            ValueError: *nonce* is already outstanding.
        """

    def take_challenge(self, nonce: bytes, identity: str) -> dict[str, Any] | None:
        """The record of *nonce* with ``"identity"`` and ``"expires"`` added.

        Returns:
            None if unknown, expired or taken. If *identity* owns it, it is
            removed (of concurrent takers exactly one gets it); another
            identity gets it back but it stays, for the caller to refuse.
        """

    def lock_out(self, identity: str, seconds: float, reason: str) -> bool:
        """Lock *identity* out for *seconds*; False (and unchanged) if already locked."""

    def lockout(self, identity: str) -> str | None:
        """The reason *identity* is locked out, or None."""

    def lift_lockout(self, identity: str) -> bool:
        """End a lockout and forget the identity's failures; True if one was lifted."""

    def lockouts(self) -> dict[str, str]:
        """Every identity locked out now, with its reason."""

    def add_failure(self, identity: str, now: float, window: float) -> int:
        """Record a failed attestation at *now*; return the failures in ``(now - window, now]``."""

    def count_release(
        self, identity: str, now: float, bucket: float, history: int
    ) -> tuple[int, float]:
        """Count one release in bucket ``now // bucket``.

        Returns:
            The count in that bucket, this one included, and the mean count of
            the *history* buckets before it (a missing bucket counts 0).
        """

    def throttle(self, identity: str, seconds: float, reason: str) -> bool:
        """Throttle *identity* for *seconds*; False (and unchanged) if already throttled."""

    def throttled(self, identity: str) -> str | None:
        """The reason *identity* is throttled, or None."""

    def lift_throttle(self, identity: str) -> bool:
        """End a throttle; True if one was lifted."""

    def set_lockdown(self, scope: str, reason: str) -> None:
        """Lock down *scope* (a tenant, or ``"*"`` for all) until lifted."""

    def lift_lockdown(self, scope: str) -> bool:
        """End the lockdown of *scope*; True if there was one."""

    def lockdowns(self) -> dict[str, str]:
        """Every lockdown in force: scope -> reason."""

    def standing(
        self, identity: str, *, require_epoch: bool = False
    ) -> tuple[dict[str, str], str | None, str | None]:
        """``(lockdowns(), lockout(identity), throttled(identity))`` in one read.

        Every challenge and release asks all three: one round trip, not three.

        Raises:
            StateReset: *require_epoch* and the state has no epoch (checked in
                the same read).
        """

    def epoch(self) -> str | None:
        """The marker :meth:`reassert` set, or None in a state that was reset."""

    def reassert(
        self, lockdowns: dict[str, str], lockouts: dict[str, tuple[float, str]], epoch: str
    ) -> bool:
        """Put recorded incident-response state back into a state that has no epoch.

        Args:
            lockdowns: scope -> reason.
            lockouts: identity -> (end, epoch seconds; reason); ended ones are skipped.
            epoch: the state's new epoch, set with them.

        Returns:
            False (and nothing changed) if the state has an epoch already:
            another replica got there first.
        """

    def swap_evidence(self, machine: str, fingerprint: str) -> str | None:
        """Remember *fingerprint* for *machine*; return the one before (None at first)."""

    def ping(self) -> None:
        """Raises: BackendError if the state cannot be reached."""

    def close(self) -> None:
        """Release connections; the object is unusable afterwards."""


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, not {value!r}")


def _check_rate(bucket: float, history: int) -> None:
    _positive(bucket=bucket)
    if history < 0:
        raise ValueError(f"history must not be negative, not {history!r}")


def _with_owner(record: dict[str, Any], identity: str, expires: float) -> str:
    # Serialised on the way in by both backends, so a record that Redis could
    # not hold fails in memory too, and a caller never shares a mutable dict.
    return json.dumps({**record, "identity": identity, "expires": expires})


class MemoryState:
    """:class:`State` in this process's memory, for a single broker replica.

    Args:
        clock: seconds since the epoch, for every expiry (tests move it forward).
    """

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._challenges: dict[bytes, tuple[str, float, str]] = {}
        # Expiries differ per challenge, so a heap finds the expired; entries
        # of taken challenges stay in it and are skipped when they surface.
        self._expiry: list[tuple[float, bytes]] = []
        self._outstanding: dict[str, int] = {}
        self._lockouts: dict[str, tuple[float, str]] = {}
        self._throttles: dict[str, tuple[float, str]] = {}
        self._failures: dict[str, list[float]] = {}
        self._releases: dict[str, dict[int, int]] = {}
        self._lockdowns: dict[str, str] = {}
        self._evidence: dict[str, str] = {}
        self._epoch: str | None = None

    def _drop(self, nonce: bytes) -> None:
        identity = self._challenges.pop(nonce)[0]
        left = self._outstanding[identity] - 1
        if left:
            self._outstanding[identity] = left
        else:
            del self._outstanding[identity]

    def add_challenge(
        self,
        nonce: bytes,
        identity: str,
        record: dict[str, Any],
        expires: float,
        *,
        max_total: int,
        max_per_identity: int,
    ) -> None:
        stored = _with_owner(record, identity, expires)
        with self._lock:
            now = self._clock()
            while self._expiry and self._expiry[0][0] <= now:
                when, old = heapq.heappop(self._expiry)
                if old in self._challenges and self._challenges[old][1] == when:
                    self._drop(old)
            if len(self._challenges) >= max_total:
                raise StateFull("total")
            if self._outstanding.get(identity, 0) >= max_per_identity:
                raise StateFull("identity")
            if nonce in self._challenges:
                raise ValueError("this nonce is already outstanding")
            self._challenges[nonce] = (identity, expires, stored)
            heapq.heappush(self._expiry, (expires, nonce))
            self._outstanding[identity] = self._outstanding.get(identity, 0) + 1

    def take_challenge(self, nonce: bytes, identity: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._challenges.get(nonce)
            if found is None or found[1] <= self._clock():
                return None
            if found[0] == identity:
                self._drop(nonce)
        return json.loads(found[2])  # type: ignore[no-any-return]

    def _set_once(
        self, table: dict[str, tuple[float, str]], key: str, secs: float, why: str
    ) -> bool:
        _positive(seconds=secs)
        with self._lock:
            now = self._clock()
            if key in table and table[key][0] > now:
                return False
            table[key] = (now + secs, why)
            return True

    def _current(self, table: dict[str, tuple[float, str]], key: str) -> str | None:
        with self._lock:
            until, why = table.get(key, (0.0, ""))
            return why if until > self._clock() else None

    def lock_out(self, identity: str, seconds: float, reason: str) -> bool:
        return self._set_once(self._lockouts, identity, seconds, reason)

    def lockout(self, identity: str) -> str | None:
        return self._current(self._lockouts, identity)

    def lift_lockout(self, identity: str) -> bool:
        with self._lock:
            self._failures.pop(identity, None)
            found = self._lockouts.pop(identity, None)
            return found is not None and found[0] > self._clock()

    def lockouts(self) -> dict[str, str]:
        with self._lock:
            now = self._clock()
            for gone in [i for i, (until, _) in self._lockouts.items() if until <= now]:
                del self._lockouts[gone]
            return {i: why for i, (_, why) in self._lockouts.items()}

    def add_failure(self, identity: str, now: float, window: float) -> int:
        _positive(window=window)
        with self._lock:
            kept = [t for t in self._failures.get(identity, []) if t > now - window]
            kept.append(now)
            self._failures[identity] = kept
            return len(kept)

    def count_release(
        self, identity: str, now: float, bucket: float, history: int
    ) -> tuple[int, float]:
        _check_rate(bucket, history)
        current = int(now // bucket)
        with self._lock:
            counts = self._releases.setdefault(identity, {})
            for old in [b for b in counts if b < current - history]:
                del counts[old]
            counts[current] = counts.get(current, 0) + 1
            past = sum(counts.get(current - i, 0) for i in range(1, history + 1))
            return counts[current], (past / history if history else 0.0)

    def throttle(self, identity: str, seconds: float, reason: str) -> bool:
        return self._set_once(self._throttles, identity, seconds, reason)

    def throttled(self, identity: str) -> str | None:
        return self._current(self._throttles, identity)

    def lift_throttle(self, identity: str) -> bool:
        with self._lock:
            found = self._throttles.pop(identity, None)
            return found is not None and found[0] > self._clock()

    def set_lockdown(self, scope: str, reason: str) -> None:
        with self._lock:
            self._lockdowns[scope] = reason

    def lift_lockdown(self, scope: str) -> bool:
        with self._lock:
            return self._lockdowns.pop(scope, None) is not None

    def lockdowns(self) -> dict[str, str]:
        with self._lock:
            return dict(self._lockdowns)

    def standing(
        self, identity: str, *, require_epoch: bool = False
    ) -> tuple[dict[str, str], str | None, str | None]:
        if require_epoch and self._epoch is None:
            raise StateReset
        return self.lockdowns(), self.lockout(identity), self.throttled(identity)

    def epoch(self) -> str | None:
        return self._epoch

    def reassert(
        self, lockdowns: dict[str, str], lockouts: dict[str, tuple[float, str]], epoch: str
    ) -> bool:
        with self._lock:
            if self._epoch is not None:
                return False
            now = self._clock()
            self._lockdowns.update(lockdowns)
            for identity, (until, why) in lockouts.items():
                if until > now:
                    self._lockouts[identity] = (until, why)
            self._epoch = epoch
            return True

    def swap_evidence(self, machine: str, fingerprint: str) -> str | None:
        with self._lock:
            before = self._evidence.get(machine)
            self._evidence[machine] = fingerprint
            return before

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass


# Scores are expiry times (epoch seconds): purging the expired is one
# ZREMRANGEBYSCORE, and a count is one ZCARD, in the same script as the add.
_ADD = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 'total' end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 'identity' end
if redis.call('EXISTS', KEYS[3]) == 1 then return 'exists' end
redis.call('HSET', KEYS[3], 'identity', ARGV[7], 'expires', ARGV[2], 'record', ARGV[8])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[6])
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[3])
  end
end
return 'ok'
"""
_TAKE = """
local got = redis.call('HMGET', KEYS[1], 'identity', 'expires', 'record')
if not got[1] or tonumber(got[2]) <= tonumber(ARGV[1]) then return false end
if got[1] == ARGV[2] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[3])
end
return got[3]
"""
_FAIL = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return redis.call('ZCARD', KEYS[1])
"""
_COUNT = """
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
local past = 0
for i = 2, #KEYS do past = past + (tonumber(redis.call('GET', KEYS[i])) or 0) end
return {n, past}
"""
# The index (identity scored by the lockout's end) is what lockouts() reads
# instead of a SCAN over a server that may hold much else.
_LOCK = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
return 1
"""


# One script, so two replicas that both find the epoch missing put the record
# back once, and no reader sees the epoch before the lockdowns it vouches for.
# KEYS: epoch, lockdown hash, lockout index, then one lockout key per lockout;
# ARGV: epoch, n lockdowns, n (scope, reason) pairs, then per lockout
# (reason, ms left, identity, end).
_REASSERT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[2])
for i = 1, n do
  redis.call('HSET', KEYS[2], ARGV[1 + 2 * i], ARGV[2 + 2 * i])
end
local j = 3 + 2 * n
for i = 4, #KEYS do
  redis.call('SET', KEYS[i], ARGV[j], 'PX', ARGV[j + 1])
  redis.call('ZADD', KEYS[3], ARGV[j + 3], ARGV[j + 2])
  j = j + 4
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisState:
    """:class:`State` in one Redis server, shared by every broker replica.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` (redis-py's URL forms).
        prefix: the start of every key, so one server can hold several brokers.
        clock: seconds since the epoch, for the expiries it compares.

    Every method raises :class:`StateUnavailable` (a :class:`BackendError`) if
    Redis fails or cannot be reached.
    """

    def __init__(self, url: str, *, prefix: str = "sealstore:", clock: Clock = time.time) -> None:
        import redis

        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        try:
            host += "" if parts.port is None else f":{parts.port}"
        except ValueError:
            raise ValueError(f"broker state {parts.scheme}://{host}: bad port") from None
        # Where, for errors and repr: no user, password or query (it may hold one).
        self.url = f"{parts.scheme}://{host}{parts.path}"
        self._secrets = [parts.password, *parse_qs(parts.query).get("password", [])]
        self._prefix = prefix
        self._clock = clock
        # Timeouts are given because older clients wait forever on a hung
        # server; options in the URL still override them.
        self._r = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=5.0
        )
        self._error = redis.exceptions.RedisError
        self._add, self._take, self._fail, self._count, self._set_lock, self._reassert = (
            self._r.register_script(s) for s in (_ADD, _TAKE, _FAIL, _COUNT, _LOCK, _REASSERT)
        )

    def __repr__(self) -> str:
        return f"RedisState({self.url!r}, prefix={self._prefix!r})"

    def _k(self, *parts: str) -> str:
        # The identity (free text) comes last, so no two key shapes can meet.
        return self._prefix + ":".join(parts)

    @contextmanager
    def _talk(self, what: str) -> Iterator[None]:
        try:
            yield
        except self._error as exc:
            text = " ".join(str(exc).split())
            for secret in filter(None, self._secrets):
                text = text.replace(secret, "***")
            name = type(exc).__name__
            raise StateUnavailable(f"redis at {self.url}: {what} failed: {name}: {text}") from exc

    def add_challenge(
        self,
        nonce: bytes,
        identity: str,
        record: dict[str, Any],
        expires: float,
        *,
        max_total: int,
        max_per_identity: int,
    ) -> None:
        stored = _with_owner(record, identity, expires)
        now = self._clock()
        keys = [self._k("ch-all"), self._k("ch-id", identity), self._k("ch", nonce.hex())]
        args = [repr(now), repr(expires), _ms(expires - now), max_total, max_per_identity]
        with self._talk("add_challenge"):
            said = self._add(keys=keys, args=[*args, nonce.hex(), identity, stored])
        if said == "exists":
            raise ValueError("this nonce is already outstanding")
        if said != "ok":
            raise StateFull(said)

    def take_challenge(self, nonce: bytes, identity: str) -> dict[str, Any] | None:
        keys = [self._k("ch", nonce.hex()), self._k("ch-all"), self._k("ch-id", identity)]
        with self._talk("take_challenge"):
            got = self._take(keys=keys, args=[repr(self._clock()), identity, nonce.hex()])
        return None if got is None else json.loads(got)

    def lock_out(self, identity: str, seconds: float, reason: str) -> bool:
        _positive(seconds=seconds)
        now = self._clock()
        keys = [self._k("lock", identity), self._k("lock-index")]
        args = [reason, _ms(seconds), identity, repr(now + seconds), repr(now)]
        with self._talk("lock_out"):
            return bool(self._set_lock(keys=keys, args=args))

    def lockout(self, identity: str) -> str | None:
        with self._talk("lockout"):
            return self._r.get(self._k("lock", identity))  # type: ignore[return-value]

    def lift_lockout(self, identity: str) -> bool:
        with self._talk("lift_lockout"), self._r.pipeline(transaction=True) as tx:
            tx.delete(self._k("lock", identity))
            tx.zrem(self._k("lock-index"), identity)
            tx.delete(self._k("fail", identity))
            return bool(tx.execute()[0])

    def lockouts(self) -> dict[str, str]:
        with self._talk("lockouts"):
            names = self._r.zrangebyscore(self._k("lock-index"), f"({self._clock()!r}", "+inf")
            if not names:
                return {}
            reasons = self._r.mget([self._k("lock", n) for n in names])
        # A lockout lifted between the two reads comes back None: not in force.
        return {n: r for n, r in zip(names, reasons, strict=True) if r is not None}

    def add_failure(self, identity: str, now: float, window: float) -> int:
        _positive(window=window)
        # A random tail: two failures at the same instant are two members.
        member = f"{now!r}:{secrets.token_hex(8)}"
        args = [repr(now), repr(now - window), member, _ms(window)]
        with self._talk("add_failure"):
            return int(self._fail(keys=[self._k("fail", identity)], args=args))

    def count_release(
        self, identity: str, now: float, bucket: float, history: int
    ) -> tuple[int, float]:
        _check_rate(bucket, history)
        current = int(now // bucket)
        keys = [self._k("rel", str(current - i), identity) for i in range(history + 1)]
        with self._talk("count_release"):
            count, past = self._count(keys=keys, args=[_ms((history + 2) * bucket)])
        return int(count), (int(past) / history if history else 0.0)

    def throttle(self, identity: str, seconds: float, reason: str) -> bool:
        _positive(seconds=seconds)
        with self._talk("throttle"):
            return bool(
                self._r.set(self._k("throttle", identity), reason, nx=True, px=_ms(seconds))
            )

    def throttled(self, identity: str) -> str | None:
        with self._talk("throttled"):
            return self._r.get(self._k("throttle", identity))  # type: ignore[return-value]

    def lift_throttle(self, identity: str) -> bool:
        with self._talk("lift_throttle"):
            return bool(self._r.delete(self._k("throttle", identity)))

    def set_lockdown(self, scope: str, reason: str) -> None:
        with self._talk("set_lockdown"):
            self._r.hset(self._k("lockdown"), scope, reason)

    def lift_lockdown(self, scope: str) -> bool:
        with self._talk("lift_lockdown"):
            return bool(self._r.hdel(self._k("lockdown"), scope))

    def lockdowns(self) -> dict[str, str]:
        with self._talk("lockdowns"):
            return self._r.hgetall(self._k("lockdown"))  # type: ignore[return-value]

    def standing(
        self, identity: str, *, require_epoch: bool = False
    ) -> tuple[dict[str, str], str | None, str | None]:
        with self._talk("standing"), self._r.pipeline(transaction=False) as p:
            p.hgetall(self._k("lockdown"))
            p.get(self._k("lock", identity))
            p.get(self._k("throttle", identity))
            p.exists(self._k("epoch"))
            downs, locked, throttled, has_epoch = p.execute()
        if require_epoch and not has_epoch:
            raise StateReset
        return downs, locked, throttled

    def epoch(self) -> str | None:
        with self._talk("epoch"):
            return self._r.get(self._k("epoch"))  # type: ignore[return-value]

    def reassert(
        self, lockdowns: dict[str, str], lockouts: dict[str, tuple[float, str]], epoch: str
    ) -> bool:
        now = self._clock()
        live = {i: (until, why) for i, (until, why) in lockouts.items() if until > now}
        keys = [self._k("epoch"), self._k("lockdown"), self._k("lock-index")]
        keys += [self._k("lock", i) for i in live]
        args: list[Any] = [epoch, len(lockdowns)]
        for scope, why in lockdowns.items():
            args += [scope, why]
        for identity, (until, why) in live.items():
            args += [why, _ms(until - now), identity, repr(until)]
        with self._talk("reassert"):
            return bool(self._reassert(keys=keys, args=args))

    def swap_evidence(self, machine: str, fingerprint: str) -> str | None:
        with self._talk("swap_evidence"):
            return self._r.set(self._k("evidence", machine), fingerprint, get=True)  # type: ignore[return-value]

    def ping(self) -> None:
        with self._talk("ping"):
            self._r.ping()

    def close(self) -> None:
        self._r.close()


def open_state(url: str | None, *, prefix: str = "sealstore:", clock: Clock = time.time) -> State:
    """The state a broker's config names.

    Args:
        url: None or ``memory:`` for this process's memory; ``redis://``,
            ``rediss://`` or ``unix://`` for a Redis server.
        prefix: the Redis key prefix (ignored in memory).
        clock: seconds since the epoch.

    Raises:
        ValueError: any other URL.
    """
    if url is None or url == "memory:":
        return MemoryState(clock=clock)
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        return RedisState(url, prefix=prefix, clock=clock)
    # The scheme only: the rest of a URL may carry a password.
    raise ValueError(
        f"broker state URL scheme {scheme!r} is not one of memory:, redis://, rediss://, unix://"
    )
