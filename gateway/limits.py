"""Admission: requests and tokens per minute per tenant and per key.

Limits hold over a sliding 60-second window kept as one-second buckets, so a
burst at the edge of a clock minute cannot get twice the limit through. Every
limit a request is subject to is checked and counted in one atomic step: a
request that any limit turns away consumes nothing, so a client hammering
through 429s does not keep itself locked out.

Token admission starts from an estimate (the prompt's length and max_tokens);
once the answer is known the pipeline settles the difference with the tokens
the backend actually used, so TPM tracks real usage, not guesses.

Counters live in Redis when `limits.redis_url` is set, so several gateway
processes hold a tenant to one limit together (the window uses Redis's clock,
so the processes' clocks need not agree); otherwise in this process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.caller import Caller
from gateway.errors import APIError
from gateway.resilience.dependencies import Dependencies, unavailable

log = logging.getLogger("bearpaw.limits")

WINDOW = 60  # seconds: limits are per minute


@dataclass(frozen=True)
class Check:
    """One limit a request is subject to."""

    key: str  # counter name
    limit: int
    amount: int  # what this request adds
    scope: str  # tenant | key
    ident: str
    unit: str  # requests | tokens


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    # Usage in the window before this request, one per check (when allowed).
    used: tuple[int, ...] = ()
    failed: int = -1  # index of the check that refused
    failed_used: int = 0
    retry_after: int = 0  # seconds until the refused check would fit


class CounterStore(Protocol):
    async def take(self, checks: Sequence[Check]) -> Verdict:
        """Counts all checks if every one fits, else none."""
        ...

    async def adjust(self, key: str, amount: int) -> None:
        """Adds (or, negative, removes) usage in the current second."""
        ...


def _decide(
    buckets: list[dict[int, int]], checks: Sequence[Check], now: int
) -> tuple[Verdict, list[int]]:
    """The sliding-window decision over already-pruned buckets; shared logic of
    the in-process store (the Redis script mirrors it)."""
    totals = [sum(b.values()) for b in buckets]
    for i, (check, total) in enumerate(zip(checks, totals, strict=True)):
        if total + check.amount > check.limit:
            return Verdict(
                False,
                failed=i,
                failed_used=total,
                retry_after=_retry_after(buckets[i], total, check, now),
            ), totals
    return Verdict(True, used=tuple(totals)), totals


def _retry_after(bucket: dict[int, int], total: int, check: Check, now: int) -> int:
    # The oldest seconds leave the window first: wait until enough have left.
    freed = 0
    for second in sorted(bucket):
        freed += bucket[second]
        if total - freed + check.amount <= check.limit:
            return max(1, second + WINDOW - now)
    return WINDOW  # larger than the limit itself: no wait makes it fit


class MemoryCounters:
    """Counters of this process only: right for a single gateway process."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._buckets: dict[str, dict[int, int]] = {}

    def _bucket(self, key: str, now: int) -> dict[int, int]:
        bucket = self._buckets.setdefault(key, {})
        for second in [s for s in bucket if s <= now - WINDOW]:
            del bucket[second]
        return bucket

    async def take(self, checks: Sequence[Check]) -> Verdict:
        # No await between check and count: atomic on the event loop.
        now = int(self.clock())
        buckets = [self._bucket(c.key, now) for c in checks]
        verdict, _ = _decide(buckets, checks, now)
        if verdict.allowed:
            for check, bucket in zip(checks, buckets, strict=True):
                bucket[now] = bucket.get(now, 0) + check.amount
        return verdict

    async def adjust(self, key: str, amount: int) -> None:
        now = int(self.clock())
        bucket = self._bucket(key, now)
        bucket[now] = bucket.get(now, 0) + amount


# KEYS: one hash per counter (field: unix second, value: usage in that second).
# ARGV: window, then limit and amount for each key.
# Returns {1, used...} when counted, {0, index, used, retry_after} when refused.
_TAKE = """
local now = tonumber(redis.call('TIME')[1])
local window = tonumber(ARGV[1])
local totals = {}
local seconds = {}
for i, key in ipairs(KEYS) do
  local fields = redis.call('HGETALL', key)
  local total, stale, kept = 0, {}, {}
  for j = 1, #fields, 2 do
    local s = tonumber(fields[j])
    if s <= now - window then
      stale[#stale + 1] = fields[j]
    else
      local n = tonumber(fields[j + 1])
      total = total + n
      kept[#kept + 1] = {s, n}
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  totals[i] = total
  seconds[i] = kept
end
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local amount = tonumber(ARGV[2 * i + 1])
  if totals[i] + amount > limit then
    local kept = seconds[i]
    table.sort(kept, function(a, b) return a[1] < b[1] end)
    local freed, retry = 0, window
    for _, pair in ipairs(kept) do
      freed = freed + pair[2]
      if totals[i] - freed + amount <= limit then
        retry = math.max(1, pair[1] + window - now)
        break
      end
    end
    return {0, i - 1, totals[i], retry}
  end
end
for i, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, now, tonumber(ARGV[2 * i + 1]))
  redis.call('EXPIRE', key, window + 1)
end
local out = {1}
for i = 1, #KEYS do out[#out + 1] = totals[i] end
return out
"""

_ADJUST = """
local now = tonumber(redis.call('TIME')[1])
redis.call('HINCRBY', KEYS[1], now, tonumber(ARGV[1]))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) + 1)
return 1
"""


class RedisCounters:
    """Counters shared by every gateway process that uses the same Redis."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        # Short socket timeouts: a hung Redis must cost a request a second at
        # most before the on-error policy applies, not the OS's TCP timeout.
        self.client = redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
        self._take = self.client.register_script(_TAKE)
        self._adjust = self.client.register_script(_ADJUST)

    async def take(self, checks: Sequence[Check]) -> Verdict:
        args: list[int] = [WINDOW]
        for check in checks:
            args += [check.limit, check.amount]
        reply = await self._take(keys=[c.key for c in checks], args=args)
        if int(reply[0]) == 1:
            return Verdict(True, used=tuple(int(v) for v in reply[1:]))
        return Verdict(
            False, failed=int(reply[1]), failed_used=int(reply[2]), retry_after=int(reply[3])
        )

    async def adjust(self, key: str, amount: int) -> None:
        await self._adjust(keys=[key], args=[amount, WINDOW])

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
    def __init__(
        self,
        store: CounterStore,
        default_rpm: int | None,
        default_tpm: int | None,
        fail_open: bool = True,
        dependencies: Dependencies | None = None,
        retry_after_s: int = 5,
    ) -> None:
        self.store = store
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        # When the counter store is unreachable, serve (fail open, the default:
        # an outage of Redis should not become an outage of the gateway) or
        # refuse with 503 (`resilience.limits_on_error: deny`).
        self.fail_open = fail_open
        self.dependencies = dependencies
        self.retry_after_s = retry_after_s
        if dependencies is not None:
            dependencies.register("redis")

    def checks(self, caller: Caller, tokens: int) -> list[Check]:
        candidates = (
            ("tenant", caller.tenant_id, caller.rpm_limit or self.default_rpm, "requests", 1),
            ("tenant", caller.tenant_id, caller.tpm_limit or self.default_tpm, "tokens", tokens),
            ("key", caller.key_id, caller.key_rpm_limit, "requests", 1),
            ("key", caller.key_id, caller.key_tpm_limit, "tokens", tokens),
        )
        return [
            Check(f"bearpaw:rl:{scope}:{ident}:{unit}", int(limit), amount, scope, ident, unit)
            for scope, ident, limit, unit, amount in candidates
            if limit and ident is not None
        ]

    async def admit(self, caller: Caller, tokens: int) -> dict[str, str]:
        """Counts the request; raises OpenAI's 429 when a limit is exceeded."""
        checks = self.checks(caller, tokens)
        if not checks:
            return {}
        deps = self.dependencies
        if deps is not None and deps.is_down("redis"):
            # Known down (the probe says when it is back): no connect attempt per request.
            return self._unreachable(None)
        try:
            verdict = await self.store.take(checks)
        except Exception as exc:
            if deps is not None:
                deps.failed("redis", exc)
            return self._unreachable(exc)
        if not verdict.allowed:
            check = checks[verdict.failed]
            per = "RPM" if check.unit == "requests" else "TPM"
            retry = verdict.retry_after
            raise APIError(
                429,
                f"Rate limit reached for {check.scope} {check.ident} on {check.unit} per min "
                f"({per}): Limit {check.limit}, Used {verdict.failed_used}, Requested "
                f"{check.amount}. Please try again in {retry}s.",
                code="rate_limit_exceeded",
                headers={
                    "retry-after": str(retry),
                    "retry-after-ms": str(retry * 1000),
                    f"x-ratelimit-limit-{check.unit}": str(check.limit),
                    f"x-ratelimit-remaining-{check.unit}": str(
                        max(0, check.limit - verdict.failed_used)
                    ),
                    f"x-ratelimit-reset-{check.unit}": f"{retry}s",
                },
            )
        return _headers(checks, verdict.used)

    def _unreachable(self, exc: Exception | None) -> dict[str, str]:
        if not self.fail_open:
            raise unavailable("redis", self.retry_after_s, "rate-limit counters")
        if exc is not None:
            log.warning("rate-limit counters unreachable; admitting", exc_info=exc)
        return {}

    async def settle(self, caller: Caller, estimated: int, actual: int) -> None:
        """Replaces a request's estimated tokens with what it actually used."""
        delta = actual - estimated
        if delta == 0 or (self.dependencies is not None and self.dependencies.is_down("redis")):
            return
        for check in self.checks(caller, estimated):
            if check.unit != "tokens":
                continue
            try:
                await self.store.adjust(check.key, delta)
            except Exception:
                log.warning("could not settle token usage", exc_info=True)
                return


def _headers(checks: Sequence[Check], used: Sequence[int]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, for the tightest limit of each unit."""
    headers: dict[str, str] = {}
    tightest: dict[str, tuple[int, Check]] = {}
    for check, before in zip(checks, used, strict=True):
        remaining = max(0, check.limit - before - check.amount)
        if check.unit not in tightest or remaining < tightest[check.unit][0]:
            tightest[check.unit] = (remaining, check)
    for unit, (remaining, check) in tightest.items():
        headers[f"x-ratelimit-limit-{unit}"] = str(check.limit)
        headers[f"x-ratelimit-remaining-{unit}"] = str(remaining)
    return headers
