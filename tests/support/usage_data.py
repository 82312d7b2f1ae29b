"""Known usage records for report tests: totals a reader can check by hand."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.engine import Engine

from gateway import tenants as svc
from gateway.db import UsageRecord
from gateway.usage_writer import insert_ignoring_duplicates, record_row

DAY1 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
DAY2 = datetime(2026, 3, 2, 23, 59, tzinfo=UTC)
NEXT_MONTH = datetime(2026, 4, 1, 0, 0, tzinfo=UTC)


def seed_known_usage(engine: Engine) -> dict[str, str]:
    """Two tenants, two models, two days; returns tenant name -> id.

    acme:   day1 small miss (100+50 tok, $0.30), day1 small hit (100+50 cached,
            $0.00, avoided $0.30), day2 big batch line (1000+500, $1.50 after a
            $1.50 discount), day2 error (0 tok)
    globex: day2 small miss (10+5, $0.03); next month: big miss (1+1, $9.00)
    """
    acme = svc.create_tenant(engine, "acme")
    globex = svc.create_tenant(engine, "globex")

    def rec(n: int, tenant: str, model: str, when: datetime, **kw: object) -> UsageRecord:
        return UsageRecord(
            request_id=f"req_known{n}", tenant_id=tenant, model=model, created_at=when, **kw
        )

    records = [
        rec(
            1,
            acme.id,
            "small",
            DAY1,
            prompt_tokens=100,
            completion_tokens=50,
            cost_usd=0.30,
            cache="miss",
            key_id="k1",
        ),
        rec(
            2,
            acme.id,
            "small",
            DAY1,
            prompt_tokens=100,
            completion_tokens=50,
            cached_tokens=150,
            cost_usd=0.0,
            cost_avoided_usd=0.30,
            cache="hit",
            backend="cache",
            key_id="k1",
        ),
        rec(
            3,
            acme.id,
            "big",
            DAY2,
            prompt_tokens=1000,
            completion_tokens=500,
            cost_usd=1.50,
            batch_discount_usd=1.50,
            source="batch",
            key_id="k2",
        ),
        rec(4, acme.id, "big", DAY2, status_code=502, error="backend down", key_id="k2"),
        rec(
            5,
            globex.id,
            "small",
            DAY2,
            prompt_tokens=10,
            completion_tokens=5,
            cost_usd=0.03,
            key_id="k3",
        ),
        rec(
            6,
            globex.id,
            "big",
            NEXT_MONTH,
            prompt_tokens=1,
            completion_tokens=1,
            cost_usd=9.0,
            key_id="k3",
        ),
    ]
    insert_ignoring_duplicates(engine, [record_row(r) for r in records])
    return {"acme": acme.id, "globex": globex.id}
