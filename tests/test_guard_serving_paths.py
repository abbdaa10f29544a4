# ruff: noqa: F811 (the guard tests' fixtures, imported, are parameters here)
"""GuardMiddleware fails closed, in a real FastAPI app on the real all-MiniLM-L6-v2:
vLLM's score and rerank bodies (with ``/v1/`` and without) are screened text by text;
a body on a guarded path with no text the guard can screen (no query field, token ids,
``prompt_embeds``, not JSON) is a 400 unless its path is listed in ``not_queries``;
and a refused caller is refused on every guarded request, whatever its body."""

from __future__ import annotations

from typing import Any

import pytest

from sealstore.loaders import GuardPolicy
from sealstore.loaders.inference_guard import GuardMiddleware, RatePolicy, texts_of
from tests.test_guard import (  # noqa: F401 (fixtures)
    Mini,
    attach,
    metric_lines,
    mini,
    mini_home,
)
from tests.uvicorn_thread import free_port, post_json, uvicorn_running

CAP = 12  # queries a minute per caller, then refused (the rate detector: deterministic)


def queries(g: Any) -> float:
    (line,) = metric_lines(g, "sealstore_guard_queries_total ")
    return float(line.split()[-1])


def test_texts_of_reads_score_rerank_and_refuses_what_it_cannot_read() -> None:
    assert texts_of({"model": "m"}) is None
    assert texts_of({"text_1": "q", "text_2": ["a", "b"]}) == ["q", "a", "b"]
    assert texts_of({"data_1": ["q"], "data_2": "a"}) == ["q", "a"]
    assert texts_of({"queries": "q", "documents": ["a"]}) == ["q", "a"]
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    doc = {"content": [image, {"type": "text", "text": "caption"}]}
    assert texts_of({"query": "q", "documents": ["a", doc]}) == ["q", "a", "caption"]
    assert texts_of({"texts": ["a"]}) == ["a"]
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]}
    assert texts_of(chat) == ["hi"]
    for body, why in (
        ({"prompt": "hi", "prompt_embeds": "AAAA"}, "prompt_embeds"),
        ({"text_1": "q", "text_2": [[101, 102]]}, "text_2 holds no text"),
        ({"query": "q", "documents": [{"content": [image]}]}, "documents holds no text"),
        ({"input": []}, "holds no text"),
        ({"messages": [{"role": "user", "content": [image]}]}, "messages holds no text"),
    ):
        with pytest.raises(ValueError, match=why):
            texts_of(body)


def _post(port: int, path: str, body: Any, caller: str) -> tuple[int, Any]:
    return post_json(f"http://127.0.0.1:{port}{path}", body, {"x-sealstore-caller": caller})


def test_the_middleware_screens_every_query_route_and_fails_closed(mini: Mini, attach: Any) -> None:
    import uvicorn
    from fastapi import FastAPI

    policy = GuardPolicy(
        reference=mini.reference,
        lockdown=None,
        responses={"rate": "refuse"},
        rate=RatePolicy(max_queries=CAP),
    )
    g = attach(mini.model, policy=policy, hook=False)
    app = FastAPI()
    # The default paths (every one) and one route listed as taking no query.
    app.add_middleware(GuardMiddleware, guard=g, tokenizer=mini.tok, not_queries=("/ping",))
    reached: list[str] = []

    def route(path: str) -> Any:
        async def served() -> dict:
            reached.append(path)
            return {"ok": path}

        return served

    # vLLM's query routes, with /v1/ and without, and a route that is no query.
    for path in ("/score", "/v1/score", "/rerank", "/v1/rerank", "/v1/completions", "/admin"):
        app.post(path)(route(path))

    @app.post("/ping")
    async def ping() -> dict:
        reached.append("/ping")
        return {"ok": "/ping"}

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
    with uvicorn_running(config, "uvicorn", join=30):
        # Score and rerank bodies are screened text by text: 3 + 3 + 2 queries counted.
        assert _post(port, "/score", {"text_1": "a cat", "text_2": ["a", "b"]}, "alice")[0] == 200
        rerank = {"query": "what is a module", "documents": ["one", "two"]}
        assert _post(port, "/v1/rerank", rerank, "alice")[0] == 200
        assert _post(port, "/rerank", {"query": "q", "documents": "d"}, "alice")[0] == 200
        assert queries(g) == 8
        # Nothing the guard can screen, on a guarded path: 400, one line, never served.
        for path, body, why in (
            ("/score", {"model": "m"}, "holds no text the guard can screen"),
            ("/v1/score", {"text_1": [101, 2023], "text_2": "b"}, "text_1 holds no text"),
            ("/v1/completions", {"prompt": "hi", "prompt_embeds": "AAAA"}, "prompt_embeds"),
            ("/admin", {"action": "reload"}, "not_queries"),
            ("/admin", b"", "holds no text"),
            ("/score", b"not json", "Expecting value"),
        ):
            status, err = _post(port, path, body, "alice")
            assert status == 400 and err["error"] == "bad-request", (path, body, err)
            assert why in err["detail"], (why, err)
            assert "\n" not in err["detail"]
        assert reached == ["/score", "/v1/rerank", "/rerank"]
        assert queries(g) == 8
        # A path listed as no query is passed on unscreened, nothing counted.
        assert _post(port, "/ping", {}, "alice")[0] == 200
        assert reached[-1] == "/ping" and queries(g) == 8

        # mallory goes over the cap with score requests (5 queries each): refused (403).
        score = {"text_1": "q", "text_2": ["a", "b", "c", "d"]}
        codes = [_post(port, "/v1/score", score, "mallory")[0] for _ in range(3)]
        assert codes == [200, 200, 403]
        n = len(reached)
        # Refused on every guarded request from now on, whatever its body: a query, one
        # with nothing to screen (its refusal, not a 400), a path listed as no query.
        for path, body in (
            ("/rerank", rerank),
            ("/score", {"model": "m"}),
            ("/v1/completions", {"prompt_embeds": "AAAA"}),
            ("/admin", b""),
            ("/ping", {}),
        ):
            status, err = _post(port, path, body, "mallory")
            assert status == 403 and err["error"] == "refused", (path, err)
            assert "refused after a rate finding" in err["detail"]
        assert len(reached) == n
        # alice is still served.
        assert _post(port, "/score", {"text_1": "a", "text_2": "b"}, "alice")[0] == 200
    assert g.status()["penalized"].keys() == {"mallory"}
    refused = metric_lines(g, 'sealstore_guard_calls_total{result="refused"}')
    assert refused and float(refused[0].split()[-1]) == 6
