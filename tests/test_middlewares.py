"""The service's ASGI middlewares, driven in-process with plain ASGI messages."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from typing import Any

from starlette.requests import ClientDisconnect

from services.limits import BodySizeLimit, RequestTimeout, install_request_timeout


async def call(
    app: Any, body: bytes = b"x", headers: list | None = None, path: str = "/"
) -> list[dict]:
    """One HTTP request through ``app``; returns what it sent."""
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": headers or [],
    }
    await app(scope, receive, send)
    return sent


async def ok_app(scope: dict, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def status(sent: list[dict]) -> int:
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_timeout_answers_504_for_a_slow_app():
    async def slow(scope: dict, receive: Any, send: Any) -> None:
        await asyncio.sleep(5)

    sent = asyncio.run(call(RequestTimeout(slow, timeout=0.05)))
    assert status(sent) == 504 and b"traffic timeout" in sent[-1]["body"]


def test_timeout_leaves_no_timer_or_request_behind():
    """BentoML's own middleware kept each finished request reachable for `timeout` seconds
    (an armed timer per request): with ours, nothing of a finished request survives it."""
    survivors: list[weakref.ref] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        marker = type("Marker", (), {})()
        survivors.append(weakref.ref(marker))
        scope["marker"] = marker  # reachable from the request while it is alive
        await ok_app(scope, receive, send)

    async def many() -> int:
        middleware = RequestTimeout(app, timeout=30)
        for _ in range(50):
            assert status(await call(middleware)) == 200
        loop = asyncio.get_running_loop()
        return sum(not h.cancelled() for h in loop._scheduled)  # type: ignore[attr-defined]

    assert asyncio.run(many()) == 0
    gc.collect()
    assert all(ref() is None for ref in survivors)


def test_timeout_does_not_wait_for_an_app_that_ends_without_answering():
    async def silent(scope: dict, receive: Any, send: Any) -> None:
        return None

    async def timed() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await call(RequestTimeout(silent, timeout=30))
        return loop.time() - start

    assert asyncio.run(timed()) < 5  # not the 30 s timer


def test_install_request_timeout_makes_bentoml_apps_use_ours():
    """The app BentoML assembles (its app factory's middleware stack, which the service's
    factory extends) times out with our middleware: our 504 message, no timer left armed."""
    from bentoml._internal.server.base_app import BaseAppFactory
    from bentoml._internal.server.http import traffic
    from starlette.responses import PlainTextResponse
    from starlette.routing import BaseRoute, Route

    async def slow_endpoint(request: Any) -> PlainTextResponse:
        await asyncio.sleep(5)
        return PlainTextResponse("late")

    async def fast_endpoint(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    class Factory(BaseAppFactory):
        name = "middleware-test"

        @property
        def routes(self) -> list[BaseRoute]:
            return [
                Route("/slow", slow_endpoint, methods=["POST"]),
                Route("/fast", fast_endpoint, methods=["POST"]),
            ]

    async def requests(app: Any) -> tuple[list[dict], list[dict], int]:
        slow = await call(app, path="/slow")
        fast = await call(app, path="/fast")
        loop = asyncio.get_running_loop()
        armed = sum(not h.cancelled() for h in loop._scheduled)  # type: ignore[attr-defined]
        return slow, fast, armed

    original = traffic.TimeoutMiddleware
    try:
        install_request_timeout()
        app = Factory(timeout=0.05)()  # what BentoML does when it builds a server's app
        slow, fast, armed = asyncio.run(requests(app))
    finally:
        traffic.TimeoutMiddleware = original  # type: ignore[misc]
    assert status(slow) == 504
    assert json.loads(slow[-1]["body"])["error"].endswith("(traffic timeout).")  # ours
    assert status(fast) == 200 and fast[-1]["body"] == b"ok"
    assert armed == 0  # BentoML's own would leave the fast request's 0.05 s timer armed


def test_body_limit_rejects_by_declared_and_by_streamed_size():
    limited = BodySizeLimit(ok_app, max_bytes=10)
    declared = asyncio.run(call(limited, b"x" * 11, [(b"content-length", b"11")]))
    assert status(declared) == 413
    assert "10-byte limit" in json.loads(declared[-1]["body"])["error"]
    streamed = asyncio.run(call(limited, b"x" * 11))  # no Content-Length (chunked upload)
    assert status(streamed) == 413
    assert status(asyncio.run(call(limited, b"x" * 10))) == 200


def test_body_limit_lets_a_vanished_client_go_quietly():
    async def reader(scope: dict, receive: Any, send: Any) -> None:
        raise ClientDisconnect()  # what Starlette raises when the client hung up mid-body

    assert asyncio.run(call(BodySizeLimit(reader, max_bytes=10))) == []
