"""Running one async job through the pipeline."""

from __future__ import annotations

import asyncio
import logging

from gateway.async_jobs import claim_job, finish_job
from gateway.caller import Caller
from gateway.pipeline import Call
from gateway.runtime import Runtime

log = logging.getLogger("bearpaw.workers.jobs")


async def run_job(rt: Runtime, job_id: str) -> None:
    claim = rt.settings.workers.claim_seconds
    job = await asyncio.to_thread(claim_job, rt.engine, job_id, claim)
    if job is None:  # finished, cancelled, or a live worker has it
        return
    call = Call(
        endpoint=job.endpoint,
        body=job.body,
        caller=Caller.from_dict(job.caller),
        # The original request's id: the job is metered once, however often it runs.
        request_id=job.request_id,
        source="async",
        cache_control=job.cache_control,
    )
    outcome = await rt.serve(call)
    stored = await asyncio.to_thread(finish_job, rt.engine, job_id, outcome.status, outcome.body)
    if not stored:
        log.info("job %s was cancelled while it ran; its answer is dropped", job_id)
