"""/v1/batches: create, retrieve, list, cancel (OpenAI Batch API)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from gateway.auth import CallerDep
from gateway.batch_store import create_batch, describe, get_batch, list_batches, request_cancel
from gateway.errors import APIError
from gateway.requests import read_json
from gateway.task_queue import RUN_BATCH

router = APIRouter(prefix="/v1", tags=["batches"])


@router.post("/batches")
async def create(request: Request, caller: CallerDep) -> dict[str, Any]:
    state = request.app.state.bearpaw
    body = await read_json(request, state.settings.max_body_bytes)
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            raise APIError(
                400,
                f"Missing required parameter: '{name}'.",
                param=name,
                code="missing_required_parameter",
            )
    tasks = state.extras["tasks"]
    tasks.check_accepting()  # 503 up front while the broker is down, under `reject`
    batch = await state.run_sync(
        create_batch,
        state.engine,
        caller,
        body["input_file_id"],
        body["endpoint"],
        body["completion_window"],
        body.get("metadata"),
    )
    await tasks.send_async(RUN_BATCH, batch.id)
    return await state.run_sync(describe, state.engine, batch)


@router.get("/batches")
async def list_(
    request: Request,
    caller: CallerDep,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
) -> dict[str, Any]:
    state = request.app.state.bearpaw

    def page() -> tuple[list[dict[str, Any]], bool]:
        rows, more = list_batches(state.engine, caller.tenant_id, after, limit)
        return [describe(state.engine, b) for b in rows], more

    data, more = await state.run_sync(page)
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


@router.get("/batches/{batch_id}")
async def retrieve(request: Request, caller: CallerDep, batch_id: str) -> dict[str, Any]:
    state = request.app.state.bearpaw
    batch = await state.run_sync(get_batch, state.engine, caller.tenant_id, batch_id)
    return await state.run_sync(describe, state.engine, batch)


@router.post("/batches/{batch_id}/cancel")
async def cancel(request: Request, caller: CallerDep, batch_id: str) -> dict[str, Any]:
    state = request.app.state.bearpaw
    batch = await state.run_sync(request_cancel, state.engine, caller.tenant_id, batch_id)
    # Wake a worker even if the batch's task is queued behind others: the
    # cancel is settled by whichever run sees it first.
    await state.extras["tasks"].wake(RUN_BATCH, batch.id)
    return await state.run_sync(describe, state.engine, batch)
