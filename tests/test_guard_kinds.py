# ruff: noqa: F811 (the guard tests' fixtures, imported, are parameters here)
"""Thresholds (and a reference) per kind of traffic inside one guard, on the real
all-MiniLM-L6-v2: a caller of a kind calibrated looser is served while a caller of no
kind (or of a kind with no thresholds) sending the same traffic is refused; the kind
from ``policy.kinds``, from ``screen(..., kind=)`` and, through GuardMiddleware in a
real FastAPI app, from a request header; the default kind's thresholds fail closed."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks._guard_traffic import benign_topic
from sealstore.errors import InferenceRefused
from sealstore.loaders import GuardPolicy
from sealstore.loaders.inference_guard import DEFAULT_KIND, GuardMiddleware, MmdPolicy, hook
from tests.test_guard import (  # noqa: F401 (fixtures)
    Clock,
    Mini,
    attach,
    mini,
    mini_home,
    records,
)
from tests.test_guard_calibration import _streams
from tests.uvicorn_thread import free_port, post_json, uvicorn_running

WORDS = "words"


def _policy(mini: Mini, **kw: Any) -> GuardPolicy:
    return GuardPolicy(
        reference=mini.reference,
        lockdown=None,
        response="refuse",
        mmd=MmdPolicy(window=50, min_queries=50),
        **kw,
    )


def _replay(g: Any, caller: str, requests: list[dict], clock: Clock, **kw: Any) -> int | None:
    """Screen *requests* as *caller* (5 s apart); the request refused first (None: none)."""
    for i, r in enumerate(requests):
        try:
            g.screen(caller, r, **kw)
        except InferenceRefused:
            return i
        finally:
            clock.now += 5
    return None


def test_a_loosened_kind_passes_where_an_unknown_caller_is_refused(mini: Mini, attach: Any) -> None:
    clock = Clock()
    # w-* callers are of kind "words" (a function of the caller id); everyone else: none.
    g = attach(
        mini.model,
        policy=_policy(mini, kinds=lambda c: WORDS if c.startswith("w-") else None),
        clock=clock,
        hook=False,
    )
    streams, kinds = _streams(mini)  # 20 natural-sentence callers, 5 one-word callers
    t = g.calibrate(streams, target_fpr=0.05, groups=kinds)
    cal = g.calibration
    words, topic = cal["thresholds"][WORDS], cal["thresholds"]["topic"]
    # Callers of no kind are held to the tightest kind's thresholds: here the sentences'.
    assert cal["default"] == "the tightest of every kind"
    assert t == cal["thresholds"][DEFAULT_KIND] == g.thresholds
    for det in ("extraction", "ood", "mmd"):
        assert t[det] == min(words[det], topic[det])
    assert words["mmd"] > topic["mmd"] and t["mmd"] == topic["mmd"]
    assert g.kinds()[WORDS]["thresholds"] == words and g.kinds()["topic"]["thresholds"] == topic

    # The same one-word traffic (a calibration caller's, so within its kind's thresholds):
    # served to a caller of the kind, refused to a caller of none.
    one_words = next(reqs for name, reqs in streams.items() if kinds[name] == WORDS)
    assert _replay(g, "w-alice", one_words, clock) is None
    refused_at = _replay(g, "mallory", one_words, clock)
    assert refused_at is not None, "the unknown caller was not refused"
    status = g.status()
    assert status["penalized"]["mallory"]["kind"] == DEFAULT_KIND
    assert "w-alice" not in status["penalized"]
    assert g._callers["w-alice"].kind == WORDS
    # A kind named in the request (screen(..., kind=)) wins over policy.kinds; a kind with
    # no thresholds of its own gets the default kind's: it is refused like anyone unknown.
    assert _replay(g, "bob", one_words, clock, kind=WORDS) is None
    assert _replay(g, "w-carol", one_words, clock, kind="no-such-kind") == refused_at
    with pytest.raises(ValueError, match="1-64 printable"):
        g.screen("dave", one_words[0], kind="bad\nkind")
    # Natural sentences: every kind's callers pass.
    natural = next(reqs for name, reqs in streams.items() if kinds[name] == "topic")
    assert _replay(g, "erin", natural, clock) is None
    assert _replay(g, "w-frank", natural, clock) is None

    # Forgetting the kind: its callers get the default kind's thresholds from now on.
    assert g.forget_kind(WORDS) and not g.forget_kind(WORDS)
    assert WORDS not in g.kinds()
    assert _replay(g, "w-grace", one_words, clock) == refused_at


def test_default_kind_per_kind_thresholds_and_references(
    mini: Mini, attach: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    g = attach(mini.model, policy=_policy(mini, kinds={"w-1": WORDS}), clock=clock, hook=False)
    streams, kinds = _streams(mini)
    peaks = g.peaks(streams)
    # default= names the kinds unknown callers may look like: the quantile over their
    # callers pooled (one kind: its own quantile).
    t = g.calibrate(streams, target_fpr=0.05, groups=kinds, default=WORDS)
    assert g.calibration["default"] == "the 5 callers of ['words'] pooled"
    assert t == g.calibration["thresholds"][WORDS]
    assert g.calibration["set_by"] == {"extraction": "*", "ood": "*", "mmd": "*"}
    # A group named "*" is the default kind's own calibration.
    star = {n: (DEFAULT_KIND if k == "topic" else k) for n, k in kinds.items()}
    t = g.calibrate(streams, target_fpr=0.05, groups=star)
    assert g.calibration["default"] == "the group '*'"
    assert t["mmd"] == max(p["mmd"] for n, p in peaks.items() if kinds[n] == "topic")
    assert sorted(g.kinds()) == [DEFAULT_KIND, WORDS]
    for bad, why in (
        ({"groups": kinds, "default": "nope"}, "default kind 'nope' is not one of the groups"),
        ({"default": WORDS}, "there are none without groups="),
        ({"groups": star, "default": WORDS}, "a group '\\*' is the default kind"),
        ({"groups": {n: "" for n in kinds}}, "1-64 printable"),
    ):
        with pytest.raises(ValueError, match=why):
            g.calibrate(streams, target_fpr=0.05, **bad)
    # A calibration without groups replaces every kind's: all callers get the default's.
    g.calibrate(streams, target_fpr=0.05)
    assert sorted(g.kinds()) == [DEFAULT_KIND]

    # set_thresholds(kind=): a kind's first thresholds start from the default kind's.
    g.set_thresholds(kind=WORDS, mmd=5.0)
    assert g.kinds()[WORDS]["thresholds"] == {**g.thresholds, "mmd": 5.0}
    assert g.thresholds["mmd"] != 5.0
    g.set_thresholds(ood=0.9)  # the default kind's only
    assert g.kinds()[WORDS]["thresholds"]["ood"] != 0.9
    audit = [r for r in records(Path(mini_home()) / "audit") if r["action"] == "guard.thresholds"]
    assert audit[-2]["detail"]["kind"] == WORDS and audit[-2]["detail"]["mmd"] == 5.0
    assert "kind" not in audit[-1]["detail"] and audit[-1]["detail"]["ood"] == 0.9

    # A kind only loosens: thresholds set tighter than the default kind's are floored at
    # them, so natural traffic an unknown caller is served is served to the kind too...
    g.set_thresholds(kind="tight", ood=0.0, mmd=0.0)
    assert g.kinds()["tight"]["thresholds"] == g.thresholds
    natural = next(reqs for name, reqs in streams.items() if kinds[name] == "topic")
    assert _replay(g, "t-1", natural, clock, kind="tight") is None
    # ...and the floor follows the default kind's: loosened, the kind's too; tightened
    # below the kind's own, the kind's own again.
    g.set_thresholds(mmd=0.7)
    assert g.kinds()["tight"]["thresholds"]["mmd"] == 0.7
    assert g.kinds()[WORDS]["thresholds"]["mmd"] == 5.0
    g.set_thresholds(kind="tight", mmd=0.8)
    g.set_thresholds(mmd=0.01)
    assert g.kinds()["tight"]["thresholds"]["mmd"] == 0.8

    # A kind's own reference: its callers' peaks (and so its calibration) are judged
    # against it. One-word callers against a reference of single words look ordinary.
    rng = random.Random(9)
    word_ref = [rng.choice(s.split()) for s in benign_topic(mini.rest, 300, rng)]
    g.set_reference(mini.batch(word_ref), kind=WORDS)
    assert g.kinds()[WORDS]["reference"] == 300
    assert g.kinds()[DEFAULT_KIND]["reference"] == mini.reference["input_ids"].shape[0]
    words_streams = {n: r for n, r in streams.items() if kinds[n] == WORDS}
    own = g.peaks(words_streams, dict.fromkeys(words_streams, WORDS))
    shared = g.peaks(words_streams)
    for n in words_streams:
        assert own[n]["mmd"] < shared[n]["mmd"]
    g.calibrate(streams, target_fpr=0.05, groups=kinds)
    assert g.calibration["quantiles"]["mmd"][WORDS] == max(p["mmd"] for p in own.values())
    assert g.kinds()[WORDS]["reference"] == 300  # a calibration keeps the kinds' references
    assert g.status()["kinds"] == g.kinds()

    # Memory stays bounded: a set number of kinds with their own thresholds or reference.
    monkeypatch.setattr(hook, "MAX_KINDS", 3)
    g.set_thresholds(kind="k3", mmd=1.0)
    with pytest.raises(ValueError, match="at most 3 kinds"):
        g.set_thresholds(kind="k4", mmd=1.0)
    with pytest.raises(ValueError, match="at most 3 kinds"):
        g.set_reference(mini.batch(word_ref[:50]), kind="k4")
    with pytest.raises(ValueError, match="kinds is a mapping"):
        GuardPolicy(kinds=["w-1"])  # type: ignore[arg-type]


def _post(port: int, texts: list[str], caller: str, kind: str | None) -> tuple[int, Any]:
    headers = {"x-sealstore-caller": caller}
    if kind is not None:
        headers["x-traffic-kind"] = kind
    return post_json(f"http://127.0.0.1:{port}/v1/embeddings", {"input": texts}, headers)


def test_the_middleware_takes_the_kind_from_a_request_header(mini: Mini, attach: Any) -> None:
    import uvicorn
    from fastapi import FastAPI

    g = attach(mini.model, policy=_policy(mini), hook=False)
    streams, kinds = _streams(mini)
    g.calibrate(streams, target_fpr=0.05, groups=kinds)
    app = FastAPI()
    app.add_middleware(
        GuardMiddleware, guard=mini.model, tokenizer=mini.tok, kind_header="X-Traffic-Kind"
    )
    served: list[int] = []

    @app.post("/v1/embeddings")
    def serve(body: dict) -> dict:
        enc = mini.batch(body["input"])
        with torch.no_grad():
            h = mini.model(**enc).last_hidden_state
        served.append(len(body["input"]))
        return {"data": [{"embedding": e.mean(0).tolist()} for e in h]}

    # One one-word caller's traffic (10 words a request), as text.
    one_words = next(reqs for name, reqs in streams.items() if kinds[name] == WORDS)
    bodies = [
        [
            mini.tok.decode(ids[1 : int(m.sum()) - 1])
            for ids, m in zip(r["input_ids"], r["attention_mask"], strict=True)
        ]
        for r in one_words
    ]
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
    with uvicorn_running(config, "uvicorn", join=30):
        ok = [_post(port, b, "alice", WORDS)[0] for b in bodies]
        assert ok == [200] * len(bodies)
        answers = [_post(port, b, "mallory", None) for b in bodies]
        codes = [s for s, _ in answers]
        assert 403 in codes, codes
        first = codes.index(403)
        assert all(c == 403 for c in codes[first:])
        assert answers[first][1]["error"] == "refused"
        # The refused requests never reached the model.
        assert len(served) == len(bodies) + first
        # A kind the guard has no thresholds for: the default kind's, refused the same.
        other = [_post(port, b, "carol", "no-such-kind")[0] for b in bodies]
        assert other.index(403) == first
        status, err = _post(port, bodies[0], "dave", "x" * 100)
        assert status == 400 and "1-64 printable" in err["detail"]
    assert g._callers["alice"].kind == WORDS and g._callers["mallory"].kind == DEFAULT_KIND


def test_the_middleware_takes_the_kind_from_the_authenticated_identity(
    mini: Mini, attach: Any
) -> None:
    """``kind=fn(scope)``: here the identity an authenticating layer put in the scope."""
    import asyncio

    g = attach(mini.model, policy=_policy(mini), hook=False)
    g.set_thresholds(kind=WORDS, mmd=5.0)
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["user"]["name"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def identity(scope: Any) -> str:
        return scope["user"]["name"]

    def kind(scope: Any) -> str | None:
        return scope["user"].get("traffic")

    mw = GuardMiddleware(app, guard=g, tokenizer=mini.tok, caller=identity, kind=kind)

    async def call(user: dict[str, str]) -> int:
        body = json.dumps({"input": ["a sentence to embed"]}).encode()
        scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": []}
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await mw({**scope, "user": user}, receive, send)
        return sent[0]["status"]

    assert asyncio.run(call({"name": "alice", "traffic": WORDS})) == 200
    assert asyncio.run(call({"name": "bob"})) == 200
    assert asyncio.run(call({"name": "carol", "traffic": "bad\nkind"})) == 400
    assert reached == ["alice", "bob"]
    assert g._callers["alice"].kind == WORDS and g._callers["bob"].kind == DEFAULT_KIND
    assert "carol" not in g._callers
