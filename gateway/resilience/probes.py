"""Active checks of each dependency, so its state is current without traffic
and a dependency marked down is seen coming back (the hot path skips a
dependency known to be down, so it would not find out by itself)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from gateway.resilience.dependencies import Dependencies

log = logging.getLogger("bearpaw.dependencies")

# A check raises when the dependency is unreachable; it may return why the
# dependency is only degraded (e.g. a backlog still draining).
Check = Callable[[], Awaitable[str | None]]


class DependencyProbes:
    def __init__(
        self, dependencies: Dependencies, checks: dict[str, Check], interval_s: float = 1.0
    ) -> None:
        self.dependencies = dependencies
        self.checks = checks
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        for name in checks:
            dependencies.register(name)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def probe_once(self) -> None:
        for name, check in self.checks.items():
            try:
                async with asyncio.timeout(max(2.0, self.interval_s * 3)):
                    degraded = await check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.dependencies.failed(name, exc)
            else:
                self.dependencies.ok(name, degraded)

    async def _run(self) -> None:
        while True:
            await self.probe_once()
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def database_check(engine: Engine, backlog: Callable[[], int]) -> Check:
    """SELECT 1; degraded while spooled usage records wait for replay."""

    def ping() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    async def check() -> str | None:
        await asyncio.to_thread(ping)
        left = backlog()
        return f"{left} usage records still spooled" if left else None

    return check


def redis_check(url: str) -> Check:
    import redis.asyncio as redis

    client = redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)

    async def check() -> str | None:
        await client.ping()
        return None

    return check


def broker_check(url: str, backlog: Callable[[], int]) -> Check:
    """Connects to the Celery broker; degraded while task messages wait to be sent."""
    if url.startswith(("redis://", "rediss://")):
        ping = redis_check(url)
    else:
        from kombu import Connection

        def connect() -> None:
            with Connection(url, connect_timeout=2) as conn:
                conn.ensure_connection(max_retries=1)

        async def ping() -> str | None:
            await asyncio.to_thread(connect)
            return None

    async def check() -> str | None:
        await ping()
        left = backlog()
        return f"{left} task messages waiting to be sent" if left else None

    return check


def dependency_checks(settings: Any, runtime: Any, outbox: Any) -> dict[str, Check]:
    """The checks a gateway process runs: its database, its Redis (when limits
    or budgets use one) and its broker."""
    spool = runtime.usage.spool
    checks: dict[str, Check] = {
        "database": database_check(runtime.engine, lambda: spool.depth if spool else 0),
        "broker": broker_check(settings.celery_broker_url, lambda: outbox.depth),
    }
    if settings.limits.redis_url:
        checks["redis"] = redis_check(settings.limits.redis_url)
    return checks
