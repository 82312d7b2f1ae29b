"""The hot inference routes as raw ASGI, in front of FastAPI.

POST /v1/chat/completions, /v1/completions and /v1/embeddings are most of the
traffic, and the profile of a proxied request showed a third of the gateway's
CPU in the framework around the handler: Starlette's middleware stack and
exception wrappers, FastAPI's body-limit layer, routing, the Request object and
the response classes. This module answers those three routes before any of
that runs, with the same behaviour as gateway/routes/inference.py:

* the same authentication (`require_caller`), body reading and validation
  (`read_json`, `validate`), metering of refused requests, async jobs and
  `Pipeline.run`;
* the same errors: an exception is answered by the handler FastAPI would use
  (gateway/errors.py), so the OpenAI error shape is the one code path;
* the same response bytes and headers (content-length, content-type,
  SSE headers, x-request-id last), the same access log line and metrics.

Everything else (other methods and paths, a set root_path, native
OpenTelemetry) goes to FastAPI untouched, which keeps the control plane.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import orjson
from fastapi import FastAPI

from gateway.auth import require_caller
from gateway.errors import APIError
from gateway.middleware import AccessLog
from gateway.pipeline import Call, Outcome
from gateway.protocol import ENDPOINTS
from gateway.requests import new_request_id, read_json, validate
from gateway.routes.inference import SSE_HEADERS

log = logging.getLogger("bearpaw.fastpath")

ROUTES = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}

_JSON = b"application/json"
# Starlette adds the charset to text/* media types; so does this, for the same bytes.
_SSE = b"text/event-stream; charset=utf-8"
_SSE_HEADERS = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in SSE_HEADERS.items()]


class _Request:
    """What the shared helpers read from a request (auth, body, error
    handlers): its headers, the app, and its body stream."""

    __slots__ = ("headers", "app", "_receive")

    def __init__(self, headers: dict[str, str], app: FastAPI, receive: Any) -> None:
        self.headers = headers
        self.app = app
        self._receive = receive

    async def stream(self) -> AsyncIterator[bytes]:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            body = message.get("body", b"")
            if body:
                yield body
            if not message.get("more_body", False):
                return


class _ClientGone(Exception):
    """The client hung up before its request body was read."""


class FastPath:
    """ASGI app: the hot routes here, everything else to `inner` (FastAPI's stack)."""

    def __init__(self, inner: Any, app: FastAPI, access: AccessLog) -> None:
        self.inner = inner
        self.app = app
        self.access = access

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or (endpoint := ROUTES.get(scope["path"])) is None
            or scope.get("root_path")
            or getattr(self.app.state, "bearpaw", None) is None  # not started yet
        ):
            await self.inner(scope, receive, send)
            return
        request_id = new_request_id()
        started = time.perf_counter()
        status = 500
        try:
            status = await self._serve(scope, receive, send, endpoint, request_id)
        finally:
            self.access.record(
                "POST",
                scope["path"],
                scope["path"],
                status,
                time.perf_counter() - started,
                request_id,
            )

    async def _serve(
        self, scope: dict, receive: Any, send: Any, endpoint: str, request_id: str
    ) -> int:
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1")
            if key not in headers:  # the first of repeated headers, like Starlette
                headers[key] = value.decode("latin-1")
        request = _Request(headers, self.app, receive)
        try:
            outcome = await self._handle(request, endpoint, request_id, receive)
        except _ClientGone:
            return 499
        except Exception as exc:
            return await self._error(scope, receive, send, request, exc, request_id)
        if outcome.stream is not None:
            return await _send_stream(outcome, request_id, receive, send)
        await _send_json(outcome, request_id, send)
        return outcome.status

    async def _handle(
        self, request: _Request, endpoint: str, request_id: str, receive: Any
    ) -> Outcome:
        # Mirrors gateway/routes/inference.py: authenticate, read, validate
        # (metering a refused body), then async job, stream or plain call.
        caller = await require_caller(request)  # type: ignore[arg-type]
        state = self.app.state.bearpaw
        headers = request.headers
        call = Call(
            endpoint=endpoint,
            body={},
            caller=caller,
            request_id=request_id,
            cache_control=headers.get("cache-control", ""),
            cache_max_error=headers.get("x-bearpaw-cache-max-error", ""),
        )
        try:
            raw = await read_json(request, state.settings.max_body_bytes)  # type: ignore[arg-type]
            call.body = raw
            validate(ENDPOINTS[endpoint][1], raw)
        except APIError as exc:
            await state.pipeline.reject(call, exc)
            raise
        body = call.body
        if "respond-async" in headers.get("prefer", "").lower():
            jobs = state.extras.get("jobs")
            if jobs is None:
                raise APIError(400, "Async requests are not enabled on this gateway.")
            return await jobs.submit(call)
        if body.get("stream"):
            return await state.pipeline.run(call)
        return await _until_disconnect(receive, state.pipeline.run(call))

    async def _error(
        self,
        scope: dict,
        receive: Any,
        send: Any,
        request: _Request,
        exc: Exception,
        request_id: str,
    ) -> int:
        """Answers with the exception handler FastAPI would pick (most specific
        class first), so errors keep their one definition in gateway/errors.py."""
        handlers = self.app.exception_handlers
        handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
        if handler is None:
            raise exc
        if not isinstance(exc, APIError) and handler is handlers.get(Exception):
            log.error("unhandled error on %s", scope["path"], exc_info=exc)
        response = handler(request, exc)
        if inspect.isawaitable(response):
            response = await response
        raw_headers = [h for h in response.raw_headers if h[0] != b"x-request-id"]
        raw_headers.append((b"x-request-id", request_id.encode()))
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": raw_headers}
        )
        await send({"type": "http.response.body", "body": response.body})
        return response.status_code


def _header_list(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in headers.items()
        if k.lower() != "x-request-id"
    ]


async def _send_json(outcome: Outcome, request_id: str, send: Any) -> None:
    raw_headers = _header_list(outcome.headers)
    if outcome.body is None:
        content = b""
        raw_headers.append((b"content-length", b"0"))
    else:
        # orjson: the same compact UTF-8 bytes as the route's response.
        content = orjson.dumps(outcome.body)
        raw_headers.append((b"content-length", str(len(content)).encode()))
        raw_headers.append((b"content-type", _JSON))
    raw_headers.append((b"x-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": outcome.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": content})


async def _send_stream(outcome: Outcome, request_id: str, receive: Any, send: Any) -> int:
    """Streams the SSE answer; stops (and closes the pipeline's iterator, which
    meters the tokens so far) when the client hangs up."""
    stream = outcome.stream
    assert stream is not None
    merged = {k.lower(): v for k, v in outcome.headers.items()}
    raw_headers = [h for h in _SSE_HEADERS if h[0].decode() not in merged]
    raw_headers += _header_list(outcome.headers)
    raw_headers.append((b"content-type", _SSE))
    raw_headers.append((b"x-request-id", request_id.encode()))
    me = asyncio.current_task()
    assert me is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        # The server reports a hang-up only through receive() (ASGI 2.3).
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        me.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not gone:
            raise
        me.uncancel()
    finally:
        watcher.cancel()
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
    return 200


async def _until_disconnect(receive: Any, work: Awaitable[Outcome]) -> Outcome:
    """Runs the pipeline in this task, cancelling it if the client hangs up
    first (one watcher task, as in gateway/routes/inference.py)."""
    me = asyncio.current_task()
    assert me is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        me.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        me.uncancel()
        return Outcome(499, None)
    finally:
        watcher.cancel()


class GatewayApp(FastAPI):
    """FastAPI with the fast path placed in front of its middleware stack.

    It stays a FastAPI object (state, routes, test clients, OpenAPI); only the
    ASGI callable that requests enter is wrapped."""

    fast_access: AccessLog | None = None

    def build_middleware_stack(self) -> Any:
        inner = super().build_middleware_stack()
        if self.fast_access is None:
            return inner
        return FastPath(inner, self, self.fast_access)
