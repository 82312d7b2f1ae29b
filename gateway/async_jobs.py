"""Async jobs (`Prefer: respond-async`): store the request, queue its id, and
let the client poll `/v1/jobs/{id}` for exactly the response the synchronous
call would have given."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from gateway.db.ids import new_id, unix, utcnow
from gateway.db.jobs import Job
from gateway.errors import APIError
from gateway.pipeline import Call, Outcome
from gateway.resilience.outbox import TaskOutbox
from gateway.task_queue import RUN_JOB, TaskQueue

FINISHED = ("completed", "failed", "cancelled")


def job_object(job: Job) -> dict[str, Any]:
    response = None
    if job.response_status is not None:
        response = {"status_code": job.response_status, "body": job.response_body}
    return {
        "id": job.id,
        "object": "job",
        "status": job.status,
        "endpoint": job.endpoint,
        "created_at": unix(job.created_at),
        "completed_at": unix(job.completed_at),
        "response": response,
    }


class AsyncJobs:
    """The gateway's side of async jobs; workers/tasks.py runs them."""

    def __init__(self, engine: Engine, tasks: TaskQueue | TaskOutbox) -> None:
        self.engine = engine
        self.tasks = tasks

    async def submit(self, call: Call) -> Outcome:
        if call.body.get("stream"):
            raise APIError(
                400,
                "`Prefer: respond-async` cannot be combined with `stream: true`.",
                param="stream",
                code="invalid_value",
            )
        job = await self.enqueue(call)
        return Outcome(
            202,
            job_object(job),
            {"location": f"/v1/jobs/{job.id}", "x-request-id": call.request_id},
        )

    async def enqueue(self, call: Call) -> Job:
        """Stores the call as a queued job and hands its id to the workers."""
        check = getattr(self.tasks, "check_accepting", None)
        if check is not None:
            check()  # 503 up front while the broker is down, under `reject`
        job = Job(
            id=new_id("job_"),
            tenant_id=call.caller.tenant_id,
            request_id=call.request_id,
            caller=call.caller.to_dict(),
            endpoint=call.endpoint,
            body=call.body,
            cache_control=call.cache_control,
        )
        await asyncio.to_thread(self._insert, job)
        await self.tasks.send_async(RUN_JOB, job.id)
        return job

    def _insert(self, job: Job) -> None:
        with Session(self.engine, expire_on_commit=False) as s:
            s.add(job)
            s.commit()

    def get(self, tenant_id: str, job_id: str) -> Job:
        with Session(self.engine, expire_on_commit=False) as s:
            job = s.get(Job, job_id)
        if job is None or job.tenant_id != tenant_id:
            raise APIError(404, f"No job found with id '{job_id}'.", code="not_found")
        return job

    def cancel(self, tenant_id: str, job_id: str) -> Job:
        job = self.get(tenant_id, job_id)
        if job.status in FINISHED:
            raise APIError(
                400,
                f"Cannot cancel a job with status '{job.status}'.",
                code="invalid_state",
            )
        with Session(self.engine, expire_on_commit=False) as s:
            # Conditional: a worker finishing at this moment wins, and the
            # client is told what really happened.
            s.exec(  # type: ignore[call-overload]
                update(Job)
                .where(col(Job.id) == job_id, col(Job.status).not_in(FINISHED))
                .values(status="cancelled", completed_at=utcnow())
            )
            s.commit()
        return self.get(tenant_id, job_id)

    def cancel_request(self, request_id: str) -> bool:
        """Cancels the unfinished job of a request (a background response)."""
        with Session(self.engine) as s:
            result = s.exec(  # type: ignore[call-overload]
                update(Job)
                .where(col(Job.request_id) == request_id, col(Job.status).not_in(FINISHED))
                .values(status="cancelled", completed_at=utcnow())
            )
            s.commit()
            return result.rowcount == 1

    def list(self, tenant_id: str, limit: int = 20) -> list[Job]:
        with Session(self.engine, expire_on_commit=False) as s:
            rows = s.exec(
                select(Job)
                .where(Job.tenant_id == tenant_id)
                .order_by(col(Job.created_at).desc())
                .limit(limit)
            ).all()
        return list(rows)


# ------------------------------------------------------------- worker side
def claim_job(engine: Engine, job_id: str, claim_seconds: float) -> Job | None:
    """Takes a queued job (or one whose worker's claim ran out); None when
    it is finished, cancelled or being run by a live worker."""
    now = utcnow()
    with Session(engine, expire_on_commit=False) as s:
        result = s.exec(  # type: ignore[call-overload]
            update(Job)
            .where(
                col(Job.id) == job_id,
                (col(Job.status) == "queued")
                | ((col(Job.status) == "in_progress") & (col(Job.claimed_until) < now)),
            )
            .values(
                status="in_progress",
                started_at=now,
                claimed_until=now + timedelta(seconds=claim_seconds),
            )
        )
        s.commit()
        if result.rowcount != 1:
            return None
        return s.get(Job, job_id)


def finish_job(engine: Engine, job_id: str, status_code: int, body: dict[str, Any] | None) -> bool:
    """Stores the response unless the job was cancelled meanwhile."""
    with Session(engine) as s:
        result = s.exec(  # type: ignore[call-overload]
            update(Job)
            .where(col(Job.id) == job_id, col(Job.status) == "in_progress")
            .values(
                status="completed" if status_code < 400 else "failed",
                response_status=status_code,
                response_body=body,
                completed_at=utcnow(),
                claimed_until=None,
            )
        )
        s.commit()
        return result.rowcount == 1


def unfinished_job_ids(engine: Engine) -> list[str]:
    with Session(engine) as s:
        rows = s.exec(select(Job.id).where(col(Job.status).in_(("queued", "in_progress")))).all()
    return list(rows)
