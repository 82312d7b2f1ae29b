"""Identifier helpers shared by the tables."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def utcnow() -> datetime:
    # Aware UTC: SQLModel's UTCDateTime stores it the same way on SQLite and PostgreSQL.
    return datetime.now(UTC)


def unix(ts: datetime | None) -> int | None:
    if ts is None:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return int(ts.timestamp())
