"""`bearpaw serve --processes 2`: rate limits, budgets and the cache agree
across the worker processes (real command, real Redis, real SQLite, real sockets).

Which worker serves a request is the kernel's choice (the workers share one
listening socket). These tests take that choice out of the picture: each
keep-alive connection is traced to the worker that accepted it (its socket's
inode in /proc/net/tcp, found among that worker's file descriptors), so a
request can be sent to the worker the test names. Every check then sends to
both workers on purpose, and the same check against processes that do not
share their counters (no `limits.redis_url`) shows what it catches.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_process import REPO, GatewayProcess

REDIS_URL = "redis://127.0.0.1:6379/0"
PRICES = {"prices": {"models": {"tiny": {"input": 10000.0, "output": 10000.0}}}}

pytestmark = pytest.mark.skipif(
    not Path("/proc/net/tcp").exists(), reason="needs Linux /proc to trace connections"
)


class ServedProcesses(GatewayProcess):
    """`bearpaw serve --processes N` instead of a single uvicorn process."""

    def __init__(self, *args: Any, processes: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.processes = processes

    def start(self, timeout: float = 180.0) -> ServedProcesses:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        cmd = [*bearpaw_command(), "serve", "--no-worker"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--processes", str(self.processes)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited early:\n{self.log_tail()}")
            # Each worker's startup logs this line once it serves.
            ready = self.log_path.read_text(errors="replace").count('"bearpaw ready"')
            if ready >= self.processes and len(self.workers()) >= self.processes:
                return self
            time.sleep(0.3)
        raise RuntimeError(f"{self.processes} workers not ready after {timeout}s")

    def workers(self) -> list[int]:
        assert self.proc is not None
        return _children(self.proc.pid)

    def stop(self) -> None:
        workers = self.workers() if self.proc and self.proc.poll() is None else []
        super().stop()
        for pid in workers:  # none should be left; never leak one into other tests
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def bearpaw_command() -> list[str]:
    """The installed `bearpaw` entry point of this environment."""
    script = Path(sys.executable).parent / "bearpaw"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from gateway.cli import app; app()"]


def _children(ppid: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == ppid and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _owner(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """The pid whose file descriptors hold the server side of a connection."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == server_port and (
                int(remote.rsplit(":", 1)[1], 16) == client_port
            ):
                inodes.add(f"socket:[{inode}]")
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    return None


class Pinned:
    """HTTP/1.1 requests that all go to one named worker process."""

    def __init__(self, served: ServedProcesses, pid: int) -> None:
        self.served = served
        self.pid = pid
        self.conn: http.client.HTTPConnection | None = None
        self.opened = 0.0

    def _connect(self) -> http.client.HTTPConnection:
        # uvicorn closes a keep-alive connection after 5 s idle: renew before that.
        if self.conn is not None and time.monotonic() - self.opened < 3.0:
            return self.conn
        if self.conn is not None:
            self.conn.close()
        workers = self.served.workers()
        for _ in range(200):
            conn = http.client.HTTPConnection("127.0.0.1", self.served.port, timeout=30)
            conn.request("GET", "/health")
            conn.getresponse().read()  # accepted: some worker now holds it
            if _owner(self.served.port, conn.sock.getsockname()[1], workers) == self.pid:
                self.conn, self.opened = conn, time.monotonic()
                return conn
            conn.close()
        raise RuntimeError(f"no connection reached worker {self.pid} in 200 tries")

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        conn = self._connect()
        raw = json.dumps(body).encode() if body is not None else None
        all_headers = {"content-type": "application/json", **(headers or {})}
        conn.request(method, path, body=raw, headers=all_headers)
        resp = conn.getresponse()
        data = resp.read()
        answer = {k.lower(): v for k, v in resp.getheaders()}
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = data.decode(errors="replace")
        return resp.status, answer, parsed


def _pinned_pair(served: ServedProcesses) -> list[Pinned]:
    workers = served.workers()
    assert len(workers) == 2, workers
    return [Pinned(served, pid) for pid in workers]


def _chat(content: str = "hi there") -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 5,
        "temperature": 0,
    }


def _wait_models(worker: Pinned, key: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, _, body = worker.request("GET", "/v1/models", headers={"authorization": key})
        if status == 200 and any(m["id"] == "tiny" for m in body["data"]):
            return
        time.sleep(0.3)
    raise RuntimeError(f"worker {worker.pid} never discovered the model")


def _serve(tmp: Path, fault_server_session, shared: bool) -> Iterator[ServedProcesses]:
    env = {
        "BEARPAW_CACHE__ENABLED": "true",
        # The cache's processes converge through the database at each sweep.
        "BEARPAW_CACHE__SWEEP_INTERVAL_S": "0.5",
    }
    if shared:
        env["BEARPAW_LIMITS__REDIS_URL"] = REDIS_URL
    served = ServedProcesses(
        tmp, backends=[fault_server_session.base_url], env=env, config=PRICES
    ).start()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def shared_serve(tmp_path_factory, fault_server_session) -> Iterator[ServedProcesses]:
    yield from _serve(tmp_path_factory.mktemp("serve-redis"), fault_server_session, shared=True)


@pytest.fixture(scope="module")
def local_serve(tmp_path_factory, fault_server_session) -> Iterator[ServedProcesses]:
    yield from _serve(tmp_path_factory.mktemp("serve-local"), fault_server_session, shared=False)


def _rpm_outcomes(served: ServedProcesses) -> dict[int, list[int]]:
    """30 requests, alternating between the two workers, for a tenant with
    RPM 10: the statuses each worker answered."""
    key = served.create_key(f"procs-rpm-{secrets.token_hex(4)}", rpm_limit=10)
    auth = {"authorization": f"Bearer {key}"}
    pair = _pinned_pair(served)
    for worker in pair:
        _wait_models(worker, auth["authorization"])
    seen: dict[int, list[int]] = {w.pid: [] for w in pair}
    for i in range(30):
        worker = pair[i % 2]
        status, headers, body = worker.request("POST", "/v1/chat/completions", _chat(), auth)
        if status == 429:
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert int(headers["retry-after"]) >= 1
        seen[worker.pid].append(status)
    return seen


def test_rpm_limit_is_held_together_by_both_processes(shared_serve) -> None:
    seen = _rpm_outcomes(shared_serve)
    statuses = [s for per in seen.values() for s in per]
    assert statuses.count(200) == 10, seen
    assert statuses.count(429) == 20, seen
    # Alternating, the first ten went five to each: both counted in one window.
    for per in seen.values():
        assert per.count(200) == 5 and per.count(429) == 10, seen


def test_without_redis_each_process_counts_alone(local_serve) -> None:
    # The same requests against processes with in-process counters: each
    # admits its own ten, so the tenant gets twice its limit. This is why
    # `limits.redis_url` is needed with --processes > 1 (and serve warns).
    seen = _rpm_outcomes(local_serve)
    for per in seen.values():
        assert per.count(200) == 10, seen
    assert "limits.redis_url" in local_serve.log_tail(400)


def test_hard_budget_is_spent_once_across_processes(shared_serve) -> None:
    tenant = f"procs-budget-{secrets.token_hex(4)}"
    key = shared_serve.create_key(tenant, monthly_budget_usd=0.5)
    auth = {"authorization": f"Bearer {key}"}
    pair = _pinned_pair(shared_serve)
    for worker in pair:
        _wait_models(worker, auth["authorization"])
    # no-store: every request is billed at the backend's price.
    headers = {**auth, "cache-control": "no-store"}
    accepted, cost = 0, 0.0
    refused_by: set[int] = set()
    for i in range(40):
        worker = pair[i % 2]
        status, answer, body = worker.request("POST", "/v1/chat/completions", _chat(), headers)
        if status == 200:
            accepted += 1
            usage = body["usage"]
            cost = (usage["prompt_tokens"] + usage["completion_tokens"]) * 10000 / 1e6
            continue
        assert status == 429, body
        assert body["error"]["code"] == "insufficient_quota"
        refused_by.add(worker.pid)
        if refused_by == {w.pid for w in pair}:
            break
    # Both workers refuse once the tenant's spend, summed over both, reached
    # the budget. The spend of an answer reaches Redis as the answer goes out,
    # so the other worker's next check may run one request before it: at most
    # one request over (without Redis each worker would allow the whole budget).
    assert refused_by == {w.pid for w in pair}
    assert cost > 0
    assert accepted * cost >= 0.5
    assert (accepted - 2) * cost < 0.5, (accepted, cost)


def _metric(worker: Pinned, name: str) -> float:
    status, _, text = worker.request("GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics of worker {worker.pid}")


def _wait_entries(worker: Pinned, want: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _metric(worker, "bearpaw_cache_entries") == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"worker {worker.pid} never reached {want} cache entries")


def test_cache_entries_and_purges_reach_the_other_process(
    shared_serve, fault_server_session
) -> None:
    tenant = f"procs-cache-{secrets.token_hex(4)}"
    key = shared_serve.create_key(tenant)
    auth = {"authorization": f"Bearer {key}"}
    a, b = _pinned_pair(shared_serve)
    for worker in (a, b):
        _wait_models(worker, auth["authorization"])
    question = _chat(f"procs cache question {secrets.token_hex(4)}")
    fault_server_session.reset()
    base_a = _metric(a, "bearpaw_cache_entries")
    base_b = _metric(b, "bearpaw_cache_entries")

    status, headers, first = a.request("POST", "/v1/chat/completions", question, auth)
    assert status == 200 and headers["x-bearpaw-cache"] == "miss"
    _wait_entries(a, base_a + 1)
    # Worker b learns the entry from the database at its next sweep and
    # answers the same question from it: the backend is not asked again.
    _wait_entries(b, base_b + 1)
    status, headers, second = b.request("POST", "/v1/chat/completions", question, auth)
    assert status == 200, second
    assert headers["x-bearpaw-cache"] == "hit" and headers["x-bearpaw-cache-layer"] == "exact"
    assert second["choices"] == first["choices"]
    assert fault_server_session.request_count("/v1/chat/completions") == 1

    # A purge through worker a is seen by worker b at its next sweep.
    admin = {"authorization": f"Bearer {shared_serve.admin_key}"}
    status, _, purged = a.request("POST", f"/admin/tenants/{tenant}/cache/purge", None, admin)
    assert status == 200, purged
    _wait_entries(b, base_b)
    status, headers, _ = b.request("POST", "/v1/chat/completions", question, auth)
    assert status == 200 and headers["x-bearpaw-cache"] == "miss"
    assert fault_server_session.request_count("/v1/chat/completions") == 2


def test_supervisor_replaces_a_killed_worker_and_stops_cleanly(local_serve) -> None:
    served = local_serve
    killed = served.workers()[0]
    ready_before = served.log_path.read_text(errors="replace").count('"bearpaw ready"')
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        log = served.log_path.read_text(errors="replace")
        workers = served.workers()
        if log.count('"bearpaw ready"') > ready_before and killed not in workers:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"no replacement for worker {killed}:\n{served.log_tail()}")
    assert len(workers) == 2
    for worker in _pinned_pair(served):  # both answer, on the same port
        status, _, _ = worker.request("GET", "/health")
        assert status == 200
    # SIGTERM to the supervisor: every worker drains and exits, then it does.
    assert served.proc is not None
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=60) == 0
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
    assert alive == []


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
