"""Request id and access log, as plain ASGI (cheaper than BaseHTTPMiddleware).

`AccessLog` is shared with the raw-ASGI fast path (gateway/fastpath.py), so a
request leaves the same metrics sample and the same JSON log line whichever
way it was served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from gateway.requests import new_request_id

log = logging.getLogger("bearpaw.access")

_LINE = (
    '{"ts": %r, "level": "info", "logger": "bearpaw.access", "msg": "request", '
    '"request_id": %s, "method": %s, "path": %s, "status": %d, "duration_ms": %r}'
)
_json_formatter: Any = None


class AccessLog:
    """One request's latency histogram sample and its JSON access log line.

    With the gateway's own logging setup (one stream handler with the JSON
    formatter on the "bearpaw" logger, gateway/observability.py) the line is
    written directly, the same text the formatter makes, and lines finished in
    one event-loop turn go out in one write: the logging module's record,
    handler lock and per-line flush were a visible share of a cheap request.
    Any other setup (another handler, a filter, a test's capture) gets the
    ordinary `log.info` call."""

    def __init__(self, metrics_holder: list | None = None) -> None:
        self._holder = metrics_holder
        self._children: dict[tuple[str, str, int], Any] = {}
        self._histogram: Any = None
        self._pending: list[str] = []
        self._stream: Any = None

    def record(
        self, method: str, path: str, route: str, status: int, elapsed: float, request_id: str
    ) -> None:
        metrics = self._holder[0] if self._holder else None
        if metrics is not None:
            self._observe(metrics.http, method, route, status, elapsed)
        if not log.isEnabledFor(logging.INFO):
            return
        stream = self._direct_stream()
        duration_ms = round(elapsed * 1000, 3)
        if stream is None:
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": duration_ms,
                },
            )
            return
        # The formatter's json.dumps of the same keys in the same order, built
        # directly: json's own string quoting, floats by repr as json does.
        line = _LINE % (
            round(time.time(), 3),
            _quote(request_id),
            _quote(method),
            _quote(path),
            status,
            duration_ms,
        )
        self._stream = stream
        self._pending.append(line)
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:  # no loop (a synchronous caller): write now
                self._flush()

    def _observe(
        self, histogram: Any, method: str, route: str, status: int, elapsed: float
    ) -> None:
        # Labelled children are looked up once: labels() takes a lock and
        # builds a key per call.
        if histogram is not self._histogram:
            self._histogram = histogram
            self._children.clear()
        key = (method, route, status)
        child = self._children.get(key)
        if child is None:
            if len(self._children) > 1000:  # bounded, like the label values
                self._children.clear()
            child = self._children[key] = histogram.labels(method, route, str(status))
        child.observe(elapsed)

    @staticmethod
    def _direct_stream() -> Any:
        """The handler to write JSON lines with, or None when logging is set up
        otherwise than gateway/observability.py does."""
        global _json_formatter
        if _json_formatter is None:
            from gateway.observability import JsonFormatter  # imports the app's metrics

            _json_formatter = JsonFormatter
        if log.handlers or log.filters or not log.propagate:
            return None
        parent = log.parent
        if parent is None or parent.name != "bearpaw" or parent.filters or parent.propagate:
            return None
        if len(parent.handlers) != 1:
            return None
        handler = parent.handlers[0]
        if (
            type(handler) is not logging.StreamHandler
            or type(handler.formatter) is not _json_formatter
            or handler.filters
            or handler.level > logging.INFO
        ):
            return None
        return handler

    def _flush(self) -> None:
        lines, self._pending = self._pending, []
        handler = self._stream
        if not lines or handler is None:
            return
        text = "\n".join(lines) + handler.terminator
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.flush()
        except Exception:  # a broken log stream must not fail requests
            pass
        finally:
            handler.release()


class RequestIdMiddleware:
    def __init__(self, app: Any, metrics: Any = None, access: AccessLog | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.access = access or AccessLog([metrics] if metrics is not None else None)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_holder = [500]
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                headers.append(header)
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            self.access.record(
                scope["method"],
                path,
                _route(path),
                status_holder[0],
                time.perf_counter() - started,
                request_id,
            )


_KNOWN = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")


def _route(path: str) -> str:
    # Bounded label values: ids in paths would make one time series per request.
    for known in _KNOWN:
        if path.startswith(known):
            return known
    parts = path.split("/")
    return "/".join(parts[:3]) if len(parts) > 2 else path
