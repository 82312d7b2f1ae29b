"""Admission: requests and tokens per minute per tenant and per key.

Counters live in Redis when `limits.redis_url` is set, so several gateway
processes hold a tenant to one limit together; otherwise in this process.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Protocol

from gateway.caller import Caller
from gateway.errors import APIError

WINDOW = 60  # seconds: limits are per minute


class CounterStore(Protocol):
    async def incr(self, key: str, amount: int, ttl: int) -> int: ...


class MemoryCounters:
    def __init__(self) -> None:
        self._counts: dict[str, int] = defaultdict(int)
        self._window = 0

    async def incr(self, key: str, amount: int, ttl: int) -> int:
        window = int(time.time()) // WINDOW
        if window != self._window:  # the minute rolled over: old counters are moot
            self._counts.clear()
            self._window = window
        self._counts[key] += amount
        return self._counts[key]


class RedisCounters:
    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self.client = redis.from_url(url)

    async def incr(self, key: str, amount: int, ttl: int) -> int:
        pipe = self.client.pipeline(transaction=True)
        pipe.incrby(key, amount)
        pipe.expire(key, ttl)
        value, _ = await pipe.execute()
        return int(value)

    async def close(self) -> None:
        await self.client.aclose()


def estimate_tokens(body: dict) -> int:
    """Tokens a request may use, for TPM admission before the backend counts them."""
    text_len = 0
    for m in body.get("messages") or []:
        c = m.get("content")
        if isinstance(c, str):
            text_len += len(c)
        elif isinstance(c, list):
            text_len += sum(len(p.get("text", "")) for p in c if isinstance(p, dict))
    prompt = body.get("prompt") or body.get("input")
    if isinstance(prompt, str):
        text_len += len(prompt)
    elif isinstance(prompt, list):
        text_len += sum(len(p) if isinstance(p, str) else 1 for p in prompt)
    out = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return math.ceil(text_len / 4) + int(out) * int(body.get("n") or 1)


class Limiter:
    def __init__(self, store: CounterStore, default_rpm: int | None, default_tpm: int | None):
        self.store = store
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm

    async def admit(self, caller: Caller, tokens: int) -> dict[str, str]:
        """Counts the request; raises OpenAI's 429 when a limit is exceeded."""
        window = int(time.time()) // WINDOW
        retry_after = str(WINDOW - int(time.time()) % WINDOW)
        headers: dict[str, str] = {}
        checks = (
            ("tenant", caller.tenant_id, caller.rpm_limit or self.default_rpm, "requests", 1),
            ("tenant", caller.tenant_id, caller.tpm_limit or self.default_tpm, "tokens", tokens),
            ("key", caller.key_id, caller.key_rpm_limit, "requests", 1),
            ("key", caller.key_id, caller.key_tpm_limit, "tokens", tokens),
        )
        for scope, ident, limit, unit, amount in checks:
            if not limit or ident is None:
                continue
            key = f"bearpaw:rl:{scope}:{ident}:{unit}:{window}"
            used = await self.store.incr(key, amount, WINDOW * 2)
            if scope == "tenant":
                headers[f"x-ratelimit-limit-{unit}"] = str(limit)
                headers[f"x-ratelimit-remaining-{unit}"] = str(max(0, limit - used))
            if used > limit:
                per = "RPM" if unit == "requests" else "TPM"
                raise APIError(
                    429,
                    f"Rate limit reached for {scope} {ident} on {unit} per min ({per}): "
                    f"Limit {limit}, Used {used}. Please try again in {retry_after}s.",
                    code="rate_limit_exceeded",
                    headers={"retry-after": retry_after, **headers},
                )
        return headers
