"""Batches (OpenAI Batch API) and their lines.

A line's state lives in the database so that each line is answered exactly
once whatever happens to the workers: a line goes pending -> done | failed in
the same transaction that stores its result, and output files are assembled
from these rows only when the batch is finalized.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from gateway.db.ids import utcnow


class Batch(SQLModel, table=True):
    __tablename__ = "batches"

    id: str = Field(primary_key=True)
    tenant_id: str = Field(index=True)
    # Caller.to_dict() at creation: lines run with the creator's limits and tier.
    caller: dict = Field(sa_column=Column(JSON, nullable=False))
    endpoint: str
    input_file_id: str
    completion_window: str = "24h"
    # validating | failed | in_progress | finalizing | completed | expired |
    # cancelling | cancelled
    status: str = Field(default="validating", index=True)
    model: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    batch_metadata: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    total: int = 0
    completed: int = 0
    failed: int = 0
    created_at: datetime = Field(default_factory=utcnow, index=True)
    expires_at: datetime | None = None
    in_progress_at: datetime | None = None
    finalizing_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    expired_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None


class BatchLine(SQLModel, table=True):
    __tablename__ = "batch_lines"
    __table_args__ = (UniqueConstraint("batch_id", "custom_id", name="uq_batch_lines_custom_id"),)

    batch_id: str = Field(primary_key=True, foreign_key="batches.id", ondelete="CASCADE")
    line_no: int = Field(primary_key=True)  # 1-based, as in the input file
    custom_id: str
    body: str = Field(sa_column=Column(Text, nullable=False))  # the request body, JSON
    # pending | done (2xx, output file) | failed (error file)
    status: str = "pending"
    # A worker's claim on a pending line; an expired claim may be retaken, so a
    # killed worker's lines are picked up again.
    claimed_by: str | None = None
    claimed_until: datetime | None = None
    # The output line (BatchRequestOutput), JSON; written with the status.
    result: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished_at: datetime | None = None
