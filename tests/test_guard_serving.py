# ruff: noqa: F811 (the guard tests' fixtures, imported, are parameters here)
"""The guard at the API layer, on the real all-MiniLM-L6-v2: per-request screening
(``Guard.screen(caller, inputs)``), a generation counted once, the ASGI middleware
in a real FastAPI app under concurrent clients, the MMD detector calibrated on
benign traffic, and per-caller state that concurrent callers do not serialise on."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks._guard_traffic import benign_topic
from sealstore.errors import InferenceRefused
from sealstore.loaders import GuardPolicy
from sealstore.loaders.inference_guard import (
    ExtractionPolicy,
    GuardMiddleware,
    MmdPolicy,
    OodPolicy,
    RatePolicy,
    as_caller,
    screened,
    texts_of,
)
from tests.test_guard import (  # noqa: F401 (fixtures)
    Clock,
    Mini,
    attach,
    fwd,
    metric_lines,
    mini,
    mini_home,
    random_attack,
    records,
    rows_batch,
)
from tests.uvicorn_thread import free_port, post_json, uvicorn_running


def queries(g: Any) -> float:
    (line,) = metric_lines(g, "sealstore_guard_queries_total ")
    return float(line.split()[-1])


# -- screen(caller, inputs) ----------------------------------------------------------------


def test_screen_takes_the_caller_and_one_request(mini: Mini, attach: Any) -> None:
    g = attach(mini.model, policy=GuardPolicy(reference=mini.reference, lockdown=None), hook=False)
    batch = mini.batch(benign_topic(mini.rest, 3, random.Random(2)))
    g.screen("alice", batch)  # a tokenizer's output
    g.screen("bob", batch["input_ids"][:1])  # a tensor of token ids
    assert queries(g) == 4.0
    assert sorted(g._callers) == ["alice", "bob"]
    # Without the hook the forward is not observed: the server screens, the model serves.
    fwd(mini.model, batch)
    assert queries(g) == 4.0
    with pytest.raises(TypeError, match=r"screen\(caller, inputs\)"):
        g.screen("alice", batch, batch)
    with pytest.raises(ValueError, match="1-128 printable"):
        g.screen("bad\ncaller", batch)
    # An anonymous call is refused when the policy requires a caller.
    g2 = attach(
        torch.nn.Linear(4, 2), policy=GuardPolicy(require_caller=True, lockdown=None), hook=False
    )
    with pytest.raises(InferenceRefused) as err:
        g2.screen(torch.ones(2, 4))
    assert err.value.code == "no-caller"
    g2.screen("carol", torch.ones(2, 4))


# -- a generation is one query ----------------------------------------------------------


def test_a_generation_counts_once_and_takes_the_caller(mini: Mini, attach: Any) -> None:
    from transformers import BertLMHeadModel

    # MiniLM's real weights as a decoder (its LM head is new): generate() runs one
    # forward per new token, 25 here, against a rate floor of 20 queries a minute.
    lm = BertLMHeadModel.from_pretrained(str(mini.src), is_decoder=True).eval()
    clock = Clock()
    g = attach(
        lm,
        policy=GuardPolicy(
            rate=RatePolicy(floor=20), response="refuse", lockdown=None, reference=None
        ),
        clock=clock,
    )
    enc = mini.batch(["How do I read a file line by line?"])
    prompt = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        out = lm.generate(**prompt, caller="alice", max_new_tokens=25, min_new_tokens=25)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 25
    assert queries(g) == 1.0  # the prompt, once: not one query per decoding step
    assert g._callers["alice"].queries == 1
    with as_caller("bob"), torch.no_grad():
        lm.generate(**prompt, max_new_tokens=3, min_new_tokens=3)
    assert g._callers["bob"].queries == 1
    # A plain forward through the hook still counts, row by row.
    seven = mini.batch(["a", "b", "c", "d", "e", "f", "g"])
    for _ in range(2):
        fwd(lm, seven, caller="carol")
    with pytest.raises(InferenceRefused) as err:
        fwd(lm, seven, caller="carol")  # 21 queries in a minute > 20
    assert err.value.code == "refused" and "rate finding" in str(err.value)
    # A refused caller's generation is refused before it starts.
    with pytest.raises(InferenceRefused), torch.no_grad():
        lm.generate(**prompt, caller="carol", max_new_tokens=2)
    g.remove()
    assert "generate" not in lm.__dict__  # the class's generate again
    with pytest.raises(ValueError, match="caller"), torch.no_grad():
        lm.generate(**prompt, caller="alice", max_new_tokens=2)


# -- the ASGI middleware in a real FastAPI app -------------------------------------------


def _post(port: int, body: dict, caller: str | None) -> tuple[int, dict]:
    headers = {} if caller is None else {"x-sealstore-caller": caller}
    return post_json(f"http://127.0.0.1:{port}/v1/embeddings", body, headers)


def test_middleware_screens_each_request_of_concurrent_clients(mini: Mini, attach: Any) -> None:
    import uvicorn
    from fastapi import FastAPI

    assert texts_of({"input": "x"}) == ["x"]
    assert texts_of({"messages": [{"role": "user", "content": "hi"}]}) == ["hi"]
    assert texts_of({"model": "m"}) is None
    # The forward hook stays on too: the middleware marks its requests screened, so the
    # model's forward calls are not counted twice.
    g = attach(
        mini.model, policy=GuardPolicy(reference=mini.reference, response="refuse", lockdown=None)
    )
    app = FastAPI()
    app.add_middleware(GuardMiddleware, guard=mini.model, tokenizer=mini.tok)

    def embeddings(body: dict, want: bool = False) -> Any:
        enc = mini.batch(body["input"])
        with torch.no_grad(), screened():  # (the test's own check is not a query)
            h = mini.model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        emb = (h * m).sum(1) / m.sum(1)
        return emb if want else {"data": [{"embedding": e.tolist()} for e in emb]}

    @app.post("/v1/embeddings")
    def serve(body: dict) -> dict:
        return embeddings(body)

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
    with uvicorn_running(config, "uvicorn", join=30):
        pool = [s for v in mini.rest.values() for s in v]
        rng = random.Random(5)
        benign = {f"user-{i}": [rng.sample(pool, 2) for _ in range(4)] for i in range(8)}
        attack = random_attack(mini, n=80)
        attack_text = [mini.tok.decode(r[1:-1]) for r in attack]
        answers: dict[str, list[tuple[int, Any]]] = {}

        def client(name: str, bodies: list[list[str]]) -> None:
            answers[name] = [_post(port, {"input": b}, name) for b in bodies]

        threads = [threading.Thread(target=client, args=kv) for kv in benign.items()]
        threads.append(
            threading.Thread(
                target=client,
                args=("mallory", [attack_text[i : i + 4] for i in range(0, 80, 4)]),
            )
        )
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        # Every benign request served, with the model's own embeddings.
        for name, bodies in benign.items():
            assert [s for s, _ in answers[name]] == [200] * 4, answers[name]
            got = torch.tensor([d["embedding"] for d in answers[name][0][1]["data"]])
            assert torch.allclose(got, embeddings({"input": bodies[0]}, want=True), atol=1e-4)
        # The attacker is refused by the ood detector, with a JSON error, not served.
        codes = [s for s, _ in answers["mallory"]]
        assert 200 in codes and 403 in codes, codes
        first = codes.index(403)
        assert all(c == 403 for c in codes[first:])
        assert answers["mallory"][first][1]["error"] == "refused"
        assert "ood finding" in answers["mallory"][first][1]["detail"]
        assert 4 * first <= 40  # within min_queries (20) and a window or so
        # Each request counted once, row by row: the hook did not count the forwards again.
        assert queries(g) == 8 * 4 * 2 + 4 * (first + 1)
        # No caller header: anonymous ("-"), served; a bad one: 400, one line.
        status, _ = _post(port, {"input": [pool[0]]}, None)
        assert status == 200 and "-" in g._callers
        status, err = _post(port, {"input": [pool[0]]}, "x" * 200)
        assert status == 400 and "1-128 printable" in err["detail"]
        # A query the guard cannot read is refused, never served unscreened: token
        # ids (the served model's, not the guard's), an image-only chat.
        before = queries(g)
        image = {"type": "image_url", "image_url": {"url": "data:,"}}
        for body in (
            {"input": [101, 2023, 102]},
            {"prompt": [[101], [102, 7]]},
            {"messages": [{"role": "user", "content": [image]}]},
        ):
            status, err = _post(port, body, "user-0")
            assert status == 400 and "no text the guard can" in err["detail"], (body, err)
        assert queries(g) == before


# -- the MMD detector, calibrated on benign traffic ---------------------------------------


def _streams(mini: Mini, callers: int, n: int, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    out = {}
    for i in range(callers):
        texts = benign_topic(mini.rest, n, rng)
        out[f"cal-{seed}-{i}"] = [mini.batch(texts[j : j + 10]) for j in range(0, n, 10)]
    return out


def test_mmd_calibrated_on_benign_traffic_catches_an_attack(mini: Mini, attach: Any) -> None:
    clock = Clock()
    policy = GuardPolicy(
        reference=mini.reference,
        lockdown=None,
        response="refuse",
        ood=OodPolicy(enabled=False),
        extraction=ExtractionPolicy(enabled=False),
        mmd=MmdPolicy(window=60, min_queries=60, every=10),
    )
    g = attach(mini.model, policy=policy, clock=clock, hook=False)
    assert g.thresholds["mmd"] == float("inf")  # uncalibrated: the MMD test does not fire
    with pytest.raises(ValueError, match="at least 20 benign callers"):
        g.calibrate(_streams(mini, 5, 60, 1), target_fpr=0.05)
    streams = _streams(mini, 20, 60, 1)
    peaks = g.peaks(streams)
    assert all(p["mmd"] > -1 for p in peaks.values())
    t = g.calibrate(streams, target_fpr=0.05)
    ordered = sorted(p["mmd"] for p in peaks.values())
    assert t["mmd"] == ordered[-1]  # 95% of 20 callers, the higher: the largest
    # 90% of 20 callers: the second largest; taken per kind of traffic (two kinds of 10
    # callers), each kind's 90% quantile, here each kind's largest; callers of no kind
    # get the quantile over the kinds named default= pooled: again the second largest
    # of the 20, not the loosest kind's largest (which that kind keeps).
    assert g.calibrate(streams, target_fpr=0.1)["mmd"] == ordered[-2]
    kinds = {name: "ab"[i % 2] for i, name in enumerate(streams)}
    t2 = g.calibrate(streams, target_fpr=0.1, groups=kinds, default=("a", "b"))
    assert t2["mmd"] == ordered[-2]
    assert max(k["thresholds"]["mmd"] for k in g.kinds().values()) == ordered[-1]
    with pytest.raises(ValueError, match="has no group"):
        g.calibrate(streams, target_fpr=0.1, groups={})
    audit = [r for r in records(Path(mini_home()) / "audit") if r["action"] == "guard.thresholds"]
    assert [a["detail"]["kind"] for a in audit[-3:-1]] == ["a", "b"]  # each kind's own
    audit = [a for a in audit if "kind" not in a["detail"]]  # the default kind's
    assert [a["detail"]["mmd"] for a in audit[-3:]] == [
        round(x, 6) for x in (t["mmd"], ordered[-2], ordered[-2])
    ]
    # Held-out benign callers pass; a random-token attacker is refused by MMD.
    for name, reqs in _streams(mini, 3, 60, 2).items():
        for r in reqs:
            g.screen(name, r)
            clock.now += 5
    attack = random_attack(mini, n=200, seed=11)
    sent = 0
    with pytest.raises(InferenceRefused) as err:
        for i in range(0, 200, 10):
            sent += 10
            g.screen("mallory", rows_batch(mini, attack[i : i + 10]))
            clock.now += 5
    assert sent <= 70 and "mmd finding" in str(err.value)
    assert g.status()["penalized"] == {
        "mallory": {"response": "refuse", "detector": "mmd", "kind": "*", "seconds_left": 600.0}
    }
    # Thresholds and the reference are replaceable at run time.
    with pytest.raises(ValueError, match="no threshold 'nope'"):
        g.set_thresholds(nope=1.0)
    g.set_thresholds(mmd=1e9)
    assert g.thresholds["mmd"] == 1e9
    g.set_reference(mini.batch(mini.reference_text[:100]))
    assert g.reference is not None and g.reference.size == 100


# -- per-caller state: concurrent callers do not wait on each other ------------------------


def test_sixteen_callers_do_not_serialise_on_one_lock(mini: Mini, attach: Any) -> None:
    g = attach(mini.model, policy=GuardPolicy(reference=mini.reference, lockdown=None), hook=False)
    batch = mini.batch(benign_topic(mini.rest, 8, random.Random(3)))
    for i in range(16):
        g.screen(f"c{i}", batch)
    done: dict[str, float] = {}
    start = time.perf_counter()

    def worker(name: str) -> None:
        for _ in range(5):
            g.screen(name, batch)
        done[name] = time.perf_counter() - start

    held = g._callers["c0"].lock
    held.acquire()  # caller c0's detector work is stuck for as long as this is held
    threads = [threading.Thread(target=worker, args=(f"c{i}",)) for i in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join(30)
        # The other 15 callers finished while c0 waited: no global lock between them.
        assert sorted(done) == sorted(f"c{i}" for i in range(1, 16))
        others = max(done.values())
        time.sleep(0.2)
        assert "c0" not in done
    finally:
        held.release()
    threads[0].join(30)
    assert done["c0"] > others
    assert g._callers["c0"].queries == 6 * 8


def test_policy_mapping_takes_mmd_and_exempt_callers() -> None:
    p = GuardPolicy.from_mapping(
        {"mmd": {"window": 80, "threshold": 0.01}, "rate": {"exempt": ["indexer"]}}
    )
    assert p.mmd.window == 80 and p.mmd.threshold == 0.01
    assert p.rate.exempt == ("indexer",)
    with pytest.raises(ValueError, match=r"unknown guard policy key mmd\.bogus"):
        GuardPolicy.from_mapping({"mmd": {"bogus": 1}})
    with pytest.raises(ValueError, match="at least 2"):
        GuardPolicy(mmd=MmdPolicy(window=1))


def test_an_exempt_indexer_is_not_rate_limited(attach: Any) -> None:
    clock = Clock()
    g = attach(
        torch.nn.Linear(4, 2),
        policy=GuardPolicy(rate=RatePolicy(floor=50, exempt=("indexer",)), lockdown=None),
        clock=clock,
        hook=False,
    )
    for _ in range(20):
        g.screen("indexer", torch.ones(10, 4))
        g.screen("other", torch.ones(10, 4))
        clock.now += 0.05  # 200 rows a second each
    assert {f.caller for f in g.recent} == {"other"}
    assert [f.detector for f in g.recent] == ["rate"]
