"""POST /v1/chat/completions, /v1/completions, /v1/embeddings."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from gateway.auth import require_caller
from gateway.caller import Caller
from gateway.errors import APIError
from gateway.pipeline import Call, Outcome
from gateway.protocol import ENDPOINTS
from gateway.requests import read_json, validate

router = APIRouter(prefix="/v1", tags=["inference"])

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def _handle(request: Request, caller: Caller, endpoint: str) -> Response:
    state = request.app.state.bearpaw
    call = Call(
        endpoint=endpoint,
        body={},
        caller=caller,
        request_id=request.state.request_id,
        cache_control=request.headers.get("cache-control", ""),
        cache_max_error=request.headers.get("x-bearpaw-cache-max-error", ""),
    )
    try:
        raw = await read_json(request, state.settings.max_body_bytes)
        call.body = raw
        validate(ENDPOINTS[endpoint][1], raw)
    except APIError as exc:
        # Malformed requests are metered too: every request leaves one record.
        await state.pipeline.reject(call, exc)
        raise
    body = call.body
    if "respond-async" in request.headers.get("prefer", "").lower():
        jobs = state.extras.get("jobs")
        if jobs is None:
            raise APIError(400, "Async requests are not enabled on this gateway.")
        outcome = await jobs.submit(call)
    elif body.get("stream"):
        outcome = await state.pipeline.run(call)
    else:
        outcome = await _until_disconnect(request, state.pipeline.run(call))
    return to_response(outcome)


async def _until_disconnect(request: Request, work: Awaitable[Outcome]) -> Outcome:
    """Runs the pipeline, cancelling it (and so the upstream request) if the
    client hangs up first.

    The pipeline runs in this task and only the watcher is a task of its own:
    one task and no `asyncio.wait` per request, which the profile showed to be
    a visible share of a cheap request's cost."""
    me = asyncio.current_task()
    assert me is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _wait_disconnect(request)
        gone = True
        me.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise  # cancelled from outside (shutdown): not ours to swallow
        me.uncancel()
        return Outcome(499, None)
    finally:
        watcher.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def to_response(outcome: Outcome) -> Response:
    if outcome.stream is not None:
        return StreamingResponse(
            outcome.stream,
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **outcome.headers},
        )
    if outcome.body is None:
        return Response(status_code=outcome.status, headers=outcome.headers)
    # orjson: several times faster than the stdlib encoder JSONResponse uses,
    # and the same bytes (compact, UTF-8).
    return Response(
        orjson.dumps(outcome.body),
        status_code=outcome.status,
        headers=outcome.headers,
        media_type="application/json",
    )


# Authentication is awaited in the handler rather than declared as a FastAPI
# dependency: same check, same errors, without the dependency solver's
# per-request cost on the hottest routes.


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _handle(request, await require_caller(request), "chat.completions")


@router.post("/completions")
async def completions(request: Request) -> Response:
    return await _handle(request, await require_caller(request), "completions")


@router.post("/embeddings")
async def embeddings(request: Request) -> Response:
    return await _handle(request, await require_caller(request), "embeddings")
