"""POST /v1/messages and /v1/messages/count_tokens: the Anthropic Messages API.

Thin handlers over the one pipeline: a Messages request becomes a chat
completion `Call` (api="messages", so usage is reported under that name), and
the `Outcome` is turned back into a Message or Anthropic's event stream. Every
failure here, authentication and malformed JSON included, answers in
Anthropic's error envelope rather than OpenAI's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from backends.errors import BackendError
from gateway.auth import caller_for_secret
from gateway.caller import Caller
from gateway.dialects.messages.count_tokens import count_input_tokens
from gateway.dialects.messages.errors import error_response, openai_message
from gateway.dialects.messages.events import StreamState
from gateway.dialects.messages.protocol import CountTokensRequest, MessagesRequest, parse
from gateway.dialects.messages.relay import PING_SECONDS, relay
from gateway.dialects.messages.translate import message_id, to_chat, to_message
from gateway.errors import APIError, from_backend
from gateway.pipeline import Call
from gateway.requests import read_json
from gateway.routes.inference import SSE_HEADERS, _until_disconnect

router = APIRouter(tags=["messages"])
log = logging.getLogger("bearpaw.messages")

Handler = Callable[[Request, str], Awaitable[Response]]


@router.post("/v1/messages")
async def create_message(request: Request) -> Response:
    return await _in_envelope(request, _create)


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    return await _in_envelope(request, _count)


_OTHER_METHODS = ["GET", "PUT", "PATCH", "DELETE"]


@router.api_route("/v1/messages", methods=_OTHER_METHODS, include_in_schema=False)
@router.api_route("/v1/messages/count_tokens", methods=_OTHER_METHODS, include_in_schema=False)
async def wrong_method(request: Request) -> Response:
    # Anthropic's SDKs parse only their own envelope: a wrong method or path
    # under /v1/messages answers in it too, not in OpenAI's error object.
    return error_response(
        405,
        f"Method {request.method} is not allowed on {request.url.path}; use POST.",
        request.state.request_id,
        {"allow": "POST"},
    )


@router.api_route(
    "/v1/messages/{rest:path}", methods=["POST", *_OTHER_METHODS], include_in_schema=False
)
async def unknown_path(request: Request, rest: str) -> Response:
    return error_response(404, f"Not found: {request.url.path}.", request.state.request_id)


async def _in_envelope(request: Request, handler: Handler) -> Response:
    request_id = request.state.request_id
    try:
        return await handler(request, request_id)
    except APIError as exc:
        return error_response(exc.status, _reworded(exc), request_id, exc.headers)
    except BackendError as exc:
        err = from_backend(exc)
        return error_response(err.status, err.message, request_id, err.headers)
    except Exception:
        log.exception("messages request failed", extra={"request_id": request_id})
        return error_response(500, "The server had an error processing your request.", request_id)


def _reworded(exc: APIError) -> str:
    # The shared JSON reader's hint names the OpenAI API.
    return exc.message.replace("The OpenAI API", "The Messages API")


async def _caller(request: Request) -> Caller:
    """Anthropic's SDKs send `x-api-key`; `Authorization: Bearer` works too."""
    secret = request.headers.get("x-api-key", "").strip()
    if not secret:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        secret = token.strip() if scheme.lower() == "bearer" else ""
    if not secret:
        raise APIError(401, "x-api-key header is required (or Authorization: Bearer <key>).")
    return await caller_for_secret(request, secret)


async def _create(request: Request, request_id: str) -> Response:
    state = request.app.state.bearpaw
    call = Call(
        endpoint="chat.completions",
        body={},
        caller=await _caller(request),
        request_id=request_id,
        cache_control=request.headers.get("cache-control", ""),
        cache_max_error=request.headers.get("x-bearpaw-cache-max-error", ""),
        api="messages",
    )
    try:
        call.body = await read_json(request, state.settings.max_body_bytes)
        req = parse(MessagesRequest, call.body)
        call.body = to_chat(req)
    except APIError as exc:
        # Malformed requests are metered too: every request leaves one record.
        await state.pipeline.reject(call, exc)
        raise
    msg_id = message_id(request_id)
    if req.stream:
        return await _stream(state, call, StreamState(msg_id, req.model, req.stop_sequences))
    outcome = await _until_disconnect(request, state.pipeline.run(call))
    if outcome.body is None:
        return Response(status_code=outcome.status, headers=outcome.headers)  # client gone
    if outcome.status >= 400:
        message = openai_message(outcome.body)
        return error_response(outcome.status, message, request_id, outcome.headers)
    message = to_message(
        outcome.body, msg_id=msg_id, model=req.model, stop_sequences=req.stop_sequences
    )
    return _json(message, {**outcome.headers, "request-id": request_id})


async def _stream(state: Any, call: Call, stream_state: StreamState) -> Response:
    """Errors that come before the backend's first event (unknown model, rate
    limit) are plain HTTP errors; a run still waiting for its first event after
    PING_SECONDS is answered as a stream now, with pings while it waits."""
    pending = asyncio.get_running_loop().create_task(state.pipeline.run(call))
    try:
        await asyncio.wait({pending}, timeout=PING_SECONDS)
    except asyncio.CancelledError:
        pending.cancel()
        raise
    headers = {**SSE_HEADERS, "request-id": call.request_id}
    if pending.done():
        outcome = pending.result()
        if outcome.stream is None:
            message = openai_message(outcome.body)
            return error_response(outcome.status, message, call.request_id, outcome.headers)
        headers.update(outcome.headers)
    return StreamingResponse(
        relay(pending, stream_state), media_type="text/event-stream", headers=headers
    )


async def _count(request: Request, request_id: str) -> Response:
    state = request.app.state.bearpaw
    caller = await _caller(request)
    req = parse(CountTokensRequest, await read_json(request, state.settings.max_body_bytes))
    count = await count_input_tokens(state.pipeline, caller, request_id, req)
    return _json({"input_tokens": count}, {"request-id": request_id})


def _json(body: dict[str, Any], headers: dict[str, str]) -> Response:
    return Response(orjson.dumps(body), headers=headers, media_type="application/json")
