# ruff: noqa: F811 (the guard tests' fixtures, imported, are parameters here)
"""Guard.calibrate by kind of traffic, on the real all-MiniLM-L6-v2: what it saw
(callers per kind), the default kind's thresholds (callers of no kind judged by the
quantile over the pooled callers of the kinds named ``default=``), the floor (a kind
only loosens) and the note on kinds too small for the target. Thresholds applied per
kind: tests/test_guard_kinds.py."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import pytest

from benchmarks._guard_traffic import benign_topic
from sealstore.loaders import GuardPolicy
from sealstore.loaders.inference_guard import MmdPolicy
from tests.test_guard import (  # noqa: F401 (fixtures)
    Mini,
    attach,
    mini,
    mini_home,
)


def _streams(mini: Mini) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """20 callers of natural sentences (3-15 modules each) and 5 callers who send single
    words: a rare, distinctive kind of traffic."""
    rng = random.Random(5)
    streams: dict[str, list[dict]] = {}
    kinds: dict[str, str] = {}
    for i in range(20):
        texts = benign_topic(mini.rest, 60, rng)
        streams[f"topic-{i}"] = [mini.batch(texts[j : j + 10]) for j in range(0, 60, 10)]
        kinds[f"topic-{i}"] = "topic"
    for i in range(5):
        words = [rng.choice(s.split()) for s in benign_topic(mini.rest, 60, rng)]
        streams[f"words-{i}"] = [mini.batch(words[j : j + 10]) for j in range(0, 60, 10)]
        kinds[f"words-{i}"] = "words"
    return streams, kinds


def test_calibrate_says_which_kind_set_each_threshold(
    mini: Mini, attach: Any, caplog: pytest.LogCaptureFixture
) -> None:
    policy = GuardPolicy(
        reference=mini.reference, lockdown=None, mmd=MmdPolicy(window=50, min_queries=50)
    )
    g = attach(mini.model, policy=policy, hook=False)
    assert g.calibration == {}
    streams, kinds = _streams(mini)
    peaks = g.peaks(streams)
    with caplog.at_level(logging.INFO, logger="sealstore.guard"):
        t = g.calibrate(streams, target_fpr=0.05, groups=kinds, default=("topic", "words"))
    cal = g.calibration
    assert cal["callers"] == 25 and cal["groups"] == {"topic": 20, "words": 5}
    for det in ("extraction", "ood", "mmd"):
        expected = {
            k: float(
                np.quantile(
                    [p[det] for n, p in peaks.items() if kinds[n] == k], 0.95, method="higher"
                )
            )
            for k in ("topic", "words")
        }
        pooled = float(np.quantile([p[det] for p in peaks.values()], 0.95, method="higher"))
        assert cal["quantiles"][det] == {**expected, "*": pooled}
        assert cal["set_by"][det] == "*"
        assert t[det] == pooled
    q = cal["quantiles"]["mmd"]
    # One-word queries sit far from the sentences of the reference: the pool's 95%
    # quantile over all 25 callers is the second-largest peak, one of the 5 one-word
    # callers', above every natural caller's peak and below the words kind's own.
    words_mmd = sorted(p["mmd"] for n, p in peaks.items() if kinds[n] == "words")
    assert t["mmd"] == words_mmd[-2] < q["words"]
    assert t["mmd"] > max(p["mmd"] for n, p in peaks.items() if kinds[n] == "topic")
    # A kind only loosens: the words kind keeps its own looser MMD threshold; the topic
    # kind's own (its callers' largest peak) is tighter than the default kind's and is
    # floored at it, for every detector.
    own, in_force = cal["own"], g.kinds()
    assert in_force["words"]["thresholds"]["mmd"] == own["words"]["mmd"] == q["words"]
    assert own["topic"]["mmd"] < t["mmd"] == in_force["topic"]["thresholds"]["mmd"]
    for k in ("topic", "words"):
        for det in ("extraction", "ood", "mmd"):
            assert in_force[k]["thresholds"][det] == max(own[k][det], t[det])
            assert cal["thresholds"][k][det] == in_force[k]["thresholds"][det]
    # 5 callers are too few for a 5% quantile (20): their largest peak is it, and it is said.
    assert q["words"] == words_mmd[-1]
    assert "1 of 2 kinds have fewer than 20 callers (e.g. 'words', 5)" in caplog.text

    # Pooled: one kind, "*", which sets every threshold; nothing to say about sizes.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sealstore.guard"):
        g.calibrate(streams, target_fpr=0.05)
    assert g.calibration["groups"] == {"*": 25}
    assert g.calibration["set_by"] == {"extraction": "*", "ood": "*", "mmd": "*"}
    assert "fewer than" not in caplog.text
    # A margin multiplies the threshold, not the quantiles recorded.
    t2 = g.calibrate(streams, target_fpr=0.05, margin=1.5, groups=kinds, default=["topic", "words"])
    assert g.calibration["quantiles"]["mmd"] == q
    assert t2["mmd"] == pytest.approx(1.5 * q["*"])
    assert g.kinds()["words"]["thresholds"]["mmd"] == pytest.approx(1.5 * q["words"])


def test_kind_margin_loosens_a_named_kind_only(mini: Mini, attach: Any) -> None:
    """A kind of few callers has its largest peak as its threshold, so a new caller of
    that kind can exceed it; kind_margin puts headroom on the kind's own thresholds
    while callers of no kind keep the default kind's (margin's) thresholds."""
    from tests.test_guard import Clock
    from tests.test_guard_kinds import _policy, _replay

    streams, kinds = _streams(mini)
    clock = Clock()
    g = attach(mini.model, policy=_policy(mini), clock=clock, hook=False)
    peaks = g.peaks(streams)
    # Hold out the one-word caller with the largest MMD peak: above the other four's.
    words = sorted((n for n in streams if kinds[n] == "words"), key=lambda n: peaks[n]["mmd"])
    held = words[-1]
    rest = {n: s for n, s in streams.items() if n != held}
    groups = {n: kinds[n] for n in rest}
    assert peaks[held]["mmd"] > max(peaks[n]["mmd"] for n in words[:-1])

    t1 = g.calibrate(rest, target_fpr=0.05, groups=groups, default="topic")
    assert g.calibration["kind_margin"] == 1.0
    in_force = g.kinds()["words"]["thresholds"]
    assert in_force["mmd"] == g.calibration["quantiles"]["mmd"]["words"] < peaks[held]["mmd"]
    # Without headroom the new caller of the kind is refused, like a caller of no kind.
    assert _replay(g, "held-1", streams[held], clock, kind="words") is not None
    assert _replay(g, "unknown-1", streams[held], clock) is not None

    t2 = g.calibrate(rest, target_fpr=0.05, groups=groups, default="topic", kind_margin=1.5)
    cal = g.calibration
    q = cal["quantiles"]
    assert t2 == t1 == cal["thresholds"]["*"]  # the default kind keeps margin (1)
    assert cal["margin"] == 1.0 and cal["kind_margin"] == 1.5
    for det in ("extraction", "ood", "mmd"):
        own = min(1.0, 1.5 * q[det]["words"]) if det != "mmd" else 1.5 * q[det]["words"]
        assert cal["own"]["words"][det] == pytest.approx(own)
        assert g.kinds()["words"]["thresholds"][det] == max(cal["own"]["words"][det], t2[det])
    assert peaks[held]["mmd"] < g.kinds()["words"]["thresholds"]["mmd"]
    # The named caller of the kind passes now; a caller of no kind is still refused.
    assert _replay(g, "held-2", streams[held], clock, kind="words") is None
    assert _replay(g, "unknown-2", streams[held], clock) is not None
    with pytest.raises(ValueError, match="kind_margin is at least 1"):
        g.calibrate(rest, target_fpr=0.05, groups=groups, kind_margin=0.9)
