"""The service's ASGI middlewares, driven in-process with plain ASGI messages."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from http import HTTPStatus
from pathlib import Path
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


def test_timeout_of_a_body_that_never_finished_arriving_is_408_not_504():
    """A slow upload is the client's problem (408), not the server's (504): the alert rules
    count 5xx as server errors. The same timeout once the body is in is still a 504."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def reads_body(scope: dict, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(5)

    async def slow_client(first_only: bool) -> None:
        chunks = [{"type": "http.request", "body": b"x" * 10, "more_body": True}]
        if not first_only:
            chunks.append({"type": "http.request", "body": b"y", "more_body": False})

        async def receive() -> dict:
            if chunks:
                return chunks.pop(0)
            await asyncio.sleep(5)  # the rest of the body never comes
            return {"type": "http.disconnect"}

        scope = {"type": "http", "method": "POST", "path": "/", "root_path": "",
                 "query_string": b"", "headers": [(b"content-length", b"11")]}  # fmt: skip
        await RequestTimeout(reads_body, timeout=0.05)(scope, receive, send)

    asyncio.run(slow_client(first_only=True))
    assert status(sent) == 408 and b"before its body had all arrived" in sent[-1]["body"]
    sent.clear()
    asyncio.run(slow_client(first_only=False))
    assert status(sent) == 504


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
        await call(RequestTimeout(silent, timeout=3600))
        return loop.time() - start

    # Not a speed claim: waiting for the hour-long timer would take an hour, not a minute.
    assert asyncio.run(timed()) < 60


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


async def call_chunked(
    app: Any, body: bytes, headers: list, path: str = "/", chunk: int = 7, method: str = "POST"
) -> list[dict]:
    """One request whose body arrives in ``chunk``-byte pieces (as a slow upload does)."""
    sent: list[dict] = []
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [
        {"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1}
        for i, piece in enumerate(pieces)
    ]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": headers,
    }
    await app(scope, receive, send)
    return sent


async def form_app(scope: dict, receive: Any, send: Any) -> None:
    """Parses the form like BentoML does, and answers 500 if that fails (as BentoML does)."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    try:
        form = await Request(scope, receive).form()
        response = JSONResponse({"fields": sorted(form.keys())})
    except Exception:
        response = JSONResponse({"error": "An unexpected error has occurred"}, status_code=500)
    await response(scope, receive, send)


def multipart_body(*parts: tuple[str, str | None, bytes]) -> tuple[bytes, list]:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        body += f"--b0\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    body += b"--b0--\r\n"
    return body, [(b"content-type", b"multipart/form-data; boundary=b0")]


def test_upload_forms_refuse_what_the_endpoint_does_not_take():
    """Checked while the body streams in (7-byte pieces here): a refusal is the client's 4xx
    with the reason, never the 500 the form parser behind it would answer."""
    from services.limits import FormSpec, UploadForms

    spec = FormSpec(files={"image": 1, "images": 3}, values=frozenset({"top_k"}))
    guarded = UploadForms(form_app, {"/up": spec}, max_field_bytes=64, max_filename_bytes=20)
    cases = [
        ([("image", "a.png", b"PNG"), ("images", "b.png", b"x"), ("top_k", None, b"3")], 200, ""),
        ([("image", None, b"http://example.com/cat.jpg")], 400, "not a text value"),
        ([("picture", "a.png", b"x"), ("image", "a.png", b"x")], 400, "unknown field 'picture'"),
        ([("image", "a.png", b"x"), ("image", "b.png", b"x")], 400, "takes one file"),
        ([("image", "a.png", b"x")] + [("images", "b.png", b"x")] * 4, 413, "over 3 files"),
        ([("image", "a.png", b"x"), ("top_k", "t.txt", b"3")], 400, "text field"),
        ([("image", "a.png", b"x"), ("top_k", None, b"1" * 65)], 400, "over 64 bytes"),
        ([("image", "a.png", b"x"), ("top_k", None, b"1"), ("top_k", None, b"2")], 400, "2 times"),
        ([("image", "x" * 21, b"x")], 400, "max_filename_bytes"),
        ([("top_k", None, b"3")], 400, "no image"),
    ]  # fmt: skip
    for parts, expected, fragment in cases:
        body, headers = multipart_body(*parts)
        sent = asyncio.run(call_chunked(guarded, body, headers, path="/up"))
        assert status(sent) == expected, (parts, sent)
        assert fragment in json.loads(sent[-1]["body"]).get("error", ""), (parts, sent)
    truncated, headers = multipart_body(("image", "a.png", b"x"))
    sent = asyncio.run(call_chunked(guarded, truncated[:-10], headers, path="/up"))
    assert status(sent) == 400 and b"truncated" in sent[-1]["body"]
    for content_type, expected in ((b"application/json", 415), (b"multipart/form-data", 400)):
        sent = asyncio.run(call(guarded, b"{}", [(b"content-type", content_type)], path="/up"))
        assert status(sent) == expected
    assert status(asyncio.run(call(guarded, b"", [], path="/up"))) == 400
    # Other paths, and other methods on the same path, pass untouched.
    passing = UploadForms(ok_app, {"/up": spec}, 64, 20)
    assert status(asyncio.run(call_chunked(passing, b"x", [], path="/elsewhere"))) == 200
    assert status(asyncio.run(call_chunked(passing, b"", [], path="/up", method="GET"))) == 200


def test_error_bodies_give_every_refusal_one_json_shape():
    from services.limits import ErrorBodies

    def answering(status_code: int, body: bytes, content_type: bytes) -> Any:
        async def app(scope: dict, receive: Any, send: Any) -> None:
            headers = [(b"content-type", content_type)]
            await send({"type": "http.response.start", "status": status_code, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        return ErrorBodies(app)

    def error(app: Any) -> tuple[int, str]:
        sent = asyncio.run(call(app))
        return status(sent), json.loads(sent[-1]["body"])["error"]

    assert error(answering(404, b"Not Found", b"text/plain")) == (
        404,
        "no such endpoint: see /docs.json for the API.",
    )
    assert error(answering(415, b'[{"error": "bad type"}]', b"application/json")) == (
        415,
        "bad type",
    )
    pydantic = b'{"error": "1 validation error", "detail": [{"loc": ["top_k"], "msg": "not int"}]}'
    assert error(answering(400, pydantic, b"application/json")) == (400, "top_k: not int")
    leaky = b'{"error": "registry http://bob:pw@mlflow:5000 is down"}'
    assert error(answering(503, leaky, b"application/json")) == (
        503,
        "registry http://***@mlflow:5000 is down",
    )
    ok = asyncio.run(call(answering(200, b"fine", b"text/plain")))
    assert status(ok) == 200 and ok[-1]["body"] == b"fine"


def test_api_token_is_checked_in_constant_time_and_open_paths_stay_open():
    from services.limits import ApiToken

    guarded = ApiToken(ok_app, token="t0ken", open_paths=["/livez"])
    for headers in ([], [(b"authorization", b"Bearer nope")], [(b"authorization", b"t0ken")]):
        sent = asyncio.run(call(guarded, headers=headers, path="/classify"))
        assert status(sent) == 401 and b"Authorization: Bearer" in sent[-1]["body"]
    right = [(b"authorization", b"Bearer t0ken")]
    assert status(asyncio.run(call(guarded, headers=right, path="/classify"))) == 200
    assert status(asyncio.run(call(guarded, path="/livez"))) == 200
    assert status(asyncio.run(call(ApiToken(ok_app, None, []), path="/classify"))) == 200


def test_task_limit_counts_bytes_and_drops_expired_tasks(tmp_path):
    import sqlite3

    from _bentoml_impl.tasks import Sqlite3Store

    from services.limits import TaskLimit

    store = tmp_path / "task_result.db"
    Sqlite3Store.init_db(str(store))
    with sqlite3.connect(store) as conn:
        conn.execute(
            "INSERT INTO result (task_id, name, input, status, created_at) VALUES "
            "('old', 'c', zeroblob(5000), 'completed', datetime('now', '-2 hours')), "
            "('new', 'c', zeroblob(3000), 'in_progress', CURRENT_TIMESTAMP)"
        )
    limit = TaskLimit(
        ok_app,
        routes=["/classify_async"],
        max_tasks=2,
        max_bytes=4000,
        lifetime_s=3600,
        max_request_bytes=1000,
        retry_after_s=1,
        store_file=lambda: str(store),
    )
    assert limit.usage() == (1, 3000)  # the two-hour-old task is gone
    length = [(b"content-length", b"600")]  # 800 bytes once base64-encoded: 3800 <= 4000
    sent = asyncio.run(call(limit, headers=length, path="/classify_async/submit"))
    assert status(sent) == 200
    sent = asyncio.run(call(limit, path="/classify_async/submit"))  # unknown size: 1333 bytes
    assert status(sent) == 429 and (b"retry-after", b"1") in sent[0]["headers"]
    assert b"serving.max_task_bytes" in sent[-1]["body"]
    with sqlite3.connect(store) as conn:
        conn.execute("INSERT INTO result (task_id, name, status) VALUES ('x', 'c', 'completed')")
    sent = asyncio.run(call(limit, headers=length, path="/classify_async/submit"))
    assert status(sent) == 429 and b"serving.max_tasks" in sent[-1]["body"]
    assert status(asyncio.run(call(limit, path="/classify"))) == 200  # not a task route


def test_task_limit_purges_expired_tasks_once_per_interval_not_on_every_request(tmp_path):
    """The purge is a write that competes with BentoML's inserts: on every request it made a
    burst of submissions lose one to "database is locked". It runs once per interval."""
    import sqlite3

    from _bentoml_impl.tasks import Sqlite3Store

    from services.limits import TaskLimit

    store = tmp_path / "task_result.db"
    Sqlite3Store.init_db(str(store))

    def add_expired(task_id: str) -> None:
        with sqlite3.connect(store) as conn:
            conn.execute(
                "INSERT INTO result (task_id, name, input, status, created_at) VALUES "
                "(?, 'c', zeroblob(10), 'completed', datetime('now', '-2 hours'))",
                (task_id,),
            )

    limit = TaskLimit(
        ok_app, routes=["/classify_async"], max_tasks=10, max_bytes=10**6, lifetime_s=3600,
        max_request_bytes=1000, retry_after_s=1, store_file=lambda: str(store),
    )  # fmt: skip
    assert limit.purge_interval_s == 5.0  # min(5 s, a tenth of the lifetime)
    add_expired("a")
    assert limit.usage() == (0, 0)  # the first look purges
    add_expired("b")
    for _ in range(20):  # a burst: counted, not purged again
        asyncio.run(call(limit, path="/classify_async/status"))
    assert limit.usage() == (1, 10)
    limit._purged_at -= limit.purge_interval_s  # the interval has passed
    assert limit.usage() == (0, 0)


def _streamed(chunks: list[bytes]) -> tuple[Any, list[str]]:
    """A receive() over ``chunks`` that logs, in one list with the sends, what happened when."""
    events: list[str] = []
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict:
        if not pending:
            return {"type": "http.disconnect"}
        events.append("read")
        return pending.pop(0)

    return receive, events


def test_lingering_close_reads_the_rest_of_a_refused_body_before_the_answer_ends():
    """An early 413 is sent only once the client has finished sending (up to a bound): a
    close while it still sends would reset the connection and destroy the answer."""
    from services.limits import LingeringClose

    async def refusing_app(scope: dict, receive: Any, send: Any) -> None:
        await receive()  # one chunk, then refuse without reading the rest
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b"too large"})

    async def unread_refusal(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b"no token"})

    def run(
        max_bytes: int, app: Any = refusing_app, chunks: int = 5, headers: list | None = None
    ) -> list[str]:
        receive, events = _streamed([b"a" * 10] * chunks)

        async def send(message: dict) -> None:
            events.append(message["type"].removeprefix("http.response."))

        scope = {"type": "http", "method": "POST", "path": "/", "headers": headers or []}
        asyncio.run(LingeringClose(app, max_bytes, seconds=5)(scope, receive, send))
        return events

    # The app read 1 chunk; the other 4 are read before the answer's body is sent.
    assert run(max_bytes=1000) == ["read", "start", "read", "read", "read", "read", "body"]
    # Past max_bytes of leftovers it stops reading (and the server may close).
    assert run(max_bytes=15) == ["read", "start", "read", "read", "body"]
    # A request the app read completely is not read again.
    assert run(max_bytes=1000, app=ok_app, chunks=1) == ["read", "start", "body"]
    # A declared body too large to drain, or a client waiting for "100 Continue" before it
    # sends anything: answered at once, nothing read (reading would invite the body).
    too_large = [(b"content-length", b"5000")]
    assert run(max_bytes=1000, app=unread_refusal, headers=too_large) == ["start", "body"]
    expect = [(b"expect", b"100-continue")]
    assert run(max_bytes=1000, app=unread_refusal, headers=expect) == ["start", "body"]
    assert run(max_bytes=1000, app=unread_refusal) == ["start"] + ["read"] * 5 + ["body"]


def test_lingering_close_answers_a_client_that_stops_sending_after_its_bound():
    """A client that sends part of its body and then waits for the answer gets it once
    ``seconds`` have passed, instead of both sides waiting for each other."""
    from services.limits import LingeringClose

    async def refusing_app(scope: dict, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b"too large"})

    async def stalled_client() -> list[str]:
        sent: list[str] = []
        first = [{"type": "http.request", "body": b"a", "more_body": True}]

        async def receive() -> dict:
            if first:
                return first.pop()
            await asyncio.Event().wait()  # never more body, never a disconnect
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            sent.append(message["type"])

        scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
        app = LingeringClose(refusing_app, max_bytes=1 << 20, seconds=0.05)
        await asyncio.wait_for(app(scope, receive, send), timeout=30)
        return sent

    assert asyncio.run(stalled_client()) == ["http.response.start", "http.response.body"]


def test_refusals_are_logged_in_one_line_and_server_faults_with_their_traceback():
    """BentoML logs every exception an endpoint raises with a traceback: the filter turns a
    refusal (a 4xx BentoML error, pydantic's validation error) into one WARNING line."""
    import logging
    import sys

    from bentoml.exceptions import BentoMLException
    from pydantic import BaseModel, ValidationError

    from services.limits import RefusalsInOneLine

    class Form(BaseModel):
        image: bytes

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            info = sys.exc_info()
        return logging.LogRecord(
            "bentoml", logging.ERROR, __file__, 1, "Exception on %s [%s]", ("/classify", "POST"),
            info,
        )  # fmt: skip

    refused = BentoMLException("x.png is not an image", error_code=HTTPStatus(415))
    try:
        Form()
    except ValidationError as exc:
        invalid = exc
    fault = RuntimeError("a bug")
    out = []
    for exc in (refused, invalid, fault):
        r = record(exc)
        assert RefusalsInOneLine().filter(r)
        out.append(r)
    assert out[0].getMessage() == "Exception on /classify [POST] -> 415: x.png is not an image"
    assert out[0].exc_info is None and out[0].levelname == "WARNING"
    assert out[1].getMessage().startswith("Exception on /classify [POST] -> 400: 1 validation")
    assert out[2].exc_info is not None and out[2].levelname == "ERROR"  # a bug keeps its trace


def test_metrics_label_a_request_by_its_route_and_any_other_path_as_one():
    """Random paths must not each make a Prometheus series (300 of them grew /metrics to 25 MB):
    the label is an endpoint, one of its task actions, the page, a built-in path, or other."""
    from services.limits import OTHER_ROUTE, route_label

    routes = ["/classify", "/classify_async", "/model_info"]
    page = ["/ui/", "/ui/api/classify", "/ui/api/examples/{index}"]
    for path, label in [
        ("/classify", "/classify"),
        ("/classify_async/submit", "/classify_async/submit"),
        ("/classify_async/status", "/classify_async/status"),
        ("/ui/", "/ui/"),
        ("/ui/api/classify", "/ui/api/classify"),  # the alert rules select it by name
        ("/ui/api/examples/3", "/ui/api/examples/{index}"),
        ("/ui/api/examples/3/4", OTHER_ROUTE),
        ("/ui/anything", OTHER_ROUTE),
        ("/livez", "/livez"),
        ("/metrics", "/metrics"),
        ("/classify/../../etc/passwd", OTHER_ROUTE),
        ("/classify_async/anything", OTHER_ROUTE),
        ("/wp-admin.php", OTHER_ROUTE),
        ("/x" * 500, OTHER_ROUTE),
    ]:
        assert route_label(path, routes, page) == label, path


def test_request_temp_folders_beyond_the_pools_bound_are_removed(tmp_path, monkeypatch):
    """BentoML's pool kept every request folder it made: after a burst of 40 concurrent
    requests, 40 folders stayed in /dev/shm. The bounded pool keeps KEEP_REQUEST_DIRS."""
    import tempfile

    from bentoml._internal import context

    from services.limits import bound_request_temp_dirs, bounded_tempdir_pool

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pool = bounded_tempdir_pool(keep=4)
    folders = [pool.acquire() for _ in range(40)]  # a burst: 40 requests at once
    for i, folder in enumerate(folders):
        (Path(folder) / f"upload-{i}.png").write_bytes(b"x")
    for folder in folders:
        pool.release(folder)
    kept = set(tmp_path.iterdir())
    assert len(kept) == 4  # the pool's idle folders, emptied
    assert not list(tmp_path.rglob("*.png"))
    assert Path(pool.acquire()) in kept  # reused, not made anew
    monkeypatch.setattr(context, "request_tempdir_pool", context.request_tempdir_pool)
    bound_request_temp_dirs()
    assert type(context.request_tempdir_pool).__name__ == "BoundedTempfilePool"
