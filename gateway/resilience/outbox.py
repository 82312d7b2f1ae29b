"""Task messages the broker could not take, kept until it can.

A job or batch is stored in the database before its id is published, so a
message that cannot be published loses nothing but the wake-up call: with the
`spool` policy the submission is still accepted and the id waits here, sent
in order once the broker answers again. Workers take a message only by claiming
its row, so a message sent twice (a timeout that did publish) runs once.
Ids waiting here when the gateway process dies are picked up by the workers'
start-up sweep of unfinished jobs and batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.resilience.dependencies import Dependencies, unavailable
from gateway.task_queue import TaskQueue

log = logging.getLogger("bearpaw.tasks")


class TaskOutbox:
    def __init__(
        self,
        tasks: TaskQueue,
        dependencies: Dependencies,
        reject_when_down: bool = False,
        retry_after_s: int = 5,
        interval_s: float = 1.0,
        send_timeout_s: float = 10.0,
    ) -> None:
        self.tasks = tasks
        self.dependencies = dependencies
        self.reject_when_down = reject_when_down
        self.retry_after_s = retry_after_s
        self.interval_s = interval_s
        self.send_timeout_s = send_timeout_s
        self._pending: dict[str, str] = {}  # object id -> task name, oldest first
        self._task: asyncio.Task[None] | None = None
        dependencies.register("broker")

    @property
    def depth(self) -> int:
        return len(self._pending)

    def check_accepting(self) -> None:
        """Under `reject`, refuses a submission up front while the broker is down
        (before anything is stored for it)."""
        if self.reject_when_down and self.dependencies.is_down("broker"):
            raise unavailable("broker", self.retry_after_s)

    async def send(self, name: str, object_id: str) -> bool:
        """Publishes `name(object_id)`; returns False when the message was kept
        for later (spool) and raises 503 under `reject`."""
        if not self._pending and not self.dependencies.is_down("broker"):
            try:
                await self._publish(name, object_id)
                return True
            except Exception as exc:
                self.dependencies.failed("broker", exc)
        if self.reject_when_down:
            raise unavailable("broker", self.retry_after_s)
        # Behind what already waits, so submissions keep their order.
        self._pending[object_id] = name
        log.warning("broker down: %s %s kept for later", name, object_id)
        return False

    # The TaskQueue interface, so routes and AsyncJobs send through the outbox.
    async def send_async(self, name: str, object_id: str) -> None:
        await self.send(name, object_id)

    async def wake(self, name: str, object_id: str) -> None:
        """A wake-up whose state is already in the database (a cancel): kept
        for later when the broker is down, never refused."""
        reject, self.reject_when_down = self.reject_when_down, False
        try:
            await self.send(name, object_id)
        finally:
            self.reject_when_down = reject

    async def _publish(self, name: str, object_id: str) -> None:
        async with asyncio.timeout(self.send_timeout_s):
            await self.tasks.send_async(name, object_id)

    async def flush(self) -> int:
        """Sends what waits, oldest first; stops at the first failure."""
        sent = 0
        for object_id, name in list(self._pending.items()):
            try:
                await self._publish(name, object_id)
            except Exception as exc:
                self.dependencies.failed("broker", exc)
                break
            del self._pending[object_id]
            sent += 1
        if sent:
            log.warning("broker back: sent %d kept task messages", sent)
        return sent

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self._pending and not self.dependencies.is_down("broker"):
                await self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
