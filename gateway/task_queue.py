"""Sending work to the Celery workers, by task name.

The gateway only sends: it names tasks ("bearpaw.run_job") instead of
importing them, so gateway/ never imports workers/. Messages carry ids only;
everything else is in the database.
"""

from __future__ import annotations

import asyncio
import logging

from celery import Celery

log = logging.getLogger("bearpaw.tasks")

RUN_JOB = "bearpaw.run_job"
RUN_BATCH = "bearpaw.run_batch"


def broker_options(url: str, visibility_timeout: float) -> dict:
    """Transport options shared by the senders and the workers."""
    if url.startswith(("redis://", "rediss://", "sentinel://")):
        # An unacknowledged message (its worker died) is handed out again after
        # this long; tasks are idempotent, so an early second delivery is safe.
        return {"visibility_timeout": visibility_timeout}
    return {}


class TaskQueue:
    def __init__(self, broker_url: str, visibility_timeout: float = 3600.0) -> None:
        self.app = Celery("bearpaw-gateway", broker=broker_url, set_as_current=False)
        self.app.conf.broker_transport_options = broker_options(broker_url, visibility_timeout)
        self.app.conf.broker_connection_retry_on_startup = True
        # Fail fast when the broker is down: the outbox keeps the message and
        # sends it later (gateway/resilience/outbox.py), so blocking a request
        # on Celery's own reconnect loop gains nothing.
        self.app.conf.broker_connection_timeout = 2.0
        self.app.conf.task_publish_retry_policy = {
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        }

    def send(self, name: str, object_id: str) -> None:
        self.app.send_task(name, args=[object_id])

    async def send_async(self, name: str, object_id: str) -> None:
        # Publishing is blocking socket/database I/O.
        await asyncio.to_thread(self.send, name, object_id)

    def close(self) -> None:
        self.app.close()
