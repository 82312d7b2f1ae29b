"""One usage record per request of every kind."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from gateway.db.ids import utcnow


class UsageRecord(SQLModel, table=True):
    __tablename__ = "usage_records"

    # The request id is the primary key, so writing the same request twice
    # (a retried batch line, a replayed task) cannot double-count it.
    request_id: str = Field(primary_key=True)
    tenant_id: str = Field(index=True)
    key_id: str | None = None
    model: str = Field(index=True)
    backend: str | None = None
    endpoint: str = ""  # chat.completions | completions | embeddings
    source: str = "interactive"  # interactive | async | batch
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Tokens answered from the cache (prompt + completion of the cached answer).
    cached_tokens: int = 0
    latency_ms: float = 0.0
    cache: str = "bypass"  # hit | miss | bypass
    status_code: int = 200
    error: str | None = None
    tier: str = "standard"
    cost_usd: float = 0.0
    cost_avoided_usd: float = 0.0
    batch_discount_usd: float = 0.0
    created_at: datetime = Field(default_factory=utcnow, index=True)
