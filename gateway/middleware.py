"""Request id and access log, as plain ASGI (cheaper than BaseHTTPMiddleware)."""

from __future__ import annotations

import logging
import time
from typing import Any

from gateway.requests import new_request_id

log = logging.getLogger("bearpaw.access")


class RequestIdMiddleware:
    def __init__(self, app: Any, metrics: Any = None) -> None:
        self.app = app
        self.metrics = metrics

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
            elapsed = time.perf_counter() - started
            path = scope.get("path", "")
            if self.metrics is not None:
                status = str(status_holder[0])
                self.metrics.http.labels(scope["method"], _route(path), status).observe(elapsed)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": path,
                        "status": status_holder[0],
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )


_KNOWN = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")


def _route(path: str) -> str:
    # Bounded label values: ids in paths would make one time series per request.
    for known in _KNOWN:
        if path.startswith(known):
            return known
    parts = path.split("/")
    return "/".join(parts[:3]) if len(parts) > 2 else path
