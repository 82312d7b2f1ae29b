"""Units of the outage machinery: the usage spool, the writer's fallback to it,
dependency states, the task outbox and the key cache's stale-if-error.

The database that is "down" here is a real PostgreSQL URL on a port nothing
listens on (connection refused, as a stopped server gives); the integration
tests in test_outages.py stop and restart real servers."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from gateway.auth import KeyCache
from gateway.db import UsageRecord, migrate
from gateway.errors import APIError
from gateway.resilience.dependencies import DOWN, UP, Dependencies
from gateway.resilience.outbox import TaskOutbox
from gateway.resilience.usage_spool import UsageSpool, spooled_request_ids
from gateway.usage_writer import UsageWriter, insert_ignoring_duplicates, record_row
from tests.support.vllm_server import free_port


def _record(i: int, tokens: int = 3) -> UsageRecord:
    return UsageRecord(
        request_id=f"req_{i:05d}",
        tenant_id="t1",
        model="tiny",
        prompt_tokens=tokens,
        completion_tokens=tokens,
    )


@pytest.fixture
def sqlite_engine(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    migrate(url)
    engine = create_engine(url)
    yield engine
    engine.dispose()


def _count(engine) -> tuple[int, int]:
    with engine.connect() as conn:
        n, tokens = conn.execute(
            select(func.count(), func.coalesce(func.sum(UsageRecord.completion_tokens), 0))
        ).one()
    return int(n), int(tokens)


def _dead_postgres():
    # Nothing listens on this port: every connect is refused, like a stopped server.
    return create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test",
        connect_args={"connect_timeout": 2},
    )


def test_spool_replays_in_order_exactly_once(tmp_path: Path, sqlite_engine) -> None:
    spool = UsageSpool(tmp_path / "spool")
    spool.append([record_row(_record(i)) for i in range(3)])
    spool.append([record_row(_record(i)) for i in range(3, 5)])
    assert spool.depth == 5
    assert spool.oldest_age_s() is not None
    seen: list[str] = []

    def insert(rows):
        seen.extend(r["request_id"] for r in rows)
        insert_ignoring_duplicates(sqlite_engine, rows)

    assert spool.replay(insert) == 5
    assert seen == [f"req_{i:05d}" for i in range(5)]
    assert spool.depth == 0 and spool.oldest_age_s() is None
    assert list((tmp_path / "spool").iterdir()) == []
    # Replaying records the database already has (a crash between insert and
    # unlink) adds nothing.
    spool.append([record_row(_record(i)) for i in range(5)])
    spool.replay(lambda rows: insert_ignoring_duplicates(sqlite_engine, rows))
    assert _count(sqlite_engine) == (5, 15)


def test_spool_keeps_what_a_failed_replay_did_not_insert(tmp_path: Path, sqlite_engine) -> None:
    spool = UsageSpool(tmp_path / "spool")
    spool.append([record_row(_record(i)) for i in range(4)])

    def broken(rows):
        raise ConnectionError("database went away again")

    with pytest.raises(ConnectionError):
        spool.replay(broken)
    assert spool.depth == 4
    spool.replay(lambda rows: insert_ignoring_duplicates(sqlite_engine, rows))
    assert _count(sqlite_engine) == (4, 12)


def test_spool_skips_a_torn_line_and_a_live_processs_segment(tmp_path: Path, sqlite_engine) -> None:
    directory = tmp_path / "spool"
    spool = UsageSpool(directory)
    spool.append([record_row(_record(1))])
    spool.close()
    # A process killed inside a write leaves a line without its end.
    segment = next(directory.iterdir())
    with segment.open("ab") as f:
        f.write(b'{"t": 1, "row": {"request_id": "req_torn"')
    # Another live process holds its open segment locked.
    live = directory / "99999999999999999999-1-000001.jsonl"
    live.write_bytes(
        b'{"t": 1, "row": {"request_id": "req_live", "tenant_id": "t", "model": "m"}}\n'
    )
    holder = live.open("rb")
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        fresh = UsageSpool(directory)  # a restarted process finds both segments
        assert fresh.depth == 2
        assert fresh.replay(lambda rows: insert_ignoring_duplicates(sqlite_engine, rows)) == 1
        assert live.exists() and not segment.exists()
    finally:
        holder.close()
    assert list(spooled_request_ids(directory)) == ["req_live"]
    assert _count(sqlite_engine) == (1, 3)


def test_writer_spools_when_the_database_is_down(tmp_path: Path, sqlite_engine) -> None:
    deps = Dependencies()
    spool = UsageSpool(tmp_path / "spool")
    dead = _dead_postgres()
    writer = UsageWriter(dead, spool=spool, dependencies=deps, replay_interval_s=3600)

    async def run() -> None:
        writer.start()
        # Every write returns (durably spooled) although the database refuses.
        await asyncio.gather(*(writer.write(_record(i)) for i in range(20)))
        await writer.close()

    asyncio.run(run())
    assert deps.status("database").state == DOWN
    assert spool.depth == 20
    assert sorted(spooled_request_ids(tmp_path / "spool")) == [f"req_{i:05d}" for i in range(20)]
    # The database is back (here: the other engine): the replay hands all over.
    writer.engine = sqlite_engine
    assert writer.replay_once() == 20
    assert spool.depth == 0 and deps.status("database").state == UP
    assert _count(sqlite_engine) == (20, 60)


def test_writer_without_a_spool_reports_the_failure(sqlite_engine) -> None:
    writer = UsageWriter(_dead_postgres())

    async def run() -> None:
        writer.start()
        try:
            with pytest.raises(Exception, match="(?i)connect"):
                await writer.write(_record(1))
        finally:
            await writer.close()

    asyncio.run(run())


def test_spool_survives_sigkill_mid_load(tmp_path: Path, sqlite_engine) -> None:
    """A process appending groups is SIGKILLed: every group it reported as
    durable is in the spool, and a new process replays them."""
    directory = tmp_path / "spool"
    acked = tmp_path / "acked"
    script = f"""
import sys
from gateway.resilience.usage_spool import UsageSpool
spool = UsageSpool({str(directory)!r})
i = 0
with open({str(acked)!r}, "a") as out:
    while True:
        rows = [{{"request_id": f"req_{{i + k}}", "tenant_id": "t", "model": "m",
                  "completion_tokens": 1}} for k in range(10)]
        spool.append(rows)
        i += 10
        out.write(f"{{i}}\\n"); out.flush()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if acked.exists() and len(acked.read_text().split()) >= 30:
            break
        time.sleep(0.05)
    os.kill(proc.pid, 9)
    proc.wait()
    reported = int(acked.read_text().split()[-1])
    assert reported >= 300
    ids = list(spooled_request_ids(directory))
    assert len(ids) == len(set(ids))
    assert {f"req_{k}" for k in range(reported)} <= set(ids)
    spool = UsageSpool(directory)
    assert spool.depth == len(ids)
    spool.replay(lambda rows: insert_ignoring_duplicates(sqlite_engine, rows))
    assert _count(sqlite_engine)[0] == len(ids)


def test_dependencies_states() -> None:
    now = [100.0]
    deps = Dependencies(clock=lambda: now[0])
    deps.register("redis")
    assert deps.snapshot()["redis"]["state"] == "up"
    deps.failed("redis", ConnectionError("refused"))
    now[0] = 103.0
    snap = deps.snapshot()["redis"]
    assert snap["state"] == "down" and snap["for_s"] == 3.0
    assert "refused" in snap["last_error"] and deps.is_down("redis")
    deps.ok("redis", degraded="2 messages waiting")
    assert deps.snapshot()["redis"]["state"] == "degraded"
    deps.ok("redis")
    assert deps.snapshot()["redis"] == {
        "state": "up",
        "for_s": 0.0,
        "consecutive_failures": 0,
        "last_error": "ConnectionError: refused",
        "detail": None,
    }


class _FlakyQueue:
    def __init__(self) -> None:
        self.up = False
        self.sent: list[tuple[str, str]] = []

    async def send_async(self, name: str, object_id: str) -> None:
        if not self.up:
            raise ConnectionRefusedError("broker down")
        self.sent.append((name, object_id))


def test_outbox_keeps_messages_in_order_until_the_broker_is_back() -> None:
    async def run() -> None:
        queue, deps = _FlakyQueue(), Dependencies()
        outbox = TaskOutbox(queue, deps)  # type: ignore[arg-type]
        assert await outbox.send("run_job", "job_1") is False
        assert deps.is_down("broker")
        await outbox.send_async("run_job", "job_2")
        assert outbox.depth == 2 and queue.sent == []
        queue.up = True
        # Still down in its books until a probe or flush says otherwise: keep order.
        assert await outbox.send("run_job", "job_3") is False
        assert await outbox.flush() == 3
        assert queue.sent == [("run_job", "job_1"), ("run_job", "job_2"), ("run_job", "job_3")]
        deps.ok("broker")
        assert await outbox.send("run_job", "job_4") is True

    asyncio.run(run())


def test_outbox_reject_policy_answers_503_with_retry_after() -> None:
    async def run() -> None:
        queue, deps = _FlakyQueue(), Dependencies()
        outbox = TaskOutbox(queue, deps, reject_when_down=True, retry_after_s=7)  # type: ignore[arg-type]
        with pytest.raises(APIError) as err:
            await outbox.send_async("run_batch", "batch_1")
        assert err.value.status == 503 and err.value.headers["retry-after"] == "7"
        assert err.value.code == "dependency_unavailable" and "broker" in err.value.message
        with pytest.raises(APIError):
            outbox.check_accepting()
        # A cancel's wake-up is never refused: its state is in the database.
        await outbox.wake("run_batch", "batch_1")
        assert outbox.depth == 1

    asyncio.run(run())


def test_key_cache_trusts_for_ttl_and_serves_stale_up_to_its_bound() -> None:
    cache = KeyCache(ttl=0.05, stale=0.3)
    cache.put("d", None)
    assert cache.get("d") == (True, None)
    time.sleep(0.06)
    assert cache.get("d") == (False, None)  # past the ttl: look it up again
    assert cache.stale_get("d") == (True, None)  # unless the database is down
    time.sleep(0.3)
    assert cache.stale_get("d") == (False, None)


def test_sqlite_writer_lock_excludes_other_processes(tmp_path) -> None:
    """The usage writers of several processes on one SQLite file take turns on
    a flock beside it (gateway/db/write_lock.py), so none sleeps in SQLite's
    busy handler; other databases and in-memory SQLite need no lock."""
    import contextlib
    import subprocess
    import sys

    from sqlalchemy import create_engine

    from gateway.db.write_lock import sqlite_writer_lock

    db = tmp_path / "bearpaw.db"
    held = sqlite_writer_lock(create_engine(f"sqlite:///{db}"))
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "    print('free')\n"
        "except BlockingIOError:\n"
        "    print('taken')\n"
    )
    lock_file = str(db) + ".writers.lock"

    def other_process_sees() -> str:
        out = subprocess.run([sys.executable, "-c", probe, lock_file], capture_output=True)
        return out.stdout.decode().strip()

    with held():
        assert other_process_sees() == "taken"
    assert other_process_sees() == "free"
    assert sqlite_writer_lock(create_engine("sqlite://")) is contextlib.nullcontext
    pg = create_engine("postgresql+psycopg://u@127.0.0.1:1/x")
    assert sqlite_writer_lock(pg) is contextlib.nullcontext


def _other_process_holding(lock_file: str) -> subprocess.Popen[str]:
    """A process that holds the usage writers' flock until its stdin closes."""
    code = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, lock_file],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_writer_commits_on_the_loop_when_nothing_waits(tmp_path: Path, sqlite_engine) -> None:
    """A turn's records commit together on the event loop's thread: one group
    for 50 concurrent writes, none through the writer thread."""
    writer = UsageWriter(sqlite_engine)

    async def run() -> None:
        writer.start()
        await asyncio.gather(*(writer.write(_record(i)) for i in range(50)))
        assert writer.loop_commits == 1
        await asyncio.gather(*(writer.write(_record(i)) for i in range(50, 60)))
        assert writer.loop_commits == 2
        await writer.close()

    asyncio.run(run())
    assert _count(sqlite_engine) == (60, 180)


def test_loop_commit_hands_over_while_another_process_writes(tmp_path: Path, sqlite_engine) -> None:
    """While another process holds the writers' lock the loop does not wait
    for it: it tries again on its next turns for `lock_spin_s`, then the group
    goes to the writer thread, whose answers wait until the lock is free, and
    every record lands exactly once."""
    lock_file = str(tmp_path / "usage.db") + ".writers.lock"
    writer = UsageWriter(sqlite_engine, lock_spin_s=0.005)
    holder = _other_process_holding(lock_file)

    async def run() -> None:
        writer.start()
        writes = asyncio.gather(*(writer.write(_record(i)) for i in range(20)))
        ticks = 0
        for _ in range(20):  # the loop keeps turning meanwhile
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not writes.done()
        assert writer.loop_commits == 0 and _count(sqlite_engine)[0] == 0
        # Tried again for 5 ms, then handed to the thread, which waits.
        assert writer.lock_retries >= 1 and writer._pending == []
        holder.stdin.close()  # type: ignore[union-attr]
        holder.wait(10)
        await asyncio.wait_for(writes, 10)
        assert writer.loop_commits == 0 and writer.thread_commits == 1
        # The lock is free again: the next turn's group commits on the loop.
        await writer.write(_record(99))
        assert writer.loop_commits == 1
        await writer.close()

    try:
        asyncio.run(run())
    finally:
        if holder.poll() is None:
            holder.kill()
    assert _count(sqlite_engine) == (21, 63)


def test_loop_commit_tries_again_while_another_process_commits(
    tmp_path: Path, sqlite_engine
) -> None:
    """Within `lock_spin_s` the group stays on the loop: tried again on each
    turn, joined by what arrives meanwhile, and committed there, in one group,
    once the other process lets go; the writer thread commits nothing."""
    lock_file = str(tmp_path / "usage.db") + ".writers.lock"
    writer = UsageWriter(sqlite_engine, lock_spin_s=60.0)
    holder = _other_process_holding(lock_file)

    async def run() -> None:
        writer.start()
        first = asyncio.gather(*(writer.write(_record(i)) for i in range(10)))
        await asyncio.sleep(0.05)
        later = asyncio.gather(*(writer.write(_record(i)) for i in range(10, 15)))
        await asyncio.sleep(0.05)
        assert not first.done() and not later.done()
        assert writer.lock_retries >= 10 and len(writer._pending) == 15
        holder.stdin.close()  # type: ignore[union-attr]
        holder.wait(10)
        await asyncio.wait_for(asyncio.gather(first, later), 10)
        assert writer.loop_commits == 1 and writer.thread_commits == 0
        await writer.close()

    try:
        asyncio.run(run())
    finally:
        if holder.poll() is None:
            holder.kill()
    assert _count(sqlite_engine) == (15, 45)


def test_loop_commit_hands_over_while_sqlite_is_locked(tmp_path: Path, sqlite_engine) -> None:
    """Another connection mid-write (a batch worker, a migration) makes SQLite
    itself busy: the loop's commit fails at once instead of sleeping, and the
    writer thread commits the group once the other transaction ends."""
    import sqlite3

    other = sqlite3.connect(str(tmp_path / "usage.db"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    writer = UsageWriter(sqlite_engine)

    async def run() -> None:
        writer.start()
        writes = asyncio.gather(*(writer.write(_record(i)) for i in range(5)))
        await asyncio.sleep(0.3)
        assert not writes.done() and writer.loop_commits == 0
        other.execute("COMMIT")
        await asyncio.wait_for(writes, 30)
        await writer.close()

    try:
        asyncio.run(run())
    finally:
        other.close()
    assert _count(sqlite_engine) == (5, 15)


def test_writer_close_commits_what_the_turn_still_holds(sqlite_engine) -> None:
    writer = UsageWriter(sqlite_engine)

    async def run() -> None:
        writer.start()
        tasks = [asyncio.ensure_future(writer.write(_record(i))) for i in range(7)]
        await asyncio.sleep(0)  # the writes are pending, their commit not yet run
        await writer.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

    asyncio.run(run())
    assert _count(sqlite_engine) == (7, 21)


def _rows_in_the_main_file(db: Path, tmp_path: Path) -> int:
    """Rows in the database file alone, without what its WAL holds."""
    import shutil
    import sqlite3

    copy = tmp_path / "main-file-only.db"
    shutil.copyfile(db, copy)
    probe = sqlite3.connect(str(copy))
    try:
        return probe.execute("SELECT count(*) FROM usage_records").fetchone()[0]
    finally:
        probe.close()


@pytest.mark.parametrize("interval_s", [3600.0, 0.05])
def test_writer_checkpoints_what_the_loop_committed(
    tmp_path: Path, sqlite_engine, interval_s: float
) -> None:
    """The loop's connection never checkpoints (a checkpoint fsyncs): its
    commits stay in the WAL until the writer thread checkpoints them, every
    `checkpoint_interval_s`, so the WAL does not grow without end."""
    from gateway.db.engine import get_engine

    db = tmp_path / "usage.db"
    engine = get_engine(f"sqlite:///{db}")  # the product's engine: WAL on every connection
    writer = UsageWriter(engine, checkpoint_interval_s=interval_s)

    async def run() -> int:
        writer.start()
        for i in range(30):
            await writer.write(_record(i))
        assert writer.loop_commits == 30
        for _ in range(50):
            if writer.checkpoints:
                break
            await asyncio.sleep(0.02)
        seen = _rows_in_the_main_file(db, tmp_path)
        await writer.close()
        return seen

    in_main_file = asyncio.run(run())
    if interval_s > 60:
        assert writer.checkpoints == 0 and in_main_file == 0
    else:
        assert writer.checkpoints >= 1 and in_main_file == 30
    assert _count(engine) == (30, 90)
    engine.dispose()
