"""Everything a running gateway holds, built once at startup."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.engine import Engine

from backends.pool import ReplicaPool
from cache.semantic_cache import SemanticCache
from gateway.auth import KeyCache
from gateway.limits import Limiter
from gateway.pipeline import Pipeline
from gateway.pricing import PriceBook
from gateway.settings import Settings
from gateway.usage_writer import UsageWriter

T = TypeVar("T")


@dataclass
class GatewayState:
    settings: Settings
    engine: Engine
    pool: ReplicaPool
    cache: SemanticCache | None
    usage: UsageWriter
    limiter: Limiter
    prices: PriceBook
    pipeline: Pipeline
    key_cache: KeyCache = field(default_factory=KeyCache)
    extras: dict[str, Any] = field(default_factory=dict)

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking work (database calls) off the event loop."""
        return await asyncio.to_thread(fn, *args)
