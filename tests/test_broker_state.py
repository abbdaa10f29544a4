"""The broker's shared state: one suite for both backends, then Redis's own cases.

MemoryState runs on a fake clock; RedisState on the real server of
``scripts/services.sh`` (a fresh key prefix per test) and real time, so its
expiry tests sleep a fraction of a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from uuid import uuid4

import pytest
import redis

from sealstore.enclave.broker.state import (
    MemoryState,
    RedisState,
    State,
    StateFull,
    open_state,
)
from sealstore.errors import BackendError

TTL = 0.2  # the short expiry the tests wait out
LIMITS = {"max_total": 100, "max_per_identity": 100}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Backend:
    state: State
    now: Callable[[], float]
    wait: Callable[[float], None]  # let this many seconds pass


def _prefix() -> str:
    return f"t-{uuid4().hex}:"


def _forget(url: str, prefix: str) -> None:
    """Delete a test's keys: the server lives for the whole session."""
    with redis.Redis.from_url(url) as r:
        keys = list(r.scan_iter(match=f"{prefix}*"))
        if keys:
            r.delete(*keys)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = _prefix()
    yield prefix
    _forget(redis_url, prefix)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()
        yield Backend(MemoryState(clock=clock), clock, clock.advance)
        return
    url = request.getfixturevalue("redis_url")
    state = RedisState(url, prefix=request.getfixturevalue("redis_prefix"))
    try:
        yield Backend(state, time.time, time.sleep)
    finally:
        state.close()


def _nonce() -> bytes:
    return uuid4().bytes + uuid4().bytes


# -- challenges ---------------------------------------------------------------
def test_take_is_single_use(backend: Backend) -> None:
    s, nonce = backend.state, _nonce()
    expires = backend.now() + 60
    s.add_challenge(nonce, "alice", {"tenant": "acme", "artifact": "m"}, expires, **LIMITS)
    got = s.take_challenge(nonce, "alice")
    assert got == {"tenant": "acme", "artifact": "m", "identity": "alice", "expires": expires}
    assert s.take_challenge(nonce, "alice") is None


def test_unknown_nonce(backend: Backend) -> None:
    assert backend.state.take_challenge(_nonce(), "alice") is None


def test_another_identity_does_not_consume(backend: Backend) -> None:
    s, nonce = backend.state, _nonce()
    s.add_challenge(nonce, "alice", {"n": 1}, backend.now() + 60, **LIMITS)
    for _ in range(2):
        seen = s.take_challenge(nonce, "mallory")
        assert seen is not None and seen["identity"] == "alice"
    assert s.take_challenge(nonce, "alice") is not None
    assert s.take_challenge(nonce, "mallory") is None


def test_expired_is_not_returned(backend: Backend) -> None:
    s, nonce = backend.state, _nonce()
    s.add_challenge(nonce, "alice", {}, backend.now() + TTL, **LIMITS)
    backend.wait(TTL + 0.05)
    assert s.take_challenge(nonce, "mallory") is None
    assert s.take_challenge(nonce, "alice") is None


def test_full_in_total_then_freed_by_a_take(backend: Backend) -> None:
    s, expires = backend.state, backend.now() + 60
    limits = {"max_total": 2, "max_per_identity": 5}
    first = _nonce()
    s.add_challenge(first, "alice", {}, expires, **limits)
    s.add_challenge(_nonce(), "bob", {}, expires, **limits)
    with pytest.raises(StateFull) as info:
        s.add_challenge(_nonce(), "carol", {}, expires, **limits)
    assert info.value.scope == "total"
    # Another identity's look does not free the slot; the owner's take does.
    assert s.take_challenge(first, "bob") is not None
    with pytest.raises(StateFull):
        s.add_challenge(_nonce(), "carol", {}, expires, **limits)
    assert s.take_challenge(first, "alice") is not None
    s.add_challenge(_nonce(), "carol", {}, expires, **limits)


def test_full_for_one_identity_then_freed_by_a_take(backend: Backend) -> None:
    s, expires = backend.state, backend.now() + 60
    limits = {"max_total": 10, "max_per_identity": 2}
    nonces = [_nonce(), _nonce()]
    for n in nonces:
        s.add_challenge(n, "alice", {}, expires, **limits)
    with pytest.raises(StateFull) as info:
        s.add_challenge(_nonce(), "alice", {}, expires, **limits)
    assert info.value.scope == "identity"
    s.add_challenge(_nonce(), "bob", {}, expires, **limits)
    assert s.take_challenge(nonces[0], "alice") is not None
    s.add_challenge(_nonce(), "alice", {}, expires, **limits)


def test_total_is_checked_before_identity(backend: Backend) -> None:
    s, expires = backend.state, backend.now() + 60
    s.add_challenge(_nonce(), "alice", {}, expires, max_total=1, max_per_identity=1)
    with pytest.raises(StateFull) as info:
        s.add_challenge(_nonce(), "alice", {}, expires, max_total=1, max_per_identity=1)
    assert info.value.scope == "total"


def test_expired_challenges_do_not_count(backend: Backend) -> None:
    s = backend.state
    s.add_challenge(_nonce(), "alice", {}, backend.now() + TTL, max_total=1, max_per_identity=1)
    backend.wait(TTL + 0.05)
    s.add_challenge(_nonce(), "alice", {}, backend.now() + 60, max_total=1, max_per_identity=1)


def test_record_must_be_json(backend: Backend) -> None:
    with pytest.raises(TypeError):
        backend.state.add_challenge(_nonce(), "alice", {"raw": b"x"}, backend.now() + 60, **LIMITS)


def test_a_nonce_is_added_once(backend: Backend) -> None:
    s, nonce = backend.state, _nonce()
    s.add_challenge(nonce, "alice", {}, backend.now() + 60, **LIMITS)
    with pytest.raises(ValueError, match="already outstanding"):
        s.add_challenge(nonce, "bob", {}, backend.now() + 60, **LIMITS)
    assert s.take_challenge(nonce, "alice") is not None


def test_racing_takers_one_winner(backend: Backend) -> None:
    s, nonce = backend.state, _nonce()
    s.add_challenge(nonce, "alice", {}, backend.now() + 60, **LIMITS)
    assert _race([lambda: s.take_challenge(nonce, "alice")] * 50) == 1


def _race(calls: Sequence[Callable[[], object]]) -> int:
    """How many of *calls*, each in its thread and released at once, got something back."""
    start = threading.Barrier(len(calls))
    wins: list[object] = []

    def run(call: Callable[[], object]) -> None:
        start.wait()
        got = call()
        if got is not None:
            wins.append(got)

    pool = [threading.Thread(target=run, args=(call,)) for call in calls]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return len(wins)


# -- lockouts, throttles, failures, releases -----------------------------------
@pytest.mark.parametrize("kind", ["lockout", "throttle"])
def test_set_once_and_lift(backend: Backend, kind: str) -> None:
    s = backend.state
    if kind == "lockout":
        put, get, lift = s.lock_out, s.lockout, s.lift_lockout
    else:
        put, get, lift = s.throttle, s.throttled, s.lift_throttle
    assert get("alice") is None
    assert put("alice", 60, "first") is True
    assert put("alice", 600, "second") is False
    assert get("alice") == "first"
    assert get("bob") is None
    assert lift("alice") is True
    assert lift("alice") is False
    assert get("alice") is None
    assert put("alice", TTL, "short") is True
    backend.wait(TTL + 0.05)
    assert get("alice") is None
    assert lift("alice") is False
    assert put("alice", 60, "again") is True


def test_lockouts_listing(backend: Backend) -> None:
    s = backend.state
    assert s.lockouts() == {}
    s.lock_out("alice", 60, "too many failures")
    s.lock_out("bob", TTL, "brief")
    assert s.lockouts() == {"alice": "too many failures", "bob": "brief"}
    backend.wait(TTL + 0.05)
    assert s.lockouts() == {"alice": "too many failures"}
    s.lift_lockout("alice")
    assert s.lockouts() == {}


def test_failures_in_the_window(backend: Backend) -> None:
    s, t = backend.state, 1000.0
    assert s.add_failure("alice", t, 10) == 1
    assert s.add_failure("alice", t, 10) == 2  # the same instant counts twice
    assert s.add_failure("alice", t + 5, 10) == 3
    assert s.add_failure("bob", t + 5, 10) == 1
    # (t, t + 10]: the two at t have left the window.
    assert s.add_failure("alice", t + 10, 10) == 2
    assert s.add_failure("alice", t + 30, 10) == 1


def test_lifting_a_lockout_forgets_failures(backend: Backend) -> None:
    s, t = backend.state, 1000.0
    for i in range(3):
        s.add_failure("alice", t + i, 60)
    s.lock_out("alice", 60, "three failures")
    assert s.lift_lockout("alice") is True
    assert s.add_failure("alice", t + 4, 60) == 1


def test_release_counts_and_baseline(backend: Backend) -> None:
    s, bucket = backend.state, 100.0
    for when, times in ((9650.0, 3), (9950.0, 6), (9500.0, 4)):  # buckets 96, 99, 95
        for _ in range(times):
            s.count_release("alice", when, bucket, 3)
    # Bucket 100: the three before it are 97 (none), 98 (none) and 99 (6).
    assert s.count_release("alice", 10_000.0, bucket, 3) == (1, 2.0)
    assert s.count_release("alice", 10_099.0, bucket, 3) == (2, 2.0)
    assert s.count_release("bob", 10_000.0, bucket, 3) == (1, 0.0)
    assert s.count_release("alice", 10_400.0, bucket, 3) == (1, 0.0)
    assert s.count_release("alice", 10_401.0, bucket, 0) == (2, 0.0)


# -- lockdowns, evidence ---------------------------------------------------------
def test_lockdowns(backend: Backend) -> None:
    s = backend.state
    assert s.lockdowns() == {}
    s.set_lockdown("*", "incident 7")
    s.set_lockdown("acme", "key rotation")
    s.set_lockdown("acme", "key rotation, day 2")
    assert s.lockdowns() == {"*": "incident 7", "acme": "key rotation, day 2"}
    assert s.lift_lockdown("*") is True
    assert s.lift_lockdown("*") is False
    assert s.lockdowns() == {"acme": "key rotation, day 2"}


def test_standing_reads_lockdowns_lockout_and_throttle_at_once(backend: Backend) -> None:
    s = backend.state
    assert s.standing("alice") == ({}, None, None)
    s.set_lockdown("acme", "drill")
    s.lock_out("alice", 60, "failures")
    s.throttle("alice", TTL, "spike")
    assert s.standing("alice") == ({"acme": "drill"}, "failures", "spike")
    assert s.standing("bob") == ({"acme": "drill"}, None, None)
    backend.wait(TTL + 0.05)
    assert s.standing("alice") == ({"acme": "drill"}, "failures", None)


def test_swap_evidence(backend: Backend) -> None:
    s = backend.state
    assert s.swap_evidence("node-1", "fp-a") is None
    assert s.swap_evidence("node-1", "fp-b") == "fp-a"
    assert s.swap_evidence("node-2", "fp-z") is None
    assert s.swap_evidence("node-1", "fp-b") == "fp-b"


def test_ping(backend: Backend) -> None:
    backend.state.ping()


# -- Redis: several replicas on one server -----------------------------------------
@pytest.fixture
def replicas(redis_url: str, redis_prefix: str) -> Iterator[tuple[RedisState, RedisState]]:
    a, b = RedisState(redis_url, prefix=redis_prefix), RedisState(redis_url, prefix=redis_prefix)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_replicas_take_a_challenge_once(replicas: tuple[RedisState, RedisState]) -> None:
    a, b = replicas
    for _ in range(5):
        nonce = _nonce()
        a.add_challenge(nonce, "alice", {}, time.time() + 60, **LIMITS)
        takes = [partial(r.take_challenge, nonce, "alice") for r in (a, b) * 25]
        assert _race(takes) == 1


def test_replicas_share_everything(replicas: tuple[RedisState, RedisState]) -> None:
    a, b = replicas
    a.lock_out("alice", 60, "failures")
    assert b.lockout("alice") == "failures"
    assert b.lockouts() == {"alice": "failures"}
    assert b.lock_out("alice", 60, "again") is False
    a.throttle("bob", 60, "burst")
    assert b.throttled("bob") == "burst"
    a.set_lockdown("acme", "incident")
    assert b.lockdowns() == {"acme": "incident"}
    assert a.add_failure("carol", 1000.0, 10) == 1
    assert b.add_failure("carol", 1000.0, 10) == 2
    a.swap_evidence("node-1", "fp-a")
    assert b.swap_evidence("node-1", "fp-b") == "fp-a"
    nonce = _nonce()
    a.add_challenge(nonce, "dave", {}, time.time() + 60, max_total=1, max_per_identity=1)
    with pytest.raises(StateFull):
        b.add_challenge(_nonce(), "erin", {}, time.time() + 60, max_total=1, max_per_identity=1)
    assert b.take_challenge(nonce, "dave") is not None
    assert a.take_challenge(nonce, "dave") is None


def test_keys_carry_the_prefix_and_expire(redis_url: str, redis_prefix: str) -> None:
    s = RedisState(redis_url, prefix=redis_prefix)
    s.add_challenge(_nonce(), "alice", {}, time.time() + 60, **LIMITS)
    s.add_failure("alice", time.time(), 30)
    s.count_release("alice", time.time(), 60, 4)
    s.throttle("alice", 60, "burst")
    s.lock_out("alice", 60, "failures")
    s.close()
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        mine = list(r.scan_iter(match=f"{redis_prefix}*"))
        assert len(mine) == 8
        ttls = {k.removeprefix(redis_prefix).split(":")[0]: r.pttl(k) for k in mine}
    # Only the lockout index lives on (it is pruned as lockouts are added).
    assert ttls.pop("lock-index") == -1
    assert 0 < ttls.pop("rel") <= 6 * 60_000
    assert 0 < ttls.pop("fail") <= 30_000
    assert all(0 < ms <= 60_000 for ms in ttls.values()), ttls


def test_unreachable_redis_is_a_backend_error() -> None:
    s = RedisState("redis://:secretpw@127.0.0.1:1/0")
    assert "secretpw" not in repr(s)
    calls: list[Callable[[], object]] = [
        s.ping,
        lambda: s.add_challenge(_nonce(), "a", {}, time.time() + 60, **LIMITS),
        lambda: s.take_challenge(_nonce(), "a"),
        lambda: s.lock_out("a", 1, "r"),
        s.lockouts,
        lambda: s.lift_lockout("a"),
        lambda: s.add_failure("a", 1.0, 1),
        lambda: s.count_release("a", 1.0, 1, 2),
        lambda: s.swap_evidence("m", "f"),
    ]
    for call in calls:
        with pytest.raises(BackendError) as info:
            call()
        message = str(info.value)
        assert "redis://127.0.0.1:1/0" in message
        assert "secretpw" not in message
        assert "\n" not in message
    s.close()


# -- open_state ----------------------------------------------------------------------
@pytest.mark.parametrize("url", [None, "memory:"])
def test_open_memory(url: str | None) -> None:
    assert isinstance(open_state(url), MemoryState)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:1/0", "rediss://u:pw@127.0.0.1:1", "unix:///run/redis.sock"]
)
def test_open_redis_connects_lazily(url: str) -> None:
    state = open_state(url, prefix="p:")
    assert isinstance(state, RedisState)
    assert "pw" not in repr(state)
    state.close()


@pytest.mark.parametrize("url", ["memory://", "http://u:hunter2@h/", "localhost:6379", ""])
def test_open_refuses_other_urls(url: str) -> None:
    with pytest.raises(ValueError, match="not one of") as info:
        open_state(url)
    assert "hunter2" not in str(info.value)
    assert "\n" not in str(info.value)
