"""Persistent cache entries (SQLite or PostgreSQL through SQLAlchemy).

The table is the source of truth; the in-memory index is rebuilt from it at
start. Embeddings are stored as raw float32 bytes so a restart needs no
re-embedding. All functions here are synchronous and are called from a thread
so the event loop never waits on the database.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from sqlalchemy import Column, LargeBinary, Text, delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel

# Re-exported so Alembic's env.py can point at the same metadata object.
metadata = SQLModel.metadata


class CacheEntry(SQLModel, table=True):
    __tablename__ = "cache_entries"

    id: str = Field(primary_key=True, max_length=32)
    tenant: str = Field(index=True, max_length=255)
    namespace: str = Field(index=True, max_length=64)
    # canonical_hash of the request: the exact layer's key.
    exact_key: str = Field(unique=True, max_length=64)
    query: str = Field(sa_column=Column(Text, nullable=False))
    response: str = Field(sa_column=Column(Text, nullable=False))
    embedding: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    model: str = Field(default="", max_length=255)
    created_at: float
    expires_at: float = Field(index=True)
    last_hit_at: float
    hits: int = 0


def create_table(engine: Engine) -> None:
    CacheEntry.__table__.create(engine, checkfirst=True)  # type: ignore[attr-defined]


def vector_to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def bytes_to_vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def load_live(engine: Engine, now: float, batch: int = 2000) -> Iterator[CacheEntry]:
    """Unexpired entries, least recently used first (so replay rebuilds LRU order)."""
    with Session(engine) as session:
        stmt = (
            select(CacheEntry)
            .where(CacheEntry.expires_at > now)
            .order_by(CacheEntry.last_hit_at, CacheEntry.id)
            .execution_options(yield_per=batch)
        )
        for row in session.scalars(stmt):
            session.expunge(row)
            yield row


def upsert(engine: Engine, entry: CacheEntry) -> list[str]:
    """Insert ``entry``, replacing any row with the same exact key.

    Returns the ids of replaced rows so the caller can drop them from memory.
    """
    # expire_on_commit=False: the caller keeps using ``entry`` after the
    # session is gone, and a refresh would need the session.
    with Session(engine, expire_on_commit=False) as session:
        replaced = list(
            session.scalars(select(CacheEntry.id).where(CacheEntry.exact_key == entry.exact_key))
        )
        if replaced:
            session.execute(delete(CacheEntry).where(CacheEntry.id.in_(replaced)))
        session.add(entry)
        try:
            session.commit()
        except IntegrityError:
            # Another process stored the same request in between; theirs is
            # as good as ours.
            session.rollback()
            return replaced
    return replaced


def delete_ids(engine: Engine, ids: Iterable[str]) -> int:
    ids = list(ids)
    removed = 0
    with Session(engine) as session:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            result = session.execute(delete(CacheEntry).where(CacheEntry.id.in_(chunk)))
            removed += result.rowcount or 0
        session.commit()
    return removed


def delete_tenant(engine: Engine, tenant: str) -> int:
    with Session(engine) as session:
        result = session.execute(delete(CacheEntry).where(CacheEntry.tenant == tenant))
        session.commit()
    return result.rowcount or 0


def delete_expired(engine: Engine, now: float) -> int:
    with Session(engine) as session:
        result = session.execute(delete(CacheEntry).where(CacheEntry.expires_at <= now))
        session.commit()
    return result.rowcount or 0


def record_hits(engine: Engine, touched: dict[str, tuple[float, int]]) -> None:
    """Persist last-hit times and hit counts accumulated in memory.

    Hits are flushed in bulk by the sweeper instead of written per hit, which
    would put a database write on the hit path.
    """
    if not touched:
        return
    with Session(engine) as session:
        for entry_id, (last_hit_at, hits) in touched.items():
            session.execute(
                update(CacheEntry)
                .where(CacheEntry.id == entry_id)
                .values(last_hit_at=last_hit_at, hits=CacheEntry.hits + hits)
            )
        session.commit()


def live_ids(engine: Engine, now: float) -> set[str]:
    with Session(engine) as session:
        return set(session.scalars(select(CacheEntry.id).where(CacheEntry.expires_at > now)))


def load_ids(engine: Engine, ids: list[str]) -> list[CacheEntry]:
    out: list[CacheEntry] = []
    with Session(engine, expire_on_commit=False) as session:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = session.scalars(select(CacheEntry).where(CacheEntry.id.in_(chunk)))
            for row in rows:
                session.expunge(row)
                out.append(row)
    return out
