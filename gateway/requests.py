"""Reading and validating OpenAI request bodies."""

from __future__ import annotations

import secrets
from typing import Any

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError

from gateway.errors import APIError


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


async def read_body(request: Request, limit: int, expected: str = "a JSON object") -> bytes:
    """The whole body, refused with 413 past `limit` bytes and 400 when empty."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise _too_large(limit)
    if not raw:
        code = "invalid_json" if "JSON" in expected else None
        raise APIError(400, f"The request body is empty; send {expected}.", code=code)
    return bytes(raw)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    raw = await read_body(request, limit)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise APIError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means "
            "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
            "payload.)",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than the limit of {limit} bytes.",
        code="request_too_large",
    )


def validate(model: type[BaseModel], body: dict[str, Any]) -> dict[str, Any]:
    """Checks `body` against `model` and returns the body as sent (so unknown
    parameters still reach the backend)."""
    try:
        model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())) or None
        msg = err.get("msg", "invalid value")
        if err.get("type") == "missing":
            message = f"Missing required parameter: '{param}'."
            code = "missing_required_parameter"
        else:
            message = f"Invalid value for '{param}': {msg}."
            code = "invalid_value"
        raise APIError(400, message, param=param, code=code) from None
    return body
