"""Batches and async jobs of every tenant: status, progress, counts, cancel."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlmodel import Session, col, select

from gateway.async_jobs import FINISHED
from gateway.batch_store import line_counts, request_cancel
from gateway.console import session
from gateway.console.common import db, state
from gateway.console.render import page
from gateway.db import Tenant
from gateway.db.batches import Batch
from gateway.db.jobs import Job
from gateway.errors import APIError
from gateway.task_queue import RUN_BATCH

router = APIRouter()

LIMIT = 50
CANCELLABLE = ("validating", "in_progress")


def latest(engine: Any) -> dict[str, list[dict[str, Any]]]:
    with Session(engine, expire_on_commit=False) as s:
        names = dict(s.exec(select(Tenant.id, Tenant.name)).all())
        batches = s.exec(select(Batch).order_by(col(Batch.created_at).desc()).limit(LIMIT)).all()
        jobs = s.exec(select(Job).order_by(col(Job.created_at).desc()).limit(LIMIT)).all()
    out_batches = []
    for b in batches:
        counts = line_counts(engine, b.id)
        done = counts.completed + counts.failed
        out_batches.append(
            {
                "b": b,
                "tenant": names.get(b.tenant_id, b.tenant_id),
                "counts": counts,
                "done": done,
                "progress": done / counts.total if counts.total else None,
                "cancellable": b.status in CANCELLABLE,
            }
        )
    out_jobs = [
        {
            "j": j,
            "tenant": names.get(j.tenant_id, j.tenant_id),
            "cancellable": j.status not in FINISHED,
        }
        for j in jobs
    ]
    return {"batches": out_batches, "jobs": out_jobs}


@router.get("/console/batches")
async def batches(request: Request, flash: str = "") -> Response:
    session.require(request)
    data = await db(request, latest)
    return page(request, "batches.html", "batches", title="Batches & jobs", flash=flash, **data)


def _back(flash: str) -> str:
    return "/admin/console/batches?" + urlencode({"flash": flash})


def _confirm(request: Request, what: str, ident: str, action: str) -> Response:
    return page(
        request,
        "confirm.html",
        "batches",
        title=f"Cancel {what}",
        question=f"Cancel {what} {ident}?",
        detail="Lines or requests not yet run are not run; finished ones keep their results.",
        action=action,
        button=f"Cancel {what}",
        back="/admin/console/batches",
    )


@router.get("/console/batches/{batch_id}/cancel")
async def confirm_batch(request: Request, batch_id: str) -> Response:
    session.require(request)
    return _confirm(request, "batch", batch_id, f"/admin/console/batches/{batch_id}/cancel")


@router.post("/console/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> Response:
    await session.checked_form(request)
    try:
        batch = await db(request, request_cancel, None, batch_id)
    except APIError as exc:
        return RedirectResponse(_back(f"Not cancelled: {exc.message}"), status_code=303)
    # As the API route does: wake a worker, which settles the cancel.
    await state(request).extras["tasks"].wake(RUN_BATCH, batch.id)
    return RedirectResponse(_back(f"Batch {batch.id} is {batch.status}."), status_code=303)


@router.get("/console/jobs/{job_id}/cancel")
async def confirm_job(request: Request, job_id: str) -> Response:
    session.require(request)
    return _confirm(request, "job", job_id, f"/admin/console/jobs/{job_id}/cancel")


def _cancel_job(engine: Any, jobs: Any, job_id: str) -> Job:
    with Session(engine) as s:
        job = s.get(Job, job_id)
    if job is None:
        raise APIError(404, f"No job found with id '{job_id}'.")
    return jobs.cancel(job.tenant_id, job_id)


@router.post("/console/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> Response:
    await session.checked_form(request)
    try:
        job = await db(request, _cancel_job, state(request).extras["jobs"], job_id)
    except APIError as exc:
        return RedirectResponse(_back(f"Not cancelled: {exc.message}"), status_code=303)
    return RedirectResponse(_back(f"Job {job.id} is {job.status}."), status_code=303)
