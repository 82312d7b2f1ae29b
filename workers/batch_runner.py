"""Running a batch: its lines go through the pipeline, a bounded number at a
time, each answer stored with its line's state in one transaction.

One run handles at most `batch_chunk_lines` lines and then asks for a fresh
task, so a long batch is a chain of short tasks: a worker killed at any point
loses only its in-flight lines' work, whose claims run out and are retaken.
The fresh task is asked for as soon as the last line of the chunk is claimed,
not after the chunk's lines have drained: otherwise the backend would see the
batch's concurrency fall to zero at every chunk boundary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC
from typing import Any

import orjson

from gateway import batch_store
from gateway.caller import Caller
from gateway.db.batches import Batch, BatchLine
from gateway.db.ids import utcnow
from gateway.pipeline import Call
from gateway.protocol import BATCH_URLS
from gateway.runtime import Runtime
from workers.slo_pacer import pacer_for
from workers.stream_feed import feed_for

log = logging.getLogger("bearpaw.workers.batches")

# How often a run re-reads its batch for a cancel or the end of its window.
STATUS_EVERY_S = 0.5


class BatchRunner:
    def __init__(
        self, rt: Runtime, owner: str, hand_over: Callable[[], None] | None = None
    ) -> None:
        self.rt = rt
        self.owner = owner
        # Starts the next run of the batch now (another worker process takes
        # it) while this one finishes its in-flight lines.
        self.hand_over = hand_over
        self.cfg = rt.settings.workers
        self._busy_until = 0.0
        # The gateway's own interactive stream latencies, for the SLO loop.
        url = self.cfg.gateway_url
        self.feed = feed_for(url, rt.settings.admin_key) if url else None

    async def _db(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def run(self, batch_id: str) -> float | None:
        """Works on the batch; returns in how many seconds it should be run
        again, or None when this run leaves nothing for a later one."""
        engine = self.rt.engine
        batch: Batch = await self._db(batch_store.get_batch, engine, None, batch_id)
        if batch.status == "validating":
            # Models of a backend that is still starting are not "unknown".
            await self.rt.pool.ensure_discovered()
            await self._db(batch_store.validate_batch, engine, batch_id, self._known_model)
            batch = await self._db(batch_store.get_batch, engine, None, batch_id)
        if batch.status in batch_store.FINAL:
            return None
        if batch.status == "finalizing":
            await self._db(batch_store.finalize, engine, batch_id, "completed")
            return None
        return await self._work(batch)

    def _known_model(self, model: str) -> bool:
        return self.rt.pool.resolve(model) is not None

    async def _work(self, batch: Batch) -> float | None:
        engine = self.rt.engine
        caller = Caller.from_dict(batch.caller)
        endpoint = BATCH_URLS[batch.endpoint]
        in_flight: set[asyncio.Task[None]] = set()
        started = 0
        handed_over = False
        stop: str | None = None  # cancelled | expired, once seen
        status, checked = batch.status, time.monotonic()
        while True:
            if time.monotonic() - checked > STATUS_EVERY_S or stop is None and not in_flight:
                fresh = await self._db(batch_store.get_batch, engine, None, batch.id)
                status, batch.expires_at = fresh.status, fresh.expires_at
                checked = time.monotonic()
            if status == "cancelling":
                stop = "cancelled"
            elif status != "in_progress":
                stop = stop or "gone"  # finalized by another run meanwhile
            elif _past(batch):
                stop = "expired"
            slo = self.cfg.slo_for(batch.model)
            if slo is not None and self.feed is not None:
                await self.feed.poll()
            room = self._concurrency(batch.model) - len(in_flight)
            room = min(room, self.cfg.batch_chunk_lines - started)
            if slo is not None:
                room = min(room, slo.admit_burst)  # spread batch prefills out
            lines: list[BatchLine] = []
            if stop is None and room > 0:
                await self._pace(batch.model, busy=bool(in_flight))
                lines = await self._db(
                    batch_store.claim_lines,
                    engine,
                    batch.id,
                    self.owner,
                    room,
                    self.cfg.claim_seconds,
                )
            for line in lines:
                task = asyncio.create_task(self._line(batch, endpoint, caller, line))
                in_flight.add(task)
            started += len(lines)
            if lines and started >= self.cfg.batch_chunk_lines and self.hand_over is not None:
                self.hand_over()
                handed_over = True
            if not in_flight:
                break
            done, _ = await asyncio.wait(
                in_flight, timeout=STATUS_EVERY_S, return_when=asyncio.FIRST_COMPLETED
            )
            in_flight -= done
            for task in done:
                if task.exception() is not None:
                    log.error("batch %s line failed: %r", batch.id, task.exception())

        if stop == "gone":
            return None
        if stop in ("cancelled", "expired"):
            await self._db(batch_store.finalize, engine, batch.id, stop)
            log.info("batch %s %s", batch.id, stop)
            return None
        if started >= self.cfg.batch_chunk_lines:
            # The next chunk, in a fresh task (already running if handed over).
            return None if handed_over else 0.0
        wait = await self._db(batch_store.pending_claim_ends, engine, batch.id)
        if wait is not None:
            # Lines still pending under another run's claim: look again when
            # the claim runs out, in case that run died.
            return wait + 1.0
        if await self._db(batch_store.mark_finalizing, engine, batch.id):
            await self._db(batch_store.finalize, engine, batch.id, "completed")
            log.info("batch %s completed", batch.id)
        return None

    def _concurrency(self, model: str | None) -> int:
        """Lines to keep in flight: under an SLO for the model, what its closed
        loop allows (workers/slo_pacer.py). Otherwise all of batch_concurrency
        while the backends see nobody else, backfill_busy_concurrency while (and
        shortly after) they serve requests this worker did not send."""
        slo = self.cfg.slo_for(model)
        if slo is not None and model is not None:
            return pacer_for(self.rt.pool, model, slo, self.feed).limit()
        now = time.monotonic()
        if self.rt.pool.foreign_load(model) >= 1:
            self._busy_until = now + self.cfg.backfill_quiet_s
        if now < self._busy_until:
            return max(1, self.cfg.backfill_busy_concurrency)
        return self.cfg.batch_concurrency

    async def _pace(self, model: str | None, busy: bool) -> None:
        """Backfill: while interactive requests queue at the backends, hold
        new batch lines (a while at most, and never the batch's only line)."""
        if not busy:
            return
        limit = self.cfg.backfill_max_waiting
        deadline = time.monotonic() + self.cfg.backfill_max_wait_s
        while self.rt.pool.queue_depth(model) > limit and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def _line(self, batch: Batch, endpoint: str, caller: Caller, line: BatchLine) -> None:
        body = orjson.loads(line.body)
        call = Call(
            endpoint=endpoint,
            body=body,
            caller=caller,
            request_id=batch_store.line_request_id(batch.id, line.line_no),
            source="batch",
        )
        try:
            outcome = await self.rt.serve(call)
            status, answer = outcome.status, outcome.body
        except Exception:  # a bug must not leave the line pending forever
            log.exception("batch %s line %d crashed", batch.id, line.line_no)
            status = 500
            answer = {
                "error": {
                    "message": "The server had an error processing your request.",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        usage = answer.get("usage") if isinstance(answer, dict) and status < 400 else None
        await self._db(
            batch_store.finish_line, self.rt.engine, batch.id, line, status, answer, usage
        )


def _past(batch: Batch) -> bool:
    if batch.expires_at is None:
        return False
    expires = batch.expires_at
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    return utcnow() >= expires
