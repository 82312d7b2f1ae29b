"""Durable, idempotent usage writing with group commit.

A request's answer is released only after its usage record is committed, so a
gateway crash cannot lose the usage of a request the client saw answered.
Committing one row per request would cap throughput at the database's commit
rate; instead every record that arrives while a commit is running joins the
next one (group commit), so latency stays one commit and throughput scales.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from gateway.db import UsageRecord

log = logging.getLogger("bearpaw.usage")


def insert_ignoring_duplicates(engine: Engine, rows: Iterable[dict[str, Any]]) -> None:
    """Insert usage rows; a request id already present is left alone."""
    rows = list(rows)
    if not rows:
        return
    table = UsageRecord.__table__
    dialect = engine.dialect.name
    if dialect == "postgresql":
        stmt = postgresql.insert(table).on_conflict_do_nothing(index_elements=["request_id"])
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).on_conflict_do_nothing(index_elements=["request_id"])
    else:  # pragma: no cover - other databases are not supported targets
        stmt = insert(table)
    with engine.begin() as conn:
        conn.execute(stmt, rows)


def record_row(record: UsageRecord) -> dict[str, Any]:
    return record.model_dump()


class UsageWriter:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def write(self, record: UsageRecord) -> None:
        """Returns once the record is committed."""
        if self._task is None:  # not started (CLI, worker): write directly
            await asyncio.to_thread(insert_ignoring_duplicates, self.engine, [record_row(record)])
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record_row(record), fut))
        self._wake.set()
        await asyncio.shield(fut)

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(
                    insert_ignoring_duplicates, self.engine, [row for row, _ in batch]
                )
            except Exception as exc:  # keep the writer alive; callers see the failure
                log.exception("usage write failed")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task:
            await self._task
            self._task = None
