"""The guard at the API layer: screen each request once, with its caller, before batching.

A model server batches many callers' requests into one forward call (continuous
batching), and a generation makes one forward call per token: a forward hook
sees neither the caller nor the request. :class:`GuardMiddleware` is an ASGI
middleware (FastAPI/Starlette, vLLM's OpenAI server through ``--middleware``)
that reads each request's body, names its caller (a header set by the
authenticating proxy in front, or a function of the request), and calls
``Guard.screen(caller, inputs)`` once per request before the application sees
it. A refusal is an HTTP error with a JSON body; the model is never reached.

Inside the request the caller is set (``as_caller``) and the request is marked
screened, so a forward hook on the same model, in the same process, checks the
lockdown but does not count the request's forward calls again.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

from sealstore.errors import InferenceRefused
from sealstore.loaders.inference_guard.hook import (
    _SCREENED,
    ANONYMOUS,
    CALLER,
    Guard,
    _check_caller,
    _check_kind,
)

# What a refusal answers: a detector's penalty, or the model is stopped.
STATUS = {
    "throttled": 429,
    "refused": 403,
    "no-caller": 401,
    "locked-down": 503,
    "locked-out": 503,
    "standing-unknown": 503,
    "audit-unavailable": 503,
}
MAX_BODY = 8 << 20


# The fields whose texts are a query, one row each: OpenAI's ``input`` (embeddings,
# vLLM's pooling and classify, the responses API) and ``prompt`` (completions); vLLM's
# score (``text_1``/``text_2``, ``data_1``/``data_2``, ``queries`` with ``documents`` or
# ``items``) and rerank (``query``, ``documents``); Cohere's embed (``texts``, ``inputs``).
ROW_KEYS = (
    "input",
    "prompt",
    "texts",
    "inputs",
    "text_1",
    "text_2",
    "data_1",
    "data_2",
    "queries",
    "query",
    "documents",
    "items",
)
# ... and ``messages`` (a chat: one row).
QUERY_KEYS = (*ROW_KEYS, "messages")
NO_TEXT = "holds no text the guard can screen (token ids, images and embeddings are not screened)"


def _text(item: Any) -> str | None:
    """One query's text: a string, or the text parts of a content item (``{"text": ..}``,
    ``{"content": "..."}`` or ``{"content": [{"type": "text", "text": ..}, ...]}``);
    None if it has none."""
    if isinstance(item, str):
        return item
    if not isinstance(item, Mapping):
        return None
    if isinstance(item.get("text"), str):
        return item["text"]
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            c["text"] for c in content if isinstance(c, Mapping) and isinstance(c.get("text"), str)
        ]
        return "\n".join(parts) if parts else None
    return None


def texts_of(body: Any) -> list[str] | None:
    """The texts of a query body, one row per text: each text of the fields in
    :data:`ROW_KEYS` (a string or a list of them; content items' text parts), and a
    chat's ``messages`` (their texts joined: one row). None: the body names no query
    field.

    Raises:
        ValueError: the body carries ``prompt_embeds``, or a query field holds
            something the guard cannot read as text (token ids, an image-only item):
            screened, it would be let through unread.
    """
    if not isinstance(body, Mapping):
        return None
    if body.get("prompt_embeds") is not None:
        raise ValueError("prompt embeddings (prompt_embeds) are not screened: send the text")
    rows: list[str] = []
    named = False
    for key in ROW_KEYS:
        value = body.get(key)
        if value is None:
            continue
        named = True
        for item in value if isinstance(value, list) else [value]:
            text = _text(item)
            if text is None:
                raise ValueError(f"the request's {key} {NO_TEXT}")
            rows.append(text)
    messages = body.get("messages")
    if messages is not None:
        named = True
        parts = []
        for m in messages if isinstance(messages, list) else []:
            text = _text(m)
            if text is not None:
                parts.append(text)
        if not parts:
            raise ValueError(f"the request's messages {NO_TEXT}")
        rows.append("\n".join(parts))
    if named and not rows:
        raise ValueError(f"the request {NO_TEXT}")
    return rows or None


def tokenized(tokenizer: Any, *, max_length: int = 128) -> Callable[[Any], Any]:
    """``inputs=`` for :class:`GuardMiddleware`: the body's texts (:func:`texts_of`)
    tokenized, one row per text (a whole chat or prompt is one query).

    A body that names a query field without text the guard can read -- token ids,
    an image-only chat, ``prompt_embeds`` -- is refused (ValueError: the middleware
    answers 400), never let through unscreened: token ids are the served model's,
    not the guard's tokenizer's. A body naming none is None (the middleware refuses
    it too, unless its path is listed in ``not_queries``). To accept token ids, pass
    ``inputs=`` that turns them into the guard's inputs (e.g. decode them with the
    served model's tokenizer, then tokenize with the guard's).
    """

    def inputs(body: Any) -> Any:
        texts = texts_of(body)
        if texts is None:
            return None
        enc = tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return dict(enc)

    return inputs


class GuardMiddleware:
    """ASGI middleware: ``app.add_middleware(GuardMiddleware, guard=g, inputs=...)``.

    Args:
        guard: the :class:`Guard` (``model.sealstore_guard``), or a guarded module.
        inputs: ``fn(body) -> inputs | None``: the parsed JSON body to what
            ``Guard.screen`` takes (a tokenizer's output); None: nothing to screen.
            Default: :func:`tokenized` with *tokenizer*.
        tokenizer: for the default *inputs*.
        caller_header: the request header naming the caller (set by the
            authenticating proxy in front of the server; a client must not be
            able to set it itself).
        caller: ``fn(scope) -> str | None`` instead of the header.
        kind_header: a request header naming the request's kind of traffic, whose
            thresholds (and reference) judge it (set by the authenticating proxy,
            like the caller's); None (the default): the guard's ``policy.kinds``
            says each caller's kind. A kind without thresholds of its own gets the
            default kind's.
        kind: ``fn(scope) -> str | None`` instead of *kind_header* (e.g. from the
            authenticated identity in ``scope``); None: ``policy.kinds``.
        methods: the HTTP methods screened (others pass).
        paths: path prefixes guarded (None, the default: every path, so every query
            route of vLLM's OpenAI server, with ``/v1/`` or without -- ``/score``,
            ``/rerank``, ``/pooling``, ``/classify``, ``/invocations``, ...).
        not_queries: paths (exact) on the guarded ones that take no query (a health
            check, an admin route): passed on unscreened, but a penalised caller is
            refused there too.

    Fail closed: a request on a guarded path whose body holds no text the guard can
    screen -- no query field, token ids, images only, ``prompt_embeds``, not JSON --
    is answered 400 unless its path is in *not_queries*; a caller under a penalty
    (or a stopped model) is answered its refusal first, whatever the body.

    For vLLM's ``--middleware`` (which adds the class without arguments), subclass
    it and set these as class attributes.
    """

    guard: Any = None
    inputs: Callable[[Any], Any] | None = None
    tokenizer: Any = None
    caller_header: str = "x-sealstore-caller"
    caller: Callable[[Mapping[str, Any]], str | None] | None = None
    kind_header: str | None = None
    kind: Callable[[Mapping[str, Any]], str | None] | None = None
    methods: tuple[str, ...] = ("POST",)
    paths: tuple[str, ...] | None = None
    not_queries: tuple[str, ...] = ()
    max_body: int = MAX_BODY

    def __init__(self, app: Any, **options: Any) -> None:
        self.app = app
        for key, value in options.items():
            if not hasattr(type(self), key) or key.startswith("_"):
                raise TypeError(f"GuardMiddleware has no option {key!r}")
            setattr(self, key, value)
        g = self.guard
        g = getattr(g, "sealstore_guard", g)
        if not isinstance(g, Guard):
            raise TypeError("GuardMiddleware needs guard= (a Guard or a guarded module)")
        self._guard = g
        # a function given as a class attribute (a subclass for vLLM) is not a method
        self.inputs = self.__dict__.get("inputs", type(self).inputs)
        self._caller_fn = self.__dict__.get("caller", type(self).caller)
        self._kind_fn = self.__dict__.get("kind", type(self).kind)
        if self.inputs is None:
            if self.tokenizer is None:
                raise TypeError("GuardMiddleware needs inputs= or tokenizer=")
            self.inputs = tokenized(self.tokenizer)
        self._header = self.caller_header.lower().encode("latin-1")
        self._kind_header = (
            self.kind_header.lower().encode("latin-1") if self.kind_header is not None else None
        )

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in self.methods:
            await self.app(scope, receive, send)
            return
        if self.paths is not None and not str(scope.get("path", "")).startswith(self.paths):
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _reply(send, 413, "too-large", f"request body over {self.max_body} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            caller = self._caller(scope)
            if caller is None:
                self._guard.metrics.inc("sealstore_guard_calls_total", {"result": "no-caller"})
                why = f"this model's guard requires a caller ({self.caller_header})"
                await _reply(send, 401, "no-caller", why)
                return
            kind = self._kind(scope)
        except ValueError as exc:
            await _reply(send, 400, "bad-request", str(exc).splitlines()[0][:200])
            return
        query = scope.get("path") not in self.not_queries
        problem = None
        inputs = None
        if query:
            try:
                parsed = json.loads(body) if body else None
                if isinstance(parsed, Mapping) and parsed.get("prompt_embeds") is not None:
                    raise ValueError(
                        "prompt embeddings (prompt_embeds) are not screened: send the text"
                    )
                inputs = self.inputs(parsed)  # type: ignore[misc]
            except ValueError as exc:
                problem = str(exc).splitlines()[0][:200]
            if inputs is None and problem is None:
                problem = (
                    f"the request {NO_TEXT}; a path that takes no query is listed in "
                    "the guard middleware's not_queries"
                )
        import anyio.to_thread

        try:
            if inputs is not None:
                screen = functools.partial(self._guard.screen, caller, inputs, kind=kind)
                await anyio.to_thread.run_sync(screen)
            else:  # nothing to count, but a penalised caller is refused all the same
                self._guard.admit(caller)
        except InferenceRefused as exc:
            await _reply(send, STATUS.get(exc.code, 403), exc.code, str(exc))
            return
        except ValueError as exc:
            await _reply(send, 400, "bad-request", str(exc).splitlines()[0][:200])
            return
        if problem is not None:
            self._guard.metrics.inc("sealstore_guard_calls_total", {"result": "unscreenable"})
            await _reply(send, 400, "bad-request", problem)
            return
        replayed = False

        async def replay() -> Mapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        caller_token = CALLER.set(caller)
        screened_token = _SCREENED.set(inputs is not None)
        try:
            await self.app(scope, replay, send)
        finally:
            _SCREENED.reset(screened_token)
            CALLER.reset(caller_token)

    def _caller(self, scope: Mapping[str, Any]) -> str | None:
        if self._caller_fn is not None:
            name = self._caller_fn(scope)
        else:
            name = next(
                (v.decode("latin-1") for k, v in scope.get("headers", ()) if k == self._header),
                None,
            )
        if name is None:
            return None if self._guard.policy.require_caller else ANONYMOUS
        return _check_caller(name)

    def _kind(self, scope: Mapping[str, Any]) -> str | None:
        if self._kind_fn is not None:
            name = self._kind_fn(scope)
        elif self._kind_header is not None:
            name = next(
                (
                    v.decode("latin-1")
                    for k, v in scope.get("headers", ())
                    if k == self._kind_header
                ),
                None,
            )
        else:
            return None
        return None if name is None else _check_kind(name)


async def _reply(send: Any, status: int, code: str, detail: str) -> None:
    body = json.dumps({"error": code, "detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 429:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
