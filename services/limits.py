"""ASGI middlewares that bound what one request may cost.

* ``BodySizeLimit`` refuses oversized request bodies before anything reads them, and lets a
  client that hangs up mid-upload go quietly (no traceback per dropped connection).
* ``RequestTimeout`` is BentoML's ``traffic.timeout`` middleware without its leak (see there);
  ``install_request_timeout`` puts it in BentoML's place.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import ClientDisconnect

Scope = dict[str, Any]


async def send_json_error(send: Any, status: int, message: str) -> None:
    """Answer ``{"error": message}`` with ``status`` straight from a middleware."""
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """413 for a body over ``max_bytes``: by Content-Length up front, else while streaming."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send, int(declared))
            return
        seen = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send, seen)
        except ClientDisconnect:  # the client is gone: nobody to answer, nothing went wrong
            return

    async def _reject(self, send: Any, size: int) -> None:
        await send_json_error(
            send,
            413,
            f"request body of {size} bytes is over the {self.max_bytes}-byte limit "
            "(serving.max_request_bytes).",
        )


class _TooLarge(Exception):
    pass


class RequestTimeout:
    """504 when a request has not started its response within ``timeout`` seconds.

    A drop-in for BentoML's ``TimeoutMiddleware`` (bentoml 1.4.x), which arms
    ``loop.call_later(timeout, ...)`` per request and never cancels it: every finished request
    stays reachable for ``timeout`` seconds (its future, its context with the tracing span...,
    ~100 objects). At ~600 requests/s per worker and the 30 s timeout that is millions of live
    objects, and full garbage collections grew to 200 ms, once a second: the service's p99.
    Here the timer is cancelled as soon as the response starts or the app returns, and an app
    that ends without answering no longer holds its connection until the timer fires."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    @staticmethod
    def _expire(waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(self.timeout, self._expire, waiter)

        async def started_send(message: dict[str, Any]) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, started_send))
        task.add_done_callback(lambda _: None if waiter.done() else waiter.set_result(None))
        try:
            await waiter
        except TimeoutError:
            if task.cancel():
                await send_json_error(
                    send, 504, f"the request took over {self.timeout:g} s (traffic timeout)."
                )
            return
        finally:
            timer.cancel()
        await task


def install_request_timeout() -> None:
    """Make BentoML build its apps with ``RequestTimeout`` (it looks the class up by name in
    ``bentoml._internal.server.http.traffic`` when it assembles the middleware stack, which
    happens after the service module is imported)."""
    from bentoml._internal.server.http import traffic

    traffic.TimeoutMiddleware = RequestTimeout  # type: ignore[misc, assignment]
