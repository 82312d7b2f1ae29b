"""The pipeline inside a worker process.

Each worker process keeps one event loop and one Runtime (pool, cache, usage
writer, limiter, prices) for its whole life, built by the same function the
gateway uses, so connections, the cache index and replica health survive from
task to task. Celery tasks are synchronous; they enter the loop with `run()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from gateway.runtime import Runtime, build_runtime
from gateway.settings import get_settings

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_runtime: Runtime | None = None


def run(coro: Coroutine[Any, Any, T]) -> T:
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop.run_until_complete(coro)


async def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = await build_runtime(get_settings())
    return _runtime


def shutdown() -> None:
    """Flushes usage records and closes connections (worker process exit)."""
    global _runtime, _loop
    if _loop is None or _loop.is_closed():
        return
    if _runtime is not None:
        _loop.run_until_complete(_runtime.close())
        _runtime = None
    _loop.close()
    _loop = None
