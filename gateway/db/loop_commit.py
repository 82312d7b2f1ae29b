"""A group commit on the event loop's own thread, made only when it cannot wait.

Why: a writer thread competes with the event loop for the GIL. CPython's
sqlite3 lets go of the GIL around every step of a statement, and a thread
that wants it back waits for the holder to let go: up to the 5 ms switch
interval while the loop runs Python. Measured on the 2-core box (one gateway
process, c=16 and c=64, 4 s each, SQLite usage records): a third of the usage
writer thread's ~1,000 group commits (~16 rows each) took over 5 ms, up to
67 ms, which was 2.0 of the 2.5 s the thread spent committing; every answer
in such a group waited for it. A commit on the loop's thread needs no
hand-off; a WAL commit of a few tens of rows costs it a fraction of a
millisecond, work the thread would have done anyway, mostly holding the GIL.

It never makes the loop wait for anyone: the cross-process writer lock is
only tried (gateway/db/write_lock.py), SQLite's busy timeout is 0 on its
connection, and its commits never checkpoint the WAL (a checkpoint fsyncs;
`checkpoint()` is for a thread to call). Whenever the group cannot be
committed at once, `try_commit` says why: BUSY (another process's writer has
the lock now; the usage writer tries again on its next loop turn, for a few
milliseconds) or FAILED (SQLite busy or any other error), and the caller
hands the group to its writer thread, which waits its turn.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Connection, Engine

from gateway.db.write_lock import WriterLock, writer_lock_path

log = logging.getLogger("bearpaw.usage")


class Outcome(enum.Enum):
    COMMITTED = "committed"
    BUSY = "busy"  # the writers' lock is held (another process is committing)
    FAILED = "failed"  # SQLite busy or any other error: for the writer thread


class LoopCommitter:
    def __init__(self, engine: Engine, statement: Any) -> None:
        path = writer_lock_path(engine)
        if path is None:
            raise ValueError("a LoopCommitter needs an SQLite file database")
        self.engine = engine
        self.statement = statement
        self.lock = WriterLock(path)
        self._conn: Connection | None = None
        self.commits = 0  # groups committed here since start
        self.busy = 0  # tries that found the writers' lock held
        self.failed = 0  # tries that failed otherwise (database busy or failing)

    @classmethod
    def supports(cls, engine: Engine) -> bool:
        return writer_lock_path(engine) is not None

    def _connection(self) -> Connection:
        if self._conn is None:
            conn = self.engine.connect()
            # Fail at once instead of sleeping in SQLite's busy handler, and
            # leave checkpoints (and their fsync) to a thread.
            conn.exec_driver_sql("PRAGMA busy_timeout=0")
            conn.exec_driver_sql("PRAGMA wal_autocheckpoint=0")
            conn.commit()
            self._conn = conn
        return self._conn

    def try_commit(self, rows: Sequence[dict[str, Any]]) -> Outcome:
        """Commits `rows` now if nothing stands in the way, else says what
        stood there; nothing was committed unless COMMITTED."""
        with self.lock.held_if_free() as free:
            if not free:
                self.busy += 1
                return Outcome.BUSY
            try:
                conn = self._connection()
                conn.execute(self.statement, list(rows))
                conn.commit()
            except Exception as exc:
                # Busy (another writer of the file), or anything else: the
                # writer thread retries, spools or reports it. Its insert
                # ignores request ids already present, so a commit that
                # landed before the error cannot count twice.
                log.debug("loop commit declined: %s", exc)
                self._discard()
                self.failed += 1
                return Outcome.FAILED
        self.commits += 1
        return Outcome.COMMITTED

    def _discard(self) -> None:
        if self._conn is not None:
            # Never back to the pool: its busy timeout is 0.
            conn, self._conn = self._conn, None
            conn.invalidate()
            conn.close()

    def close(self) -> None:
        self._discard()
        self.lock.close()
