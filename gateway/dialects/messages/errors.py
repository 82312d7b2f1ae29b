"""Anthropic's error envelope and status codes for everything under /v1/messages.

The pipeline and the shared helpers speak OpenAI's error object; this module
re-words their failures the way Anthropic's API does, so the `anthropic` SDK
raises the same exception classes it raises against Anthropic's servers.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

# Anthropic's `error.type` for each status it uses.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

# A gateway or backend that cannot take the request now (no replica, upstream
# down or timed out) is what Anthropic calls overloaded: the SDK retries it.
_OVERLOADED = frozenset({502, 503, 504})


def anthropic_status(status: int) -> int:
    return 529 if status in _OVERLOADED else status


def error_type(status: int) -> str:
    status = anthropic_status(status)
    if status in _TYPES:
        return _TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def envelope(status: int, message: str, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "error",
        "error": {"type": error_type(status), "message": message},
    }
    if request_id:
        body["request_id"] = request_id
    return body


def error_response(
    status: int, message: str, request_id: str, headers: dict[str, str] | None = None
) -> Response:
    """The HTTP answer for a failure (headers such as retry-after are kept)."""
    return Response(
        orjson.dumps(envelope(status, message, request_id)),
        status_code=anthropic_status(status),
        headers={**(headers or {}), "request-id": request_id},
        media_type="application/json",
    )


def openai_message(body: Any) -> str:
    """The message of an OpenAI error object (what the pipeline returns)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or "upstream error")
    return "The server had an error processing your request."
