"""Uploaded and generated files (OpenAI Files API). The bytes live in the
database, in their own table, so gateway and workers on different hosts share
them and listing files never reads their content."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, LargeBinary
from sqlmodel import Field, SQLModel

from gateway.db.ids import utcnow


class StoredFile(SQLModel, table=True):
    __tablename__ = "files"

    id: str = Field(primary_key=True)
    tenant_id: str = Field(index=True)
    filename: str
    # batch (uploaded input) | batch_output (generated output and error files)
    purpose: str
    bytes: int
    created_at: datetime = Field(default_factory=utcnow, index=True)
    expires_at: datetime | None = None


class FileContent(SQLModel, table=True):
    __tablename__ = "file_contents"

    file_id: str = Field(primary_key=True, foreign_key="files.id", ondelete="CASCADE")
    content: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
