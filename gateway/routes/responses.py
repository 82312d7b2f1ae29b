"""/v1/responses: the OpenAI Responses API, translated onto the pipeline."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from gateway.auth import CallerDep, require_caller
from gateway.caller import Caller
from gateway.dialects.responses import store
from gateway.dialects.responses.protocol import ResponsesRequest
from gateway.dialects.responses.service import ResponsesService
from gateway.dialects.responses.store import StoredResponse
from gateway.errors import APIError
from gateway.pipeline import Call
from gateway.requests import read_json, validate
from gateway.routes.inference import _until_disconnect, to_response

router = APIRouter(prefix="/v1", tags=["responses"])


def _service(request: Request) -> ResponsesService:
    return request.app.state.bearpaw.extras["responses"]


@router.post("/responses")
async def create(request: Request) -> Response:
    caller = await require_caller(request)
    state = request.app.state.bearpaw
    call = Call(
        endpoint="responses",
        body={},
        caller=caller,
        request_id=request.state.request_id,
        cache_control=request.headers.get("cache-control", ""),
        cache_max_error=request.headers.get("x-bearpaw-cache-max-error", ""),
        api="responses",
    )
    try:
        call.body = await read_json(request, state.settings.max_body_bytes)
        validate(ResponsesRequest, call.body)
    except APIError as exc:
        await state.pipeline.reject(call, exc)
        raise
    respond_async = "respond-async" in request.headers.get("prefer", "").lower()
    service = _service(request)
    work = service.create(call, state.extras.get("jobs"), respond_async)
    if call.body.get("stream"):
        return to_response(await work)
    return to_response(await _until_disconnect(request, work))


async def _stored(request: Request, caller: Caller, response_id: str) -> StoredResponse:
    state = request.app.state.bearpaw
    row = await state.run_sync(store.get, state.engine, caller.tenant_id, response_id)
    if row is None:
        raise APIError(
            404,
            f"Response with id '{response_id}' not found.",
            param="response_id",
            code="not_found",
        )
    return row


@router.get("/responses/{response_id}")
async def retrieve(request: Request, caller: CallerDep, response_id: str) -> dict[str, Any]:
    return (await _stored(request, caller, response_id)).as_object()


@router.delete("/responses/{response_id}")
async def delete(request: Request, caller: CallerDep, response_id: str) -> dict[str, Any]:
    state = request.app.state.bearpaw
    row = await _stored(request, caller, response_id)
    await state.run_sync(store.remove, state.engine, caller.tenant_id, response_id)
    if row.background and row.status in ("queued", "in_progress"):
        await state.run_sync(state.extras["jobs"].cancel_request, row.request_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.post("/responses/{response_id}/cancel")
async def cancel(request: Request, caller: CallerDep, response_id: str) -> dict[str, Any]:
    state = request.app.state.bearpaw
    row = await _stored(request, caller, response_id)
    if not row.background:
        raise APIError(
            400,
            "Only responses created with `background: true` can be cancelled.",
            param="response_id",
            code="invalid_state",
        )
    moved = await state.run_sync(
        lambda: store.move(state.engine, response_id, "cancelled", from_=("queued", "in_progress"))
    )
    if moved:
        await state.run_sync(state.extras["jobs"].cancel_request, row.request_id)
    elif row.status != "cancelled":
        raise APIError(
            400,
            f"Cannot cancel a response with status '{row.status}'.",
            param="response_id",
            code="invalid_state",
        )
    return (await _stored(request, caller, response_id)).as_object()


@router.get("/responses/{response_id}/input_items")
async def input_items(
    request: Request,
    caller: CallerDep,
    response_id: str,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = Query("desc"),
    after: str | None = Query(None),
) -> dict[str, Any]:
    row = await _stored(request, caller, response_id)
    items = list(row.input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise APIError(400, f"No input item with id '{after}'.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
