"""The Celery app of the workers: `celery -A workers.celery_app worker`.

Task design follows Celery's advice for work that must not be lost: messages
carry only ids, tasks are idempotent (their state is in the database), acks
are late and a task whose worker died is rejected back to the queue, and each
worker process takes one message at a time.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, bootsteps
from celery.signals import (
    celeryd_init,
    setup_logging,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from gateway.async_jobs import unfinished_job_ids
from gateway.batch_store import active_batch_ids
from gateway.db import get_engine, migrate
from gateway.observability import JsonFormatter, configure_logging
from gateway.settings import get_settings
from gateway.task_queue import RUN_BATCH, RUN_JOB, broker_options

log = logging.getLogger("bearpaw.workers")

settings = get_settings()
if settings.log_json:
    # Model loading draws tqdm progress bars on stderr: not log records.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = Celery("bearpaw", broker=settings.celery_broker_url, include=["workers.tasks"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options=broker_options(
        settings.celery_broker_url, settings.workers.visibility_timeout_s
    ),
    worker_hijack_root_logger=False,
)


def _json_logging(celery_level: Any) -> None:
    configure_logging(settings.log_level, settings.log_json)
    handler = logging.StreamHandler()
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(celery_level or logging.WARNING)
    # Python warnings (Celery's one about running as root, say) become records.
    logging.captureWarnings(True)
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@setup_logging.connect
def _logging(loglevel: Any = None, **_: Any) -> None:
    """Worker logs in the gateway's format (one JSON object a line).

    Connecting this signal stops Celery from installing its own handlers. The
    bearpaw loggers follow BEARPAW_LOG_LEVEL as in the gateway; Celery's own
    loggers follow the worker's --loglevel (its "ready." line is what
    supervisors and tests wait for). The HTTP clients' INFO lines (one per
    health probe and metrics scrape) and Alembic's are noise at INFO, so they
    log warnings and worse only.
    """
    _json_logging(loglevel)


@celeryd_init.connect
def _no_banner(instance: Any = None, options: Any = None, **_: Any) -> None:
    """Logging is set up here already, before Celery's start-up checks warn.
    With JSON logs, Celery's multi-line banner on stdout is skipped too: a log
    collector would take each of its lines for a broken record. The JSON
    "<name> ready." line still marks the start."""
    _json_logging((options or {}).get("loglevel"))
    if settings.log_json and instance is not None:
        instance.quiet = True


@worker_ready.connect
def _recover(**_: Any) -> None:
    """Re-queues every unfinished batch and job at start-up.

    A worker killed outright (SIGKILL, lost node) may take its unacknowledged
    message with it (the embedded broker keeps none; Redis gives it back only
    after the visibility timeout). Runs are idempotent and settle races in the
    database, so an extra run costs nothing but a look.
    """
    settings.ensure_dirs()
    migrate(settings.db_url)
    engine = get_engine(settings.db_url)
    batches = active_batch_ids(engine)
    jobs = unfinished_job_ids(engine)
    for batch_id in batches:
        app.send_task(RUN_BATCH, args=[batch_id])
    for job_id in jobs:
        app.send_task(RUN_JOB, args=[job_id])
    if batches or jobs:
        log.info("re-queued %d batches and %d jobs", len(batches), len(jobs))
    # The forked pool processes must not share this process's connections.
    engine.dispose()


class _SweepOnReconnect(bootsteps.StartStopStep):
    """Runs the start-up sweep again each time the worker's consumer reconnects.

    A broker that dies loses the messages it held (a Redis without persistence
    loses them all): jobs accepted before the outage would wait in the database
    with nobody told to run them. Their rows say they are unfinished, so the
    sweep that runs at start-up finds and re-queues them; runs settle in the
    database, so a job whose message did survive runs once all the same."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.starts = 0

    def start(self, parent: Any) -> None:
        self.starts += 1
        if self.starts > 1:  # the first start is worker_ready's
            log.warning("consumer reconnected to the broker: sweeping unfinished work")
            try:
                _recover()
            except Exception:  # the database may be down too: the next reconnect retries
                log.exception("sweep after reconnect failed")


app.steps["consumer"].add(_SweepOnReconnect)


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    get_engine(settings.db_url).dispose(close=False)


@worker_process_shutdown.connect
def _close_runtime(**_: Any) -> None:
    from workers.runtime import shutdown

    shutdown()
