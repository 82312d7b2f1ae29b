"""A durable local spool for usage records the database cannot take.

When the database is down, the usage writer appends each group of records to a
segment file here, with one write and one fsync per group (the same group
commit the database gets), and only then releases the answers. A replayer
inserts the segments into the database, oldest first and in the order written,
once it is back; each record's request id is its primary key and the insert
skips ids already present, so a record is counted exactly once even when a
segment is replayed twice (a crash between insert and unlink).

Every process writes its own segments and holds an exclusive `flock` on the one
it appends to; a replayer skips a locked segment, so a segment left by a killed
process (no lock any more) is replayed by whichever process gets to it first,
and a live process's open segment is left to that process.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

log = logging.getLogger("bearpaw.usage.spool")

SUFFIX = ".jsonl"
# Columns stored as ISO text in the spool and turned back into datetimes on replay.
_DATETIME_FIELDS = ("created_at",)


@dataclass
class _Segment:
    path: Path
    records: int
    oldest: float  # unix time of its first record


class UsageSpool:
    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._current: _Segment | None = None
        # Segments waiting to be replayed, oldest first (the open one included).
        self._segments: list[_Segment] = []
        self._seq = 0
        self.scan()

    # -------------------------------------------------------------- state
    @property
    def depth(self) -> int:
        """Records in the spool that the database does not have yet."""
        with self._lock:
            return sum(s.records for s in self._segments)

    def oldest_age_s(self) -> float | None:
        with self._lock:
            if not self._segments:
                return None
            return max(0.0, self.clock() - min(s.oldest for s in self._segments))

    def scan(self) -> None:
        """Counts the segments on disk (left by this data dir's earlier or
        other processes), so they show in the depth and get replayed."""
        with self._lock:
            own = self._current.path if self._current is not None else None
        found = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path == own:
                continue
            rows = _read(path)
            if rows:  # an empty file may be another process's segment just opened
                found.append(_Segment(path, len(rows), _ts(rows[0])))
        with self._lock:
            if self._current is not None:
                found.append(self._current)
            found.sort(key=lambda s: s.path.name)
            self._segments = found

    # ------------------------------------------------------------- append
    def append(self, rows: list[dict[str, Any]]) -> None:
        """Makes `rows` durable: returns after they are written and fsync'd."""
        now = self.clock()
        data = b"".join(orjson.dumps({"t": now, "row": _encode(row)}) + b"\n" for row in rows)
        with self._lock:
            if self._file is None:
                self._open_segment(now)
            assert self._file is not None and self._current is not None
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._current.records += len(rows)

    def _open_segment(self, now: float) -> None:
        self._seq += 1
        # Names sort by time, so replay follows the order records were spooled.
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}{SUFFIX}"
        path = self.directory / name
        f = path.open("ab")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        _fsync_dir(self.directory)  # the new name survives a crash too
        self._file = f
        self._current = _Segment(path, 0, now)
        self._segments.append(self._current)

    def _rotate(self) -> None:
        """Closes the open segment (releasing its lock) so it can be replayed;
        the next append starts a new one."""
        if self._file is not None:
            self._file.close()
            self._file = None
            current = self._current
            if current is not None and current.records == 0:
                self._segments.remove(current)
                _unlink(current.path)
            self._current = None

    # ------------------------------------------------------------- replay
    def replay(self, insert: Callable[[list[dict[str, Any]]], None], chunk: int = 500) -> int:
        """Inserts spooled records with `insert` (which must skip request ids
        already present), oldest first; returns how many were replayed.

        Stops at the first failure (the database went away again) and keeps
        what is left for the next call."""
        with self._lock:
            self._rotate()
        self.scan()  # and segments other processes left meanwhile
        with self._lock:
            pending = [s for s in self._segments if s is not self._current]
        done = 0
        for segment in pending:
            with segment.path.open("rb") as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process still appends to it
                rows = _parse(f.read())
                for start in range(0, len(rows), chunk):
                    insert([_decode(r["row"]) for r in rows[start : start + chunk]])
                # Unlinked while still locked: no other replayer can take it
                # between the insert and the unlink.
                _unlink(segment.path)
            done += len(rows)
            with self._lock:
                if segment in self._segments:
                    self._segments.remove(segment)
            log.info("replayed %d spooled usage records from %s", len(rows), segment.path.name)
        return done

    def close(self) -> None:
        with self._lock:
            self._rotate()


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for name in _DATETIME_FIELDS:
        value = out.get(name)
        if isinstance(value, datetime):
            out[name] = value.isoformat()
    return out


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for name in _DATETIME_FIELDS:
        value = out.get(name)
        if isinstance(value, str):
            out[name] = datetime.fromisoformat(value)
    return out


def _parse(data: bytes) -> list[dict[str, Any]]:
    rows = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            # A torn last line: the process died inside the write, before the
            # fsync returned, so no client was answered on that record.
            log.warning("skipping a torn spool line")
    return rows


def _read(path: Path) -> list[dict[str, Any]] | None:
    try:
        return _parse(path.read_bytes())
    except FileNotFoundError:
        return None


def _ts(entry: dict[str, Any]) -> float:
    return float(entry.get("t") or time.time())


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def spooled_request_ids(directory: Path) -> Iterable[str]:
    """Request ids in the spool (for tests and operators)."""
    for path in sorted(Path(directory).glob(f"*{SUFFIX}")):
        for entry in _read(path) or []:
            yield str(entry["row"].get("request_id"))
