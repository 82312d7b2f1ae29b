"""Async jobs (`Prefer: respond-async`) through a real gateway and worker, and
the embedded default: `bearpaw serve` with no broker configured."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import text

from tests.support.processes import BearpawStack, bearpaw_env
from tests.support.vllm_server import REPO_ROOT, VllmServer, free_port

ASYNC = {"prefer": "respond-async"}
CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Say something about bears."}],
    "max_tokens": 8,
    "temperature": 0,
}


def _http(base: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"authorization": f"Bearer {key}"}, timeout=60)


def _poll(client: httpx.Client, location: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(location).json()
        if job["status"] not in ("queued", "in_progress"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {location} still {job['status']}")


def test_async_job_answers_what_the_sync_call_would(bearpaw_stack: BearpawStack) -> None:
    client = _http(bearpaw_stack.gateway.url, bearpaw_stack.api_key)
    resp = client.post("/v1/chat/completions", json=CHAT, headers=ASYNC)
    assert resp.status_code == 202
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["object"] == "job" and job["status"] == "queued" and job["response"] is None
    done = _poll(client, resp.headers["location"])
    assert done["status"] == "completed", done
    assert done["completed_at"] >= done["created_at"]
    body = done["response"]["body"]
    assert done["response"]["status_code"] == 200
    sync = client.post("/v1/chat/completions", json=CHAT, headers={"cache-control": "no-cache"})
    assert sync.status_code == 200
    assert set(body) == set(sync.json())
    assert body["choices"][0]["message"] == sync.json()["choices"][0]["message"]
    # Metered once, as an async request, under the original request's id.
    with bearpaw_stack.engine.connect() as conn:
        rows = list(
            conn.execute(
                text("SELECT source FROM usage_records WHERE request_id = :r"),
                {"r": resp.headers["x-request-id"]},
            )
        )
    assert rows == [("async",)]


def test_async_job_error_is_the_sync_error(bearpaw_stack: BearpawStack) -> None:
    client = _http(bearpaw_stack.gateway.url, bearpaw_stack.api_key)
    bad = {**CHAT, "model": "no-such-model"}
    resp = client.post("/v1/chat/completions", json=bad, headers=ASYNC)
    assert resp.status_code == 202
    job = _poll(client, resp.headers["location"])
    sync = client.post("/v1/chat/completions", json=bad)
    assert job["status"] == "failed"
    assert job["response"] == {"status_code": sync.status_code, "body": sync.json()}
    # Validation errors are answered at once, as they would be synchronously.
    invalid = client.post("/v1/chat/completions", json={"model": "tiny"}, headers=ASYNC)
    assert invalid.status_code == 400 and invalid.json()["error"]


def test_jobs_are_private_and_cancellable(bearpaw_stack: BearpawStack) -> None:
    client = _http(bearpaw_stack.gateway.url, bearpaw_stack.api_key)
    other = _http(bearpaw_stack.gateway.url, bearpaw_stack.other_key)
    bearpaw_stack.worker.stop()  # the job stays queued until we say so
    try:
        resp = client.post("/v1/chat/completions", json=CHAT, headers=ASYNC)
        location = resp.headers["location"]
        assert other.get(location).status_code == 404
        assert other.delete(location).status_code == 404
        cancelled = client.delete(location)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert client.delete(location).status_code == 400
    finally:
        bearpaw_stack.ensure_worker()
    time.sleep(2.0)  # the restarted worker re-queues unfinished work; this job is not
    assert client.get(location).json()["status"] == "cancelled"
    assert client.get("/v1/jobs/job_nope").status_code == 404


def test_embedded_default_serve_runs_a_job(tmp_path: Path, vllm_server: VllmServer) -> None:
    """`bearpaw serve` with nothing configured: SQLite, the SQLite-backed broker and
    a worker process started beside the gateway."""
    from gateway.db import get_engine, migrate
    from gateway.tenants import create_key, create_tenant

    env = bearpaw_env(tmp_path, vllm_server.base_url, BEARPAW_CACHE__ENABLED="false")
    env.pop("BEARPAW_BROKER_URL", None)
    env["BEARPAW_WORKERS__CONCURRENCY"] = "1"
    url = f"sqlite:///{(tmp_path / 'bearpaw.db').resolve()}"
    migrate(url)
    create_tenant(get_engine(url), "solo")
    key = create_key(get_engine(url), "solo").secret
    port = free_port()
    workers: list[int] = []
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "bearpaw"), "serve", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        client = _http(f"http://127.0.0.1:{port}", key)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "bearpaw serve did not come up"
            time.sleep(0.5)
        resp = client.post("/v1/chat/completions", json=CHAT, headers=ASYNC)
        assert resp.status_code == 202
        job = _poll(client, resp.headers["location"], timeout=180)
        assert job["status"] == "completed", job
        assert (tmp_path / "broker.db").exists()

        masters = [pid for pid in _children(proc.pid) if b"celery" in _cmdline(pid)]
        assert len(masters) == 1, f"serve's children: {_children(proc.pid)}"
        workers = masters + _children(masters[0])  # the Celery master and its pool
        # What `docker stop` or systemd does: SIGTERM to serve alone. It must not
        # leave its worker (or the worker's pool children) running.
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while left := [pid for pid in workers if _running(pid)]:
            assert time.monotonic() < deadline, f"serve exited and left {left} running"
            time.sleep(0.2)
    finally:
        for pid in workers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if _group_running(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _children(pid: int) -> list[int]:
    candidates = (int(p.name) for p in Path("/proc").glob("[0-9]*"))
    return [c for c in candidates if (state := _state(c)) and int(state[1]) == pid]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _state(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; it only waits to be reaped)."""
    state = _state(pid)
    return bool(state) and state[0] != "Z"


def _group_running(pgid: int) -> bool:
    states = (_state(int(p.name)) for p in Path("/proc").glob("[0-9]*"))
    return any(st and st[0] != "Z" and int(st[2]) == pgid for st in states)
