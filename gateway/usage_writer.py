"""Durable, idempotent usage writing with group commit.

A request's answer is released only after its usage record is committed, so a
gateway crash cannot lose the usage of a request the client saw answered.
Committing one row per request would cap throughput at the database's commit
rate; instead every record that arrives while a commit is running joins the
next one (group commit), so latency stays one commit and throughput scales.

On an SQLite file the group is committed on the event loop's own thread
whenever that needs no waiting (gateway/db/loop_commit.py says why: the hand-off
to a thread costs GIL waits). While another process of `serve --processes N`
holds the writers' lock, the loop tries again on each of its turns, with what
joined the group meanwhile, for up to `lock_spin_s`; a group still blocked
then, or one that failed otherwise, goes to the writer thread, which waits as
long as it takes.

When the database cannot take a group, the group goes to a local spool
(gateway/resilience/usage_spool.py) with the same durability (fsync before the
answers are released), and a replayer thread hands it to the database once it
is back: a database outage delays usage records, it never loses them nor
refuses the requests they belong to.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from gateway.db import UsageRecord
from gateway.db.loop_commit import LoopCommitter, Outcome
from gateway.db.write_lock import sqlite_writer_lock
from gateway.resilience.dependencies import Dependencies, is_database_error
from gateway.resilience.usage_spool import UsageSpool

log = logging.getLogger("bearpaw.usage")


def insert_ignoring_duplicates(engine: Engine, rows: Iterable[dict[str, Any]]) -> None:
    """Insert usage rows; a request id already present is left alone."""
    rows = list(rows)
    if not rows:
        return
    with engine.begin() as conn:
        conn.execute(_insert_statement(engine), rows)


def _insert_statement(engine: Engine) -> Any:
    table = UsageRecord.__table__
    dialect = engine.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=["request_id"])
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=["request_id"])
    return insert(table)  # other databases are not supported targets


def record_row(record: UsageRecord) -> dict[str, Any]:
    return record.model_dump()


class UsageWriter:
    """Group commit, on the event loop's thread when it can be done at once,
    else on one long-lived writer thread.

    The records a turn of the event loop produced are committed together at
    the end of that turn. What cannot be (another writer holds the file, the
    database is PostgreSQL, down or spooling) goes to the thread, which keeps
    one connection open and commits everything that queued up while its
    previous commit ran. Either way the request only waits on a future."""

    _STOP = object()

    def __init__(
        self,
        engine: Engine,
        spool: UsageSpool | None = None,
        dependencies: Dependencies | None = None,
        replay_interval_s: float = 1.0,
        on_loop: bool = True,
        checkpoint_interval_s: float = 1.0,
        lock_spin_s: float = 0.005,
    ) -> None:
        self.engine = engine
        self.spool = spool
        self.dependencies = dependencies or Dependencies()
        self.dependencies.register("database")
        self.replay_interval_s = replay_interval_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._replayer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Other processes' usage writers on the same SQLite file wait in the
        # kernel for this one, not in SQLite's sleeps (gateway/db/write_lock.py).
        self._writer_lock = sqlite_writer_lock(engine)
        self._on_loop = (
            LoopCommitter(engine, _insert_statement(engine))
            if on_loop and LoopCommitter.supports(engine)
            else None
        )
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._scheduled = False  # a commit of `_pending` is due on the loop
        # Why try again on the next turn rather than hand over at once:
        # measured with `serve --processes 2` on 2 cores (bench/processes.py,
        # three alternating rounds), a third of the loop's tries found the
        # other process committing, and the hand-off to the thread put each
        # of those groups behind a GIL turn, holding the lock meanwhile: 1.39x
        # one process at c=16, 1.70x at c=64. Trying again after the next I/O
        # poll (another commit holds the lock some hundred microseconds) gave
        # 1.59x and 1.82x, with 0.5 % of groups left for the thread. A loop
        # timer was worse than either: libuv's are whole milliseconds.
        self.lock_spin_s = lock_spin_s
        self._busy_since: float | None = None  # first BUSY of the waiting group
        self.lock_retries = 0
        # The loop's commits never checkpoint the WAL; the thread does, this
        # often, when they have added to it.
        self.checkpoint_interval_s = checkpoint_interval_s
        self._checkpointed_at = 0
        self.checkpoints = 0
        self.thread_commits = 0  # groups the writer thread committed

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()
        if self.spool is not None:
            self._replayer = threading.Thread(
                target=self._replay_loop, name="usage-replayer", daemon=True
            )
            self._replayer.start()

    async def write(self, record: UsageRecord) -> None:
        """Returns once the record is committed (or durably spooled)."""
        if self._thread is None:  # not started (CLI, tests): write directly
            await asyncio.to_thread(insert_ignoring_duplicates, self.engine, [record_row(record)])
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        if self._on_loop is not None and not self._spooling():
            self._pending.append((record_row(record), fut))
            if not self._scheduled:
                # After the callbacks already due: the rest of this turn's
                # records join the group.
                self._scheduled = True
                self._loop.call_soon(self._commit_pending)
        else:
            self._queue.put((record_row(record), fut))
        await asyncio.shield(fut)

    def _commit_pending(self, final: bool = False) -> None:
        self._scheduled = False
        batch = self._pending
        if not batch or self._on_loop is None:
            return
        outcome = self._on_loop.try_commit([row for row, _ in batch])
        if outcome is Outcome.COMMITTED:
            self._pending, self._busy_since = [], None
            _settle([f for _, f in batch], None)
            return
        if outcome is Outcome.BUSY and not final:
            now = time.monotonic()
            if self._busy_since is None:
                self._busy_since = now
            if now - self._busy_since < self.lock_spin_s:
                # The group stays pending and grows; tried again after the
                # loop's next poll for I/O.
                self.lock_retries += 1
                self._scheduled = True
                self._loop.call_soon(self._commit_pending)
                return
        self._pending, self._busy_since = [], None
        for item in batch:  # the writer thread waits its turn for them
            self._queue.put(item)

    @property
    def loop_commits(self) -> int:
        """Groups committed on the event loop's thread."""
        return self._on_loop.commits if self._on_loop is not None else 0

    def _run(self) -> None:
        conn = None
        stmt = _insert_statement(self.engine)
        due = time.monotonic() + self.checkpoint_interval_s
        while True:
            try:
                first = self._queue.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                first = None
            if time.monotonic() >= due:
                conn = self._checkpoint(conn)
                due = time.monotonic() + self.checkpoint_interval_s
            if first is None:
                continue
            if first is self._STOP:
                break
            batch = [first]
            stop = self._drain(batch)
            error: Exception | None = None
            try:
                if self._spooling():
                    # Behind the records already waiting, so replay keeps their order.
                    self.spool.append([row for row, _ in batch])  # type: ignore[union-attr]
                else:
                    try:
                        if conn is None:
                            conn = self.engine.connect()
                        with self._writer_lock():
                            # What queued while another process's writer held
                            # the lock joins too: otherwise the writers take
                            # turns committing small groups, and every record
                            # that arrived during a wait waits a turn more.
                            if not stop:
                                stop = self._drain(batch)
                            conn.execute(stmt, [row for row, _ in batch])
                            conn.commit()
                        self.thread_commits += 1
                    except Exception as exc:
                        if conn is not None:
                            conn.close()
                            conn = None
                        if self.spool is None or not is_database_error(exc):
                            raise
                        self.dependencies.failed("database", exc)
                        self.spool.append([row for row, _ in batch])
            except Exception as exc:  # keep the writer alive; callers see the failure
                log.exception("usage write failed")
                error = exc
            self._loop.call_soon_threadsafe(_settle, [f for _, f in batch], error)
            if stop:
                break
        if conn is not None:
            conn.close()

    def _checkpoint(self, conn: Any) -> Any:
        """Copies the WAL's frames into the database file (PASSIVE: without
        stopping readers or writers) when the loop's commits added to it."""
        committer = self._on_loop  # the loop may drop it meanwhile (close)
        if committer is None or committer.commits == self._checkpointed_at:
            return conn
        self._checkpointed_at = committer.commits
        try:
            if conn is None:
                conn = self.engine.connect()
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            conn.commit()
            self.checkpoints += 1
        except Exception:
            log.warning("WAL checkpoint failed", exc_info=True)
            if conn is not None:
                conn.close()
            return None
        return conn

    def _drain(self, batch: list[Any]) -> bool:
        """Moves everything queued now into ``batch``; True if a stop was among it."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is self._STOP:
                return True
            batch.append(item)

    def _spooling(self) -> bool:
        if self.spool is None:
            return False
        return self.spool.depth > 0 or self.dependencies.is_down("database")

    def _replay_loop(self) -> None:
        assert self.spool is not None
        scans = 0
        while not self._stopping.wait(self.replay_interval_s):
            scans += 1
            if scans % 10 == 0:
                self.spool.scan()  # segments a killed process left behind
            if self.spool.depth == 0:
                continue
            self.replay_once()

    def replay_once(self) -> int:
        """Hands spooled records to the database; returns how many went."""
        if self.spool is None:
            return 0
        try:
            done = self.spool.replay(lambda rows: insert_ignoring_duplicates(self.engine, rows))
        except Exception as exc:
            if is_database_error(exc):
                self.dependencies.failed("database", exc)
            else:
                log.exception("usage spool replay failed")
            return 0
        left = self.spool.depth
        self.dependencies.ok(
            "database", degraded=f"{left} usage records still spooled" if left else None
        )
        return done

    async def close(self) -> None:
        # Where this process's commits went (bench/processes.py reads it).
        log.info(
            "usage writer closing: %d groups committed on the loop, %d by the thread; "
            "%d tries again on the loop",
            self.loop_commits,
            self.thread_commits,
            self.lock_retries,
        )
        if self._on_loop is not None:
            # What this turn still holds goes first, ahead of the stop (to
            # the thread, if another process has the lock).
            self._commit_pending(final=True)
            self._on_loop.close()
            self._on_loop = None
        if self._thread is not None:
            self._queue.put(self._STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._replayer is not None:
            self._stopping.set()
            await asyncio.to_thread(self._replayer.join)
            self._replayer = None
        if self.spool is not None:
            if self.spool.depth and not self.dependencies.is_down("database"):
                await asyncio.to_thread(self.replay_once)
            self.spool.close()


def _settle(futures: list[asyncio.Future[None]], error: Exception | None) -> None:
    for fut in futures:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
