"""A real uvicorn server in a thread of the test process, and a free port for it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
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
