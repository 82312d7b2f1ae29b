"""Celery tasks. Each takes an id, does its work through the runners, and is
safe to run twice."""

from __future__ import annotations

import logging
import secrets

from gateway.task_queue import RUN_BATCH, RUN_JOB
from workers.batch_runner import BatchRunner
from workers.celery_app import app
from workers.job_runner import run_job as run_job_once
from workers.runtime import run, runtime

log = logging.getLogger("bearpaw.workers")


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> None:
    async def go() -> None:
        await run_job_once(await runtime(), job_id)

    run(go())


@app.task(name=RUN_BATCH)
def run_batch(batch_id: str) -> None:
    def hand_over() -> None:
        app.send_task(RUN_BATCH, args=[batch_id])

    async def go() -> float | None:
        # A fresh owner per run: claims of a run that died are not this run's.
        runner = BatchRunner(await runtime(), owner=secrets.token_hex(8), hand_over=hand_over)
        return await runner.run(batch_id)

    again_in = run(go())
    if again_in is not None:
        # More to do (the next chunk, or lines another worker holds a claim
        # on): a new message, sent before this one is acknowledged.
        app.send_task(RUN_BATCH, args=[batch_id], countdown=again_in or None)
