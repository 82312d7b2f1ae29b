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


def sqlite_writer_lock(engine: Engine) -> Callable[[], AbstractContextManager[None]]:
    """A factory of context managers that hold the database's writer lock;
    a no-op for other databases and for in-memory SQLite."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if fcntl is None or not database or database == ":memory:":
        return contextlib.nullcontext
    path = os.path.abspath(database) + ".writers.lock"
    fd: int | None = None
    opened = threading.Lock()

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        nonlocal fd
        with opened:
            if fd is None:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    return held
