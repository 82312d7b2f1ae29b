"""One writer at a time across processes on an SQLite file, without SQLite's
sleeps.

SQLite lets one transaction write at a time; a second writer that finds the
file locked is put to sleep by the busy handler in steps of 1, 2, 5 ... up to
100 ms and tries again, however soon the lock came free. With
`serve --processes 2` both usage writers group-commit every millisecond or
two, so they collided all the time and each collision cost a sleep: measured
(bench/processes.py, SQLite), p99 1.7 s and 1.27x the req/s of one process,
with a quarter of the CPU idle. An exclusive flock() on a file beside the
database, taken around each usage commit, makes the second writer wait in
the kernel, which wakes it the moment the first one is done.

Every `WriterLock` opens its own file description, and flock() locks belong
to those: two instances exclude each other within one process as well as
across processes (the usage writer's thread and its event-loop committer each
hold one).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from sqlalchemy.engine import Engine

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's own locking alone
    fcntl = None  # type: ignore[assignment]


def writer_lock_path(engine: Engine) -> str | None:
    """The lock file beside the engine's SQLite file; None where no lock is
    needed or possible (other databases, in-memory SQLite, no flock)."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if fcntl is None or not database or database == ":memory:":
        return None
    return os.path.abspath(database) + ".writers.lock"


class WriterLock:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._opened = threading.Lock()

    def _file(self) -> int:
        with self._opened:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            return self._fd

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Waits for the lock as long as it takes."""
        fd = self._file()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def held_if_free(self) -> Iterator[bool]:
        """Takes the lock only if nobody holds it now; yields whether it did."""
        fd = self._file()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._opened:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def sqlite_writer_lock(engine: Engine) -> Callable[[], AbstractContextManager[None]]:
    """A factory of context managers that hold the database's writer lock;
    a no-op for other databases and for in-memory SQLite."""
    path = writer_lock_path(engine)
    if path is None:
        return contextlib.nullcontext
    return WriterLock(path).held
