"""Budgets and the price book: the guard on known records, spend shared through
Redis, and hard/soft budgets end to end through a real gateway process."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine

from gateway.budgets import BudgetGuard, MemorySpend, RedisSpend, next_month_start
from gateway.caller import Caller
from gateway.db import UsageRecord, get_engine, migrate
from gateway.errors import APIError
from gateway.pricing import ModelPrice, PriceBook, PriceSettings
from tests.support.gateway_process import GatewayProcess
from tests.support.usage_data import seed_known_usage

MID_MARCH = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[Engine, dict[str, str]]:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    migrate(url)
    engine = get_engine(url)
    return engine, seed_known_usage(engine)


def _caller(tenant_id: str, budget: float | None, hard: bool = True) -> Caller:
    return Caller(tenant_id, "acme", "k1", monthly_budget_usd=budget, budget_hard=hard)


async def test_guard_on_known_spend(seeded) -> None:
    engine, ids = seeded
    guard = BudgetGuard(engine, MemorySpend(), now=lambda: MID_MARCH)
    # acme spent $1.80 in March 2026 (the April record is globex's).
    assert await guard.spend(ids["acme"]) == pytest.approx(1.80)
    assert await guard(_caller(ids["acme"], None)) == {}
    ok = await guard(_caller(ids["acme"], 10.0))
    assert ok == {"x-bearpaw-budget-remaining-usd": "8.200000"}
    near = await guard(_caller(ids["acme"], 2.0))
    assert near["x-bearpaw-budget-warning"].startswith("90% of monthly budget used")
    soft = await guard(_caller(ids["acme"], 1.5, hard=False))
    assert "exceeded" in soft["x-bearpaw-budget-warning"]
    with pytest.raises(APIError) as err:
        await guard(_caller(ids["acme"], 1.5))
    e = err.value
    assert (e.status, e.code, e.type) == (429, "insufficient_quota", "insufficient_quota")
    until_april = (next_month_start(MID_MARCH) - MID_MARCH).total_seconds()
    assert int(e.headers["retry-after"]) == int(until_april)


async def test_written_records_keep_spend_current(seeded) -> None:
    engine, ids = seeded
    guard = BudgetGuard(engine, MemorySpend(), now=lambda: MID_MARCH)
    assert await guard.spend(ids["acme"]) == pytest.approx(1.80)
    guard.observe(
        UsageRecord(
            request_id="r", tenant_id=ids["acme"], model="m", cost_usd=0.5, created_at=MID_MARCH
        )
    )
    await guard.drain()
    assert await guard.spend(ids["acme"]) == pytest.approx(2.30)


async def test_processes_share_spend_through_redis(seeded) -> None:
    engine, ids = seeded
    # Two guards as two gateway processes; a month of our own so runs do not collide.
    month = datetime(2026, 3, 15, tzinfo=UTC)
    tenant = ids["acme"]
    a = BudgetGuard(engine, RedisSpend("redis://127.0.0.1:6379/0"), now=lambda: month)
    b = BudgetGuard(engine, RedisSpend("redis://127.0.0.1:6379/0"), now=lambda: month)
    key = a._key(tenant, month)
    await a.store.client.delete(key)
    try:
        assert await a.spend(tenant) == pytest.approx(1.80)
        a.observe(
            UsageRecord(
                request_id="x", tenant_id=tenant, model="m", cost_usd=0.25, created_at=month
            )
        )
        await a.drain()
        assert await b.spend(tenant) == pytest.approx(2.05)
        with pytest.raises(APIError):
            await b(_caller(tenant, 2.0))
    finally:
        await a.store.client.delete(key)
        await a.store.close()
        await b.store.close()


def test_price_book() -> None:
    book = PriceBook(
        PriceSettings(
            models={
                "hosted": ModelPrice(input=1.0, output=4.0, cached_input=0.5),
                "gpu": ModelPrice(gpu_hourly_usd=3.6, tokens_per_second=1000),
                "gpu2": ModelPrice(
                    gpu_hourly_usd=3.6, tokens_per_second=1000, prompt_tokens_per_second=10000
                ),
            },
            default=ModelPrice(input=0.1, output=0.1),
        )
    )
    assert book.list_cost("hosted", 1_000_000, 500_000) == pytest.approx(3.0)
    batch = book.cost("hosted", 1_000_000, 500_000, source="batch")
    assert (batch.cost_usd, batch.batch_discount_usd) == (pytest.approx(1.5), pytest.approx(1.5))
    assert book.cached_cost("hosted", 1_000_000) == pytest.approx(0.5)
    assert book.cached_cost("gpu", 1_000_000) == 0.0
    # $3.60/h = $0.001/s; 1000 tok/s -> $1 per 1M tokens.
    assert book.price("gpu").output == pytest.approx(1.0)
    assert book.price("gpu").input == pytest.approx(1.0)
    assert book.price("gpu2").input == pytest.approx(0.1)
    assert book.price("unknown").input == pytest.approx(0.1)
    assert set(book.table()) == {"hosted", "gpu", "gpu2", "*"}


# ------------------------------------------------------------- end to end


@pytest.fixture
def priced_gateway(fault_server, tmp_path: Path):
    # $10,000 per 1M tokens: each small request costs a few cents.
    config = {"prices": {"models": {"tiny": {"input": 10000.0, "output": 10000.0}}}}
    gw = GatewayProcess(
        tmp_path,
        backends=[fault_server.base_url],
        env={"BEARPAW_CACHE__ENABLED": "false"},
        config=config,
    ).start()
    yield gw
    gw.stop()


def _chat(gw: GatewayProcess, key: str) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 5}
    return httpx.post(
        gw.base_url + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def test_hard_and_soft_budgets_end_to_end(priced_gateway: GatewayProcess) -> None:
    gw = priced_gateway
    hard = gw.create_key(f"hard-{secrets.token_hex(3)}", monthly_budget_usd=0.5)
    soft = gw.create_key(f"soft-{secrets.token_hex(3)}", monthly_budget_usd=0.5, budget_hard=False)
    gw.wait_models(hard, {"tiny"})

    first = _chat(gw, hard)
    assert first.status_code == 200
    usage = first.json()["usage"]
    cost = (usage["prompt_tokens"] + usage["completion_tokens"]) * 10000 / 1e6
    accepted = 1
    statuses = []
    for _ in range(40):
        r = _chat(gw, hard)
        statuses.append(r.status_code)
        if r.status_code != 200:
            break
        accepted += 1
    assert statuses[-1] == 429, statuses
    err = r.json()["error"]
    assert err["code"] == "insufficient_quota" and err["type"] == "insufficient_quota"
    assert int(r.headers["retry-after"]) > 0
    # Refused exactly once the spend reached the budget, not before.
    assert (accepted - 1) * cost < 0.5 <= accepted * cost

    warned = []
    for _ in range(accepted + 2):
        r = _chat(gw, soft)
        assert r.status_code == 200  # a soft budget never refuses
        warned.append(r.headers.get("x-bearpaw-budget-warning", ""))
    assert "exceeded" in warned[-1] and "soft" in warned[-1]
    assert warned[0] == ""
