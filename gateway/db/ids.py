"""Identifier helpers shared by the tables."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def utcnow() -> datetime:
    # Naive UTC: SQLite drops tz info, so every row stores naive UTC the same way.
    return datetime.now(UTC).replace(tzinfo=None)


def unix(ts: datetime | None) -> int | None:
    if ts is None:
        return None
    return int(ts.replace(tzinfo=UTC).timestamp())
