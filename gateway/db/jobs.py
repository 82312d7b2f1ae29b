"""Async jobs: one request sent with `Prefer: respond-async`, answered later."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from gateway.db.ids import utcnow


class Job(SQLModel, table=True):
    __tablename__ = "jobs"

    id: str = Field(primary_key=True)
    tenant_id: str = Field(index=True)
    # The request id of the original HTTP request: the job's usage record and
    # the response's id carry it, and a replayed task cannot meter it twice.
    request_id: str = Field(unique=True)
    caller: dict = Field(sa_column=Column(JSON, nullable=False))
    endpoint: str
    body: dict = Field(sa_column=Column(JSON, nullable=False))
    cache_control: str = ""
    # queued | in_progress | completed | failed | cancelled
    status: str = Field(default="queued", index=True)
    # A worker's claim while in_progress; an expired claim may be retaken.
    claimed_until: datetime | None = None
    response_status: int | None = None
    response_body: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = Field(default_factory=utcnow, index=True)
    started_at: datetime | None = None
    completed_at: datetime | None = None
