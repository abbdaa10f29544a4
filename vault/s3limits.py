"""Limits on every S3 call: connect and read timeouts, retries, and a deadline.

A frozen S3 server accepts connections (the kernel does that) and then never
answers. botocore's ``Config`` bounds each attempt -- ``connect_timeout`` and
``read_timeout`` -- and retries in its ``standard`` mode with jittered backoff;
what no botocore setting bounds is the whole call: an upload whose body the
server stopped reading waits on a full socket with no timer running at all.
So each request s3fs makes also runs under a deadline (``asyncio.timeout`` on
fsspec's event loop, which cancels the request there), and a call that
outlives it fails with :class:`S3Timeout`.

The settings come from the environment (see docs/STORE.md):

* ``SEALSTORE_S3_CONNECT_TIMEOUT`` -- seconds to open a connection (default 10);
* ``SEALSTORE_S3_READ_TIMEOUT`` -- seconds without a byte from the server (default 60);
* ``SEALSTORE_S3_DEADLINE`` -- seconds one request may take, retries included (default 300);
* ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` -- botocore's own (default 3, ``standard``).

Loads read an object with many ranged GETs at once (``sealstore.ranged``):

* ``SEALSTORE_S3_CONCURRENCY`` -- GETs in flight (default 8);
* ``SEALSTORE_S3_RANGE_MB`` -- MiB a GET asks for (default 8).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "S3Limits",
    "S3Timeout",
    "deadline_filesystem",
    "describe",
    "ranged_reads",
    "timed_out",
]

ENV_CONNECT = "SEALSTORE_S3_CONNECT_TIMEOUT"
ENV_READ = "SEALSTORE_S3_READ_TIMEOUT"
ENV_DEADLINE = "SEALSTORE_S3_DEADLINE"
ENV_CONCURRENCY = "SEALSTORE_S3_CONCURRENCY"
ENV_RANGE_MB = "SEALSTORE_S3_RANGE_MB"


class S3Timeout(OSError):
    """An S3 request got no answer in time; the message names the endpoint and the limit.

    Not a ``TimeoutError``: fsspec replaces those by a bare ``FSTimeoutError``
    on their way out of its event loop, and the message would be lost.
    """


@dataclass(frozen=True)
class S3Limits:
    """How long S3 calls may take, in seconds."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    deadline: float = 300.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Limits:
        """The limits set in *environ* (default ``os.environ``), defaults for the rest.

        Raises:
            ValueError: a variable that is not a positive number of seconds.
        """
        env = os.environ if environ is None else environ
        values: dict[str, float] = {}
        for field, name in (
            ("connect_timeout", ENV_CONNECT),
            ("read_timeout", ENV_READ),
            ("deadline", ENV_DEADLINE),
        ):
            text = env.get(name, "").strip()
            if not text:
                continue
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={text!r}: expected a positive number of seconds")
            values[field] = value
        return cls(**values)


def ranged_reads(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(GETs in flight, bytes a GET asks for) for loads, from *environ* (default ``os.environ``).

    Raises:
        ValueError: a variable that is not a positive whole number.
    """
    from sealstore.ranged import DEFAULT_CONCURRENCY, DEFAULT_RANGE_SIZE

    env = os.environ if environ is None else environ

    def number(name: str, default: int) -> int:
        text = env.get(name, "").strip()
        if not text:
            return default
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{name}={text!r}: expected a positive whole number")
        return int(text)

    return (
        number(ENV_CONCURRENCY, DEFAULT_CONCURRENCY),
        number(ENV_RANGE_MB, DEFAULT_RANGE_SIZE >> 20) << 20,
    )


@functools.cache
def deadline_filesystem(base: type) -> type:
    """A subclass of the s3fs filesystem *base* whose every request runs under ``deadline``.

    Set the instance's ``deadline`` attribute (seconds) after making it.
    """
    import asyncio

    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError
    from fsspec.asyn import sync_wrapper

    class DeadlineS3FileSystem(base):  # type: ignore[misc, valid-type]
        deadline: float = S3Limits.deadline

        async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
            try:
                async with asyncio.timeout(self.deadline) as limit:
                    return await super()._call_s3(method, *args, **kwargs)
            except TimeoutError:
                if not limit.expired():
                    raise
                raise S3Timeout(
                    f"{self._endpoint()} timed out: no answer to {_operation(method)} "
                    f"within the {self.deadline:g} s deadline ({ENV_DEADLINE})"
                ) from None
            except (ConnectTimeoutError, ReadTimeoutError) as exc:
                # botocore's retries are spent: every attempt timed out.
                raise S3Timeout(describe(exc, _operation(method))) from exc

        # s3fs's own sync wrapper (used by its files: parts, multipart
        # uploads) names the base class's function: point it at this one.
        call_s3 = sync_wrapper(_call_s3)

        def _endpoint(self) -> str:
            client = getattr(self, "_s3", None)
            url = getattr(getattr(client, "meta", None), "endpoint_url", None)
            return str(url or self.client_kwargs.get("endpoint_url") or "the S3 endpoint")

    DeadlineS3FileSystem.__name__ = DeadlineS3FileSystem.__qualname__ = base.__name__
    return DeadlineS3FileSystem


def _operation(method: str) -> str:
    # s3fs names botocore methods (upload_part); S3 names operations (UploadPart).
    return "".join(part.capitalize() for part in method.split("_"))


def timed_out(exc: BaseException | None) -> bool:
    """Whether *exc*, or an exception it was raised from, is a timeout of the backend."""
    kinds: tuple[type[BaseException], ...] = (TimeoutError, S3Timeout)
    # Without botocore loaded none of its errors can exist: no need to import it.
    boto = sys.modules.get("botocore.exceptions")
    if boto is not None:
        kinds += (boto.ConnectTimeoutError, boto.ReadTimeoutError)
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, kinds):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def describe(exc: BaseException, operation: str = "", *, endpoint: str = "") -> str:
    """One line for an error of the S3 client; timeouts name the endpoint and the limit.

    Args:
        exc: the error.
        operation: the S3 operation that failed (``GetObject``), when known.
        endpoint: the store's endpoint, named when a timeout further down the
            chain surfaced as another error (s3fs turns a bare ``TimeoutError``
            of a body read into an ``IndexError`` on its way out).

    Returns:
        The line, without the object or store (the caller adds those).
    """
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

    if isinstance(exc, S3Timeout):
        return str(exc)
    to = f" to {operation}" if operation else ""
    if isinstance(exc, ReadTimeoutError):
        url = _base(exc.kwargs.get("endpoint_url", "the S3 endpoint"))
        return f"{url} timed out: no answer{to} within the read timeout ({ENV_READ})"
    if isinstance(exc, ConnectTimeoutError):
        url = _base(exc.kwargs.get("endpoint_url", "the S3 endpoint"))
        return f"{url} timed out: no connection within the connect timeout ({ENV_CONNECT})"
    if timed_out(exc):
        where = endpoint or "the S3 endpoint"
        return f"{where} timed out: no answer{to} within the read timeout ({ENV_READ})"
    return f"{type(exc).__name__}: {exc}"


def _base(url: str) -> str:
    # botocore names the request's full URL (bucket, key, upload id): the
    # endpoint is what the user set and can act on.
    scheme, sep, rest = str(url).partition("://")
    return f"{scheme}{sep}{rest.split('/', 1)[0]}" if sep else str(url)
