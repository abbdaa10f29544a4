"""A real uvicorn server in a thread of the test process, and a free port for it."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def uvicorn_running(config: Any, what: str = "the server", *, join: float = 15) -> Iterator[None]:
    """Run ``uvicorn.Server(config)`` in a daemon thread for the block; fail the test
    (naming *what*) if it has not started within 30 s; stop it after."""
    import uvicorn

    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start", pytrace=False)
        time.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(join)


def post_json(url: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    """POST *body* (JSON-encoded unless bytes) to *url*: the status and the decoded JSON
    answer, for an error status as for a success."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **headers}
    req = urllib.request.Request(url, data, headers)  # noqa: S310 (http, loopback)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 (http, loopback)
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
