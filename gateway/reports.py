"""Usage and cost reports: the usage records summed per tenant, model or day.

One query serves the CLI, the admin API and the report page, so the three can
never disagree. Token columns:

    prompt_tokens, completion_tokens   what the tenants were answered with, cache
                                       hits included (what they are billed on)
    cached_tokens                      of those, answered from the cache
    backend_prompt_tokens, backend_completion_tokens
                                       what the backends actually processed:
                                       the others minus cache hits; these are
                                       what vLLM's own token counters count
    cache_verifications, verification_tokens
                                       would-be semantic hits the cache sent to
                                       the backend to check its wrong-hit bound
                                       (usage records with cache = "verify"), and
                                       the tokens they cost: the bound's price
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.engine import Engine

from gateway.db import Tenant, UsageRecord

GROUPS = ("tenant", "model", "day", "key", "source", "endpoint")


@dataclass
class ReportRow:
    group: dict[str, str]
    requests: int = 0
    errors: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    backend_prompt_tokens: int = 0
    backend_completion_tokens: int = 0
    cost_usd: float = 0.0
    cost_avoided_usd: float = 0.0
    batch_discount_usd: float = 0.0
    cache_verifications: int = 0
    verification_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        group = data.pop("group")
        return {**group, **data, "total_tokens": self.total_tokens}


METRICS = [f.name for f in fields(ReportRow) if f.name != "group"]


@dataclass
class Report:
    group_by: list[str]
    start: datetime | None
    end: datetime | None
    tenant: str | None
    rows: list[ReportRow]

    @property
    def totals(self) -> ReportRow:
        total = ReportRow(group={})
        for row in self.rows:
            for name in METRICS:
                setattr(total, name, getattr(total, name) + getattr(row, name))
        return total

    def as_dict(self) -> dict[str, Any]:
        totals = self.totals.as_dict()
        return {
            "object": "bearpaw.usage_report",
            "group_by": self.group_by,
            "tenant": self.tenant,
            "start": _iso(self.start),
            "end": _iso(self.end),
            "data": [row.as_dict() for row in self.rows],
            "totals": totals,
        }

    def columns(self) -> list[str]:
        return [*self.group_by, *METRICS[:8], "total_tokens", *METRICS[8:]]

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow(_csv_values(row.as_dict()))
        return out.getvalue()


def _csv_values(data: dict[str, Any]) -> dict[str, Any]:
    # Fixed decimals: a spreadsheet should not see 1e-07.
    return {k: f"{v:.6f}" if isinstance(v, float) else v for k, v in data.items()}


def _iso(ts: datetime | None) -> str | None:
    return ts.astimezone(UTC).isoformat() if ts else None


def parse_group_by(value: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        raise ValueError(f"group_by must be one or more of {', '.join(GROUPS)}, comma-separated")
    return list(dict.fromkeys(names))


def _day(engine: Engine) -> ColumnElement[str]:
    col = UsageRecord.__table__.c.created_at
    if engine.dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", col), "YYYY-MM-DD")
    # SQLite stores the UTC time as text: its date is the first ten characters.
    return func.substr(col, 1, 10)


def usage_report(
    engine: Engine,
    group_by: Sequence[str] = ("tenant",),
    tenant: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> Report:
    """Sums usage records in [start, end) per group; `tenant` is an id or a name."""
    u = UsageRecord.__table__.c
    t = Tenant.__table__.c
    dims: dict[str, ColumnElement[Any]] = {
        "tenant": func.coalesce(t.name, u.tenant_id),
        "model": u.model,
        "day": _day(engine),
        "key": func.coalesce(u.key_id, ""),
        "source": u.source,
        "endpoint": u.endpoint,
    }
    hit = u.cache == "hit"
    verify = u.cache == "verify"
    backend_prompt = func.sum(case((hit, 0), else_=u.prompt_tokens))
    backend_completion = func.sum(case((hit, 0), else_=u.completion_tokens))
    keys = [dims[g].label(g) for g in group_by]
    stmt = (
        select(
            *keys,
            func.count().label("requests"),
            func.sum(case((u.status_code >= 400, 1), else_=0)).label("errors"),
            func.sum(case((hit, 1), else_=0)).label("cache_hits"),
            func.sum(u.prompt_tokens).label("prompt_tokens"),
            func.sum(u.completion_tokens).label("completion_tokens"),
            func.sum(u.cached_tokens).label("cached_tokens"),
            backend_prompt.label("backend_prompt_tokens"),
            backend_completion.label("backend_completion_tokens"),
            func.sum(u.cost_usd).label("cost_usd"),
            func.sum(u.cost_avoided_usd).label("cost_avoided_usd"),
            func.sum(u.batch_discount_usd).label("batch_discount_usd"),
            func.sum(case((verify, 1), else_=0)).label("cache_verifications"),
            func.sum(case((verify, u.prompt_tokens + u.completion_tokens), else_=0)).label(
                "verification_tokens"
            ),
        )
        .select_from(UsageRecord.__table__.outerjoin(Tenant.__table__, t.id == u.tenant_id))
        .group_by(*[dims[g] for g in group_by])
        .order_by(*[dims[g] for g in group_by])
    )
    if tenant:
        stmt = stmt.where((u.tenant_id == tenant) | (t.name == tenant))
    if start:
        stmt = stmt.where(u.created_at >= start)
    if end:
        stmt = stmt.where(u.created_at < end)
    rows: list[ReportRow] = []
    with engine.connect() as conn:
        for r in conn.execute(stmt).mappings():
            values = {
                name: (float(r[name] or 0) if name.endswith("_usd") else int(r[name] or 0))
                for name in METRICS
            }
            rows.append(ReportRow(group={g: str(r[g]) for g in group_by}, **values))
    return Report(list(group_by), start, end, tenant, rows)


def format_table(report: Report) -> list[list[str]]:
    """Header and rows as strings, for the CLI's table."""
    columns = [
        *report.group_by,
        "requests",
        "prompt",
        "completion",
        "cached",
        "cost $",
        "avoided $",
        "batch saved $",
        "verify tokens",
    ]
    out = [columns]
    for row in [*report.rows, report.totals]:
        label = [row.group.get(g, "") for g in report.group_by] if row.group else ["TOTAL"]
        label += [""] * (len(report.group_by) - len(label))
        out.append(
            [
                *label,
                str(row.requests),
                str(row.prompt_tokens),
                str(row.completion_tokens),
                str(row.cached_tokens),
                f"{row.cost_usd:.6f}",
                f"{row.cost_avoided_usd:.6f}",
                f"{row.batch_discount_usd:.6f}",
                str(row.verification_tokens),
            ]
        )
    return out
