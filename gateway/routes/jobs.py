"""/v1/jobs/{id}: async jobs created with `Prefer: respond-async`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from gateway.async_jobs import job_object
from gateway.auth import CallerDep

router = APIRouter(prefix="/v1", tags=["jobs"])


@router.get("/jobs")
async def list_(
    request: Request, caller: CallerDep, limit: int = Query(20, ge=1, le=100)
) -> dict[str, Any]:
    state = request.app.state.bearpaw
    rows = await state.run_sync(state.extras["jobs"].list, caller.tenant_id, limit)
    return {"object": "list", "data": [job_object(j) for j in rows], "has_more": False}


@router.get("/jobs/{job_id}")
async def retrieve(request: Request, caller: CallerDep, job_id: str) -> dict[str, Any]:
    state = request.app.state.bearpaw
    return job_object(await state.run_sync(state.extras["jobs"].get, caller.tenant_id, job_id))


@router.delete("/jobs/{job_id}")
async def cancel(request: Request, caller: CallerDep, job_id: str) -> dict[str, Any]:
    state = request.app.state.bearpaw
    return job_object(await state.run_sync(state.extras["jobs"].cancel, caller.tenant_id, job_id))
