"""POST /v1/chat/completions, /v1/completions, /v1/embeddings."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway.auth import CallerDep
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


async def _until_disconnect(request: Request, work: Any) -> Outcome:
    """Runs the pipeline, cancelling it (and so the upstream request) if the
    client hangs up first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return Outcome(499, None)
        return task.result()
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
    return JSONResponse(outcome.body, status_code=outcome.status, headers=outcome.headers)


@router.post("/chat/completions")
async def chat_completions(request: Request, caller: CallerDep) -> Response:
    return await _handle(request, caller, "chat.completions")


@router.post("/completions")
async def completions(request: Request, caller: CallerDep) -> Response:
    return await _handle(request, caller, "completions")


@router.post("/embeddings")
async def embeddings(request: Request, caller: CallerDep) -> Response:
    return await _handle(request, caller, "embeddings")
