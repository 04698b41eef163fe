"""ASGI middlewares that bound what one request may cost, and keep every refusal a clear 4xx.

* ``ErrorBodies`` gives every error answer one shape, ``{"error": "<what is wrong>"}`` (BentoML's
  404/405 are plain text, its 4xx a one-element list, pydantic's a count of errors), with any
  credentials of a URL scrubbed out.
* ``ApiToken`` asks for ``Authorization: Bearer <token>`` when the service has a token.
* ``BodySizeLimit`` refuses oversized request bodies: by Content-Length before anything reads
  them, and by counting while a chunked body streams in.
* ``UploadForms`` checks a multipart upload's structure while it streams in (field names, files
  where files belong, how many, the text fields' sizes), before BentoML's own form parsing sees
  it: that code answers 500 for a text value in a file field, a wrong field name, too many parts
  or a broken body, and it fetches a URL given as a "file".
* ``TaskLimit`` bounds BentoML's async-task store by count, bytes and lifetime.
* ``RequestTimeout`` is BentoML's ``traffic.timeout`` middleware without its leak (see there);
  ``install_request_timeout`` puts it in BentoML's place.

A middleware that refuses a body the app is already reading hands the app a disconnect (so the
app stops, as it would for a vanished client), swallows whatever the app answers to that, and
sends its own 4xx: the client gets the reason, never a 500 or a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from imageclf.tracking import scrub_credentials

Scope = dict[str, Any]
Headers = list[tuple[bytes, bytes]]


async def send_json_error(
    send: Any, status: int, message: str, headers: Headers | None = None
) -> None:
    """Answer ``{"error": message}`` with ``status`` straight from a middleware."""
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Refusal(Exception):
    """A request refused by a middleware: the status, the message, extra headers."""

    def __init__(self, status: int, message: str, headers: Headers | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


BodyCheck = Callable[[bytes, bool], None]


async def run_checked(app: Any, scope: Scope, receive: Any, send: Any, check: BodyCheck) -> None:
    """Run ``app`` while ``check(chunk, last)`` sees each body chunk; a Refusal it raises
    becomes the answer (the app sees a disconnect and its own answer is dropped)."""
    refusal: Refusal | None = None
    started = False

    async def checked_receive() -> dict[str, Any]:
        nonlocal refusal
        if refusal is not None:
            return {"type": "http.disconnect"}
        message = await receive()
        if message["type"] == "http.request":
            try:
                check(message.get("body", b""), not message.get("more_body", False))
            except Refusal as exc:
                refusal = exc
                return {"type": "http.disconnect"}
        return message

    async def checked_send(message: dict[str, Any]) -> None:
        nonlocal started
        if refusal is not None:
            return  # the app's answer to the disconnect we made up
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        await app(scope, checked_receive, checked_send)
    except ClientDisconnect:
        if refusal is None:  # the client is gone: nobody to answer, nothing went wrong
            return
    except Exception:
        if refusal is None:
            raise
    if refusal is not None and not started:
        await send_json_error(send, refusal.status, refusal.message, refusal.headers)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value
    return None


class BodySizeLimit:
    """413 for a body over ``max_bytes``: by Content-Length up front, else while streaming."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_json_error(send, 413, self._message(int(declared)))
            return
        seen = 0

        def count(chunk: bytes, last: bool) -> None:
            nonlocal seen
            seen += len(chunk)
            if seen > self.max_bytes:
                raise Refusal(413, self._message(seen, streamed=True))

        await run_checked(self.app, scope, receive, send, count)

    def _message(self, size: int, streamed: bool = False) -> str:
        size_text = "request body" if streamed else f"request body of {size} bytes"
        return f"{size_text} is over the {self.max_bytes}-byte limit (serving.max_request_bytes)."


@dataclass(frozen=True)
class FormSpec:
    """What one endpoint's multipart form may hold: file fields (with how many files each may
    take) and text fields (at most once each)."""

    files: dict[str, int]
    values: frozenset[str]

    def describe(self) -> str:
        files = ", ".join(f"'{name}' (file)" for name in self.files)
        values = ", ".join(f"'{name}'" for name in sorted(self.values))
        return files + (f" and {values}" if values else "")


class _FormChecker:
    """Feeds a multipart body through python-multipart's streaming parser and refuses, as
    early as it can tell, whatever ``spec`` does not allow."""

    def __init__(
        self, spec: FormSpec, boundary: bytes, max_field_bytes: int, max_filename_bytes: int
    ) -> None:
        self.spec = spec
        self.max_field_bytes = max_field_bytes
        self.max_filename_bytes = max_filename_bytes
        self.counts: dict[str, int] = {}
        self.parts = 0
        self.ended = False
        self.header_bytes = 0
        self.header_name = b""
        self.disposition = b""
        self.value_field: str | None = None
        self.value_bytes = 0
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_end": self._end,
            },
        )

    def __call__(self, chunk: bytes, last: bool) -> None:
        try:
            if chunk:
                self.parser.write(chunk)
            if last:
                self.parser.finalize()
        except FormParserError as exc:
            raise Refusal(400, f"the multipart body is malformed ({exc}).") from exc
        if last:
            self._check_complete()

    def _part_begin(self) -> None:
        self.parts += 1
        self.header_bytes = 0
        self.header_name = b""
        self.disposition = b""
        self.value_field = None
        self.value_bytes = 0

    def _grow_headers(self, size: int) -> None:
        # A part's headers: a file name (checked on its own below) and little else.
        self.header_bytes += size
        most = self.max_field_bytes + self.max_filename_bytes
        if self.header_bytes > most:
            raise Refusal(
                400,
                f"part {self.parts} has over {most} bytes of headers (serving.max_field_bytes "
                "+ max_filename_bytes).",
            )

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._grow_headers(end - start)
        self.header_name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._grow_headers(end - start)
        if self.header_name.lower() == b"content-disposition":
            self.disposition += data[start:end]

    def _header_end(self) -> None:
        self.header_name = b""

    def _headers_finished(self) -> None:
        kind, options = parse_options_header(self.disposition)
        name = options.get(b"name")
        if kind != b"form-data" or name is None:
            raise Refusal(
                400,
                f"part {self.parts} of the form has no 'Content-Disposition: form-data; "
                f"name=...' header: this endpoint takes {self.spec.describe()}.",
            )
        field = name.decode("utf-8", "replace")
        count = self.counts[field] = self.counts.get(field, 0) + 1
        filename = options.get(b"filename")
        if field in self.spec.files:
            self._check_file(field, filename, count)
        elif field in self.spec.values:
            if filename is not None:
                raise Refusal(400, f"'{field}' is a text field, not a file upload.")
            if count > 1:
                raise Refusal(400, f"the field '{field}' is given {count} times: send it once.")
            self.value_field = field
        else:
            raise Refusal(
                400, f"unknown field '{field}': this endpoint takes {self.spec.describe()}."
            )

    def _check_file(self, field: str, filename: bytes | None, count: int) -> None:
        if filename is None:
            raise Refusal(
                400,
                f"'{field}' must be a file upload (e.g. curl -F {field}=@photo.jpg), "
                "not a text value; URLs are not fetched.",
            )
        base = filename.replace(b"\\", b"/").rsplit(b"/", 1)[-1]
        if b"\0" in filename or len(base) > self.max_filename_bytes:
            raise Refusal(
                400,
                f"the file name of '{field}' is over {self.max_filename_bytes} bytes or "
                "holds a NUL byte (serving.max_filename_bytes): rename the file.",
            )
        most = self.spec.files[field]
        if count > most:
            if most == 1:
                raise Refusal(400, f"'{field}' takes one file: send several to the batch endpoint.")
            raise Refusal(
                413,
                f"over {most} files in '{field}': {most} images is the limit per request "
                "(serving.max_images_per_request).",
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.value_field is None:
            return
        self.value_bytes += end - start
        if self.value_bytes > self.max_field_bytes:
            raise Refusal(
                400,
                f"the text field '{self.value_field}' is over {self.max_field_bytes} bytes "
                "(serving.max_field_bytes).",
            )

    def _end(self) -> None:
        self.ended = True

    def _check_complete(self) -> None:
        if not self.ended:
            raise Refusal(
                400, "the multipart body ends before its closing boundary: it is truncated."
            )
        for field in self.spec.files:
            if field not in self.counts:
                raise Refusal(
                    400,
                    f"no image: send the file in the field '{field}' "
                    f"(e.g. curl -F {field}=@photo.jpg).",
                )


class UploadForms:
    """Multipart uploads checked against each endpoint's form, while the body streams in."""

    def __init__(
        self,
        app: Any,
        forms: dict[str, FormSpec],
        max_field_bytes: int,
        max_filename_bytes: int,
    ) -> None:
        self.app = app
        self.forms = forms
        self.max_field_bytes = max_field_bytes
        self.max_filename_bytes = max_filename_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        spec = self.forms.get(scope.get("path", "")) if scope["type"] == "http" else None
        if spec is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        field = next(iter(spec.files))
        how = f"send multipart/form-data with the image in the field '{field}' " + (
            f"(e.g. curl -F {field}=@photo.jpg)."
        )
        content_type = _header(scope, b"content-type")
        if content_type is None:
            await send_json_error(send, 400, f"no image: {how}")
            return
        kind, options = parse_options_header(content_type)
        if kind != b"multipart/form-data":
            shown = kind.decode("latin-1")[:100] or "untyped"
            await send_json_error(send, 415, f"a body of type {shown} cannot carry an image: {how}")
            return
        boundary = options.get(b"boundary")
        if not boundary or len(boundary) > 70:  # RFC 2046: 1 to 70 characters
            await send_json_error(
                send, 400, f"multipart/form-data without a valid boundary parameter: {how}"
            )
            return
        checker = _FormChecker(spec, boundary, self.max_field_bytes, self.max_filename_bytes)
        await run_checked(self.app, scope, receive, send, checker)


class LingeringClose:
    """Read (and drop) what is left of a refused request's body before its answer ends.

    A server that answers early (413, 401, 415...) and closes while the client is still
    sending makes the client's kernel get a TCP reset, which can destroy the answer before
    the client reads it: the client sees a dropped connection instead of the 4xx (the soak
    benchmark saw 4 in 162 oversized chunked uploads). Draining the rest of the body first,
    up to ``max_bytes`` more and for at most ``seconds`` (past either, closing is the cheaper
    evil: a client may also stop sending and wait for the answer), lets the answer arrive."""

    def __init__(self, app: Any, max_bytes: int, seconds: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            # Too large to drain anyway: answer and close at once.
            await self.app(scope, receive, send)
            return
        # A client that asked "Expect: 100-continue" sends nothing until a read says go on:
        # if nothing was read, reading now would only invite the body it is about to refuse.
        waits_for_go = (_header(scope, b"expect") or b"").lower() == b"100-continue"
        body_done = False
        read_any = False

        async def watched_receive() -> dict[str, Any]:
            nonlocal body_done, read_any
            read_any = True
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def draining_send(message: dict[str, Any]) -> None:
            nonlocal body_done
            final = message["type"] == "http.response.body" and not message.get("more_body")
            if final and not body_done and (read_any or not waits_for_go):
                body_done = True
                with contextlib.suppress(TimeoutError):  # the client stopped sending
                    await asyncio.wait_for(self._drain(receive), self.seconds)
            await send(message)

        await self.app(scope, watched_receive, draining_send)

    async def _drain(self, receive: Any) -> None:
        drained = 0
        while drained <= self.max_bytes:
            rest = await receive()
            if rest["type"] != "http.request" or not rest.get("more_body", False):
                return
            drained += len(rest.get("body", b""))


class ApiToken:
    """401 unless ``Authorization: Bearer <token>``, when a token is set; ``open_paths``
    (health, metrics, the page's HTML) stay open so probes and scrapers need no secret."""

    def __init__(self, app: Any, token: str | None, open_paths: Iterable[str]) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if self.token is None or scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        scheme, _, given = (_header(scope, b"authorization") or b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token):
            await self.app(scope, receive, send)
            return
        await send_json_error(
            send,
            401,
            "this service needs an API token: send the header 'Authorization: Bearer <token>' "
            "(the value of IMAGECLF_API_TOKEN where the service runs).",
            [(b"www-authenticate", b"Bearer")],
        )


class ErrorBodies:
    """Every answer of status 400 and above as ``{"error": "<message>"}``, credentials in URLs
    scrubbed: one shape for clients to read, whichever layer refused the request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def rewriting_send(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = json.dumps({"error": error_message(start, b"".join(chunks))}).encode()
            headers = [
                (k, v)
                for k, v in start.get("headers", [])
                if k.lower() not in (b"content-type", b"content-length")
            ]
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewriting_send)


def error_message(start: dict[str, Any], body: bytes) -> str:
    """The message of an error answer, whatever shape its layer gave it."""
    status = start["status"]
    try:
        data = json.loads(body)
    except ValueError:
        data = body.decode("utf-8", "replace").strip()
    if isinstance(data, list) and len(data) == 1:  # BentoML's 4xx: [{"error": ...}]
        data = data[0]
    if isinstance(data, dict):
        detail = data.get("detail")
        if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
            # pydantic's errors: "1 validation error for Input" says less than where and what
            data = "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', []) if p not in ('body', 'path'))}"
                f": {d.get('msg', '')}".lstrip(": ")
                for d in detail
            )
        else:
            data = data.get("error") or detail or ""
    message = str(data) or HTTPStatus(status).phrase
    if status == 404 and message == "Not Found":
        message = "no such endpoint: see /docs.json for the API."
    elif status == 405 and message == "Method Not Allowed":
        message = "this endpoint does not take that method (the API endpoints take POST)."
    return scrub_credentials(message)


class TaskLimit:
    """BentoML's async-task store bounded by count, bytes and lifetime.

    BentoML keeps every submitted task's whole request body (base64) and its result in one
    SQLite file shared by the workers, for 24 hours, with no limit. Here a request to a task
    route drops tasks older than ``lifetime_s`` (results a client did not fetch in time), at
    most once every ``purge_interval_s`` per worker: a DELETE on every request was a write
    competing with BentoML's own inserts, and under 40 concurrent submissions one of them
    waited past BentoML's 5 s busy timeout and was lost ("database is locked"). Counting is a
    read, which the store's WAL journal never makes a writer wait for. A submission that would
    take the store over ``max_tasks`` or ``max_bytes`` is answered 429 with Retry-After. A
    worker counts its own submissions still in flight; across workers, ones that arrive at the
    same instant can overshoot the bounds by one each.
    """

    def __init__(
        self,
        app: Any,
        routes: Iterable[str],
        max_tasks: int,
        max_bytes: int,
        lifetime_s: float,
        max_request_bytes: int,
        retry_after_s: int,
        store_file: Callable[[], str],
    ) -> None:
        self.app = app
        self.routes = tuple(routes)
        self.max_tasks = max_tasks
        self.max_bytes = max_bytes
        self.lifetime_s = lifetime_s
        self.max_request_bytes = max_request_bytes
        self.retry_after = str(retry_after_s).encode()
        self.store_file = store_file
        self._pending_tasks = 0
        self._pending_bytes = 0
        self.purge_interval_s = min(5.0, lifetime_s / 10)
        self._purged_at = -math.inf

    def _route(self, path: str) -> str | None:
        for route in self.routes:
            if path.startswith(route + "/"):
                return path[len(route) + 1 :]
        return None

    def usage(self) -> tuple[int, int]:
        """(tasks, bytes) in the store, after dropping the expired ones."""
        path = self.store_file()
        if not os.path.exists(path):
            return 0, 0
        with sqlite3.connect(path, timeout=30) as conn:
            now = time.monotonic()
            if now - self._purged_at >= self.purge_interval_s:
                self._purged_at = now
                conn.execute(
                    "DELETE FROM result WHERE created_at < datetime('now', ?)",
                    (f"-{self.lifetime_s} seconds",),
                )
            count, size = conn.execute(
                "SELECT count(*), coalesce(sum(length(input) + coalesce(length(result), 0)), 0)"
                " FROM result"
            ).fetchone()
        return int(count), int(size)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        action = self._route(scope.get("path", "")) if scope["type"] == "http" else None
        if action is None:
            await self.app(scope, receive, send)
            return
        if action not in ("submit", "retry"):
            await asyncio.to_thread(self.usage)  # expire old results on every look
            await self.app(scope, receive, send)
            return
        count, size = await asyncio.to_thread(self.usage)
        declared = _header(scope, b"content-length")
        incoming = int(declared) if declared and declared.isdigit() else 0
        # The store keeps the body base64-encoded; a body of unknown size may be the largest.
        incoming = (incoming or self.max_request_bytes) * 4 // 3
        # Submissions of this worker still on their way into the store count as stored.
        count, size = count + self._pending_tasks, size + self._pending_bytes
        message = None
        if count >= self.max_tasks:
            message = f"{count} tasks are stored, the limit is {self.max_tasks} (serving.max_tasks)"
        elif size + incoming > self.max_bytes:
            message = f"the task store holds {size} bytes, this task would take it over the "
            message += f"{self.max_bytes}-byte limit (serving.max_task_bytes)"
        if message is not None:
            await send_json_error(
                send,
                429,
                f"{message}: results are kept {self.lifetime_s:g} s; fetch yours, or retry later.",
                [(b"retry-after", self.retry_after)],
            )
            return
        self._pending_tasks += 1
        self._pending_bytes += incoming
        reserved = True

        def release() -> None:
            nonlocal reserved
            if reserved:
                reserved = False
                self._pending_tasks -= 1
                self._pending_bytes -= incoming

        async def releasing_send(message: dict[str, Any]) -> None:
            # BentoML answers a submission once the task is in the store (and then runs it,
            # in this same call): from here on the store itself counts it.
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app(scope, receive, releasing_send)
        finally:
            release()


class RequestTimeout:
    """504 when a request has not started its response within ``timeout`` seconds; 408 when
    that is because its body had not all arrived (a slow client is not a server error, and
    the alert rules count 5xx as the server's).

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
        has_body = _header(scope, b"content-length") not in (None, b"0") or (
            _header(scope, b"transfer-encoding") is not None
        )
        body_done = not has_body

        async def tracked_receive() -> dict[str, Any]:
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def started_send(message: dict[str, Any]) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        task = asyncio.ensure_future(self.app(scope, tracked_receive, started_send))
        task.add_done_callback(lambda _: None if waiter.done() else waiter.set_result(None))
        try:
            await waiter
        except TimeoutError:
            if task.cancel():
                if body_done:
                    status, why = 504, "(traffic timeout)."
                else:
                    status, why = 408, "before its body had all arrived: send it faster or smaller."
                await send_json_error(
                    send, status, f"the request took over {self.timeout:g} s {why}"
                )
            return
        finally:
            timer.cancel()
        await task


def install_request_timeout() -> None:
    """Make BentoML build its apps with ``RequestTimeout`` (it looks the class up by name in
    ``bentoml._internal.server.http.traffic`` when it assembles the middleware stack, which
    happens after the service module is imported and before the service object is created:
    so the service module calls this at import)."""
    from bentoml._internal.server.http import traffic

    traffic.TimeoutMiddleware = RequestTimeout  # type: ignore[misc, assignment]


# BentoML logs every exception an endpoint raises with its traceback, refusals included: a
# client sending bad images would flood the log with tracebacks of nothing wrong on the server.
BENTOML_ENDPOINT_LOGGER = "bentoml._internal.server.http_app"


def _is_refusal(exc: BaseException | None) -> int | None:
    """The 4xx status an exception answers with (a BentoML error below 500, or pydantic's
    validation error, which BentoML answers with 400), else None: a fault of the server."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return HTTPStatus.BAD_REQUEST
    code = getattr(exc, "error_code", None)
    if isinstance(code, int) and 400 <= int(code) < 500:
        return int(code)
    return None


class RefusalsInOneLine:
    """A logging filter: a refused request is one line (path, status, reason) at WARNING, not
    an ERROR with a traceback; a server fault keeps its traceback."""

    def filter(self, record: Any) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = _is_refusal(exc)
        if status is not None:
            reason = " ".join(str(exc).split())[:300]
            record.msg = f"{record.getMessage()} -> {status}: {scrub_credentials(reason)}"
            record.args = None
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = 30, "WARNING"
        return True


def log_refusals_in_one_line() -> None:
    """Put the filter on BentoML's endpoint logger, once per process."""
    import logging

    logger = logging.getLogger(BENTOML_ENDPOINT_LOGGER)
    if not any(isinstance(f, RefusalsInOneLine) for f in logger.filters):
        logger.addFilter(RefusalsInOneLine())


# BentoML's outermost middleware counts every request in Prometheus series labelled by its raw
# path: requests to random paths (401s and 404s too) made one series each, and 300 of them grew
# /metrics to 25 MB. Here the label is the route: an endpoint, a task action of one, the web
# page, a health or docs path, or "other" for anything else.
OTHER_ROUTE = "other"
TASK_ACTIONS = ("submit", "status", "get", "retry", "cancel")
BUILTIN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/docs")
_REAL_PATH = "imageclf.real_path"  # the scope key the real path travels under


def _matches(path: str, template: str) -> bool:
    """``path`` fits the route ``template`` ("/ui/api/examples/{index}": any one segment)."""
    parts, wanted = path.split("/"), template.split("/")
    return len(parts) == len(wanted) and all(
        w == p or (w.startswith("{") and w.endswith("}") and p)
        for p, w in zip(parts, wanted, strict=True)
    )


def route_label(path: str, routes: Iterable[str], page_routes: Iterable[str] = ()) -> str:
    """The metrics label of ``path``: at most one per route the service has (its endpoints,
    their task actions, the web page's routes as templates, the built-in paths)."""
    routes = list(routes)
    if path in BUILTIN_PATHS or path in routes:
        return path
    route, _, action = path.rpartition("/")
    if action in TASK_ACTIONS and route in routes:
        return path
    for template in page_routes:
        if _matches(path, template):
            return template
    return OTHER_ROUTE


class _RealPath:
    """Gives the app behind the metrics middleware the request's real path back."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if _REAL_PATH in scope:
            real = scope[_REAL_PATH]
            scope = {k: v for k, v in scope.items() if k != _REAL_PATH}
            scope["path"] = real
        await self.app(scope, receive, send)


def route_labelled(metrics_cls: Any, page_routes: list[str]) -> Any:
    """BentoML's traffic-metrics middleware, shown the route instead of the raw path."""

    class RouteLabelledMetrics:
        def __init__(self, app: Any, **options: Any) -> None:
            self.inner = metrics_cls(_RealPath(app), **options)

        async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
            if scope["type"] in ("http", "websocket"):
                from bentoml._internal.context import server_context

                label = route_label(scope["path"], server_context.service_routes, page_routes)
                scope = {**scope, "path": label, _REAL_PATH: scope["path"]}
            await self.inner(scope, receive, send)

    RouteLabelledMetrics.original = metrics_cls  # type: ignore[attr-defined]
    return RouteLabelledMetrics


def install_route_labelled_metrics(page_routes: Iterable[str]) -> None:
    """Make BentoML build its apps with route-labelled traffic metrics (looked up by name in
    ``bentoml._internal.server.http.instruments`` when the app is assembled, like the timeout
    middleware: so the service module calls this at import). ``page_routes``: the mounted web
    page's route templates ("/ui/api/classify", "/ui/api/examples/{index}"...)."""
    from bentoml._internal.server.http import instruments

    current = instruments.RunnerTrafficMetricsMiddleware
    original = getattr(current, "original", current)
    patched = route_labelled(original, list(page_routes))
    instruments.RunnerTrafficMetricsMiddleware = patched  # type: ignore[misc]


# BentoML gives each request a temp folder for its uploads from a pool that keeps every folder
# it ever made: after a burst of 100 concurrent requests, 100 empty folders stay in the upload
# temp dir (/dev/shm) for the life of the worker. The pool here keeps this many; a folder
# released beyond them is removed.
KEEP_REQUEST_DIRS = 16


def bounded_tempdir_pool(keep: int) -> Any:
    """BentoML's request temp-folder pool, keeping at most ``keep`` idle folders."""
    import shutil

    from bentoml._internal.utils.filesystem import TempfilePool

    class BoundedTempfilePool(TempfilePool):
        def release(self, dir: str) -> None:
            super().release(dir)
            with self._lock:
                extra = [self._pool.pop() for _ in range(max(len(self._pool) - keep, 0))]
            for folder in extra:
                shutil.rmtree(folder, ignore_errors=True)

    return BoundedTempfilePool(prefix="bentoml-request-")


def bound_request_temp_dirs(keep: int = KEEP_REQUEST_DIRS) -> None:
    """Put the bounded pool in BentoML's place, once per worker (its functions look the pool
    up by name at each request)."""
    from bentoml._internal import context

    if type(context.request_tempdir_pool).__name__ != "BoundedTempfilePool":
        context.request_tempdir_pool = bounded_tempdir_pool(keep)
