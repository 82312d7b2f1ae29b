"""Single flight: concurrent identical misses share one backend call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class SingleFlight:
    """Deduplicate in-flight async calls by key.

    The first caller for a key runs ``fn``; callers arriving while it runs await
    the same result (or the same exception). Once it settles the key is free, so
    a later call runs again — this is deduplication, not caching.
    """

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[Any]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        existing = self._inflight.get(key)
        if existing is not None:
            # shield: one waiter being cancelled must not cancel the shared call.
            return await asyncio.shield(existing)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await fn()
        except BaseException as exc:
            future.set_exception(exc)
            # Mark retrieved so a call nobody else awaited does not log
            # "exception was never retrieved".
            future.exception()
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[key]
