"""RPM/TPM limits: the sliding window, atomic check-and-count, TPM settling, per-key
limits, and two real gateway processes holding a tenant to one limit through Redis."""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import pytest_asyncio
import redis
from sqlalchemy import create_engine, select

from gateway.caller import Caller
from gateway.db import UsageRecord
from gateway.errors import APIError
from gateway.limits import Limiter, MemoryCounters, RedisCounters
from tests.support.gateway_process import GatewayProcess

REDIS_URL = "redis://127.0.0.1:6379/0"


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def caller(**limits: int | None) -> Caller:
    # A fresh tenant per test: Redis counters outlive a test run.
    return Caller(
        tenant_id=f"t_{secrets.token_hex(6)}",
        tenant_name="acme",
        key_id=f"k_{secrets.token_hex(6)}",
        **limits,
    )


# The fixture's Redis client must live in the test's own event loop.
@pytest_asyncio.fixture(params=["memory", "redis"], loop_scope="function")
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    if request.param == "memory":
        yield Limiter(MemoryCounters(), None, None, fail_open=False)
        return
    counters = RedisCounters(REDIS_URL)
    yield Limiter(counters, None, None, fail_open=False)
    await counters.close()


async def _admit(lim: Limiter, c: Caller, tokens: int = 0) -> APIError | dict[str, str]:
    try:
        return await lim.admit(c, tokens)
    except APIError as exc:
        return exc


async def test_rpm_admits_exactly_the_limit(limiter: Limiter) -> None:
    c = caller(rpm_limit=5)
    results = [await _admit(limiter, c) for _ in range(8)]
    ok = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, APIError)]
    assert len(ok) == 5 and len(refused) == 3
    assert [r["x-ratelimit-remaining-requests"] for r in ok] == ["4", "3", "2", "1", "0"]
    err = refused[0]
    assert err.status == 429 and err.code == "rate_limit_exceeded"
    assert err.type == "rate_limit_exceeded"
    assert 1 <= int(err.headers["retry-after"]) <= 60
    assert err.headers["x-ratelimit-limit-requests"] == "5"


async def test_concurrent_admissions_never_exceed_the_limit(limiter: Limiter) -> None:
    c = caller(rpm_limit=7)
    results = await asyncio.gather(*(_admit(limiter, c) for _ in range(30)))
    assert sum(isinstance(r, dict) for r in results) == 7


async def test_refused_request_consumes_nothing(limiter: Limiter) -> None:
    # The key's RPM refuses; the tenant's RPM must not have been counted for it.
    c = caller(rpm_limit=3, key_rpm_limit=1)
    assert isinstance(await _admit(limiter, c), dict)
    for _ in range(5):
        err = await _admit(limiter, c)
        assert isinstance(err, APIError) and "key" in err.message
    # Another key of the same tenant: the tenant has used 1 of 3.
    other = Caller(c.tenant_id, "acme", "k_other" + secrets.token_hex(4), rpm_limit=3)
    assert [isinstance(await _admit(limiter, other), dict) for _ in range(3)] == [
        True,
        True,
        False,
    ]


async def test_key_limit_is_per_key(limiter: Limiter) -> None:
    a = caller(key_rpm_limit=2)
    b = Caller(a.tenant_id, "acme", "k_b" + secrets.token_hex(4), key_rpm_limit=2)
    assert [isinstance(await _admit(limiter, a), dict) for _ in range(3)] == [True, True, False]
    assert [isinstance(await _admit(limiter, b), dict) for _ in range(2)] == [True, True]


async def test_tpm_counts_estimate_then_settles_actual(limiter: Limiter) -> None:
    c = caller(tpm_limit=1000)
    headers = await limiter.admit(c, 600)
    assert headers["x-ratelimit-remaining-tokens"] == "400"
    # Estimated 600 (max_tokens), the answer used 100: 900 left, so 800 fits.
    await limiter.settle(c, 600, 100)
    assert isinstance(await _admit(limiter, c, 800), dict)
    err = await _admit(limiter, c, 200)
    assert isinstance(err, APIError) and "TPM" in err.message


async def test_request_larger_than_tpm_is_refused(limiter: Limiter) -> None:
    err = await _admit(limiter, caller(tpm_limit=100), 101)
    assert isinstance(err, APIError) and err.headers["retry-after"] == "60"


async def test_sliding_window_and_retry_after() -> None:
    clock = Clock()
    lim = Limiter(MemoryCounters(clock), None, None)
    c = caller(rpm_limit=4)
    for _ in range(2):
        await lim.admit(c, 0)
    clock.t += 30
    for _ in range(2):
        await lim.admit(c, 0)
    clock.t += 29  # 59 s after the first two: the window still holds all four
    err = await _admit(lim, c)
    assert isinstance(err, APIError) and err.headers["retry-after"] == "1"
    clock.t += 1  # the first two leave the window, two slots open
    assert isinstance(await _admit(lim, c), dict)
    assert isinstance(await _admit(lim, c), dict)
    err = await _admit(lim, c)
    # The next slot frees when the requests at t+30 leave: 30 s from now.
    assert isinstance(err, APIError) and err.headers["retry-after"] == "30"


async def test_clock_minute_edge_gives_no_double_burst() -> None:
    # A fixed per-minute window would admit 2x the limit across the minute edge.
    clock = Clock(1_000_000 * 60 + 59)
    lim = Limiter(MemoryCounters(clock), None, None)
    c = caller(rpm_limit=3)
    assert [isinstance(await _admit(lim, c), dict) for _ in range(3)] == [True] * 3
    clock.t += 2  # a new clock minute
    assert isinstance(await _admit(lim, c), APIError)


async def test_redis_down_fails_open_by_default() -> None:
    counters = RedisCounters("redis://127.0.0.1:1/0")
    lim = Limiter(counters, 1, None)
    assert await lim.admit(caller(), 10) == {}
    strict = Limiter(counters, 1, None, fail_open=False)
    with pytest.raises(Exception):  # noqa: B017 - the connection error itself
        await strict.admit(caller(), 10)


# ----------------------------------------------------- two real gateway processes


@pytest.fixture
def shared_redis_gateways(fault_server, tmp_path) -> Iterator[list[GatewayProcess]]:
    prefix_db = tmp_path / "shared"
    env = {
        "BEARPAW_LIMITS__REDIS_URL": REDIS_URL,
        "BEARPAW_CACHE__ENABLED": "false",
        # One database for both, as in production (SQLite WAL is fine for two).
        "BEARPAW_DATABASE_URL": f"sqlite:///{prefix_db / 'bearpaw.db'}",
    }
    prefix_db.mkdir()
    gws = [
        GatewayProcess(tmp_path / f"gw{i}", backends=[fault_server.base_url], env=env)
        for i in range(2)
    ]
    for gw in gws:  # one after the other: the first one migrates the shared database
        gw.start()
    yield gws
    for gw in gws:
        gw.stop()


def test_two_processes_share_one_rpm_limit(shared_redis_gateways, fault_server) -> None:
    a, b = shared_redis_gateways
    tenant = f"shared-{secrets.token_hex(4)}"
    key = a.create_key(tenant, rpm_limit=10)
    a.wait_models(key, {"tiny"})
    b.wait_models(key, {"tiny"})
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    headers = {"authorization": f"Bearer {key}"}

    def send(gw: GatewayProcess) -> httpx.Response:
        return httpx.post(gw.base_url + "/chat/completions", json=body, headers=headers, timeout=30)

    # 30 requests alternating between the two processes, 6 at a time.
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(send, [a, b] * 15))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) == 10, [r.status_code for r in responses]
    assert len(refused) == 20
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    # Both processes answered some and refused some: the limit was held together.
    served_by = {r.url.port for r in ok}
    refused_by = {r.url.port for r in refused}
    assert served_by == refused_by == {a.port, b.port}
    # Every request, refused ones included, left one usage record.
    ids = {r.headers["x-request-id"] for r in responses}
    engine = create_engine(a.env["BEARPAW_DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(
            select(UsageRecord.request_id, UsageRecord.status_code).where(
                UsageRecord.request_id.in_(ids)
            )
        ).all()
    engine.dispose()
    assert len(rows) == 30
    assert sorted(status for _, status in rows) == [200] * 10 + [429] * 20


def test_redis_counters_use_one_hash_per_limit() -> None:
    # The counters expire on their own: nothing is left behind in Redis.
    c = caller(rpm_limit=5)
    lim = Limiter(RedisCounters(REDIS_URL), None, None)
    asyncio.run(lim.admit(c, 0))
    r = redis.Redis.from_url(REDIS_URL)
    key = f"bearpaw:rl:tenant:{c.tenant_id}:requests"
    assert r.type(key) == b"hash"
    assert 0 < r.ttl(key) <= 61
