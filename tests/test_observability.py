"""Metrics, request ids in logs, readiness and graceful shutdown, against a real
gateway process (``uvicorn gateway.main:app``) in front of the fault server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.fault_server import FaultServer

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GatewayProcess:
    popen: subprocess.Popen[bytes]
    root: str
    key: str
    log_path: Path

    def log_lines(self) -> list[dict]:
        lines = []
        for raw in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        return lines

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_gateway(
    tmp: Path, upstream_url: str, env_extra: dict[str, str] | None = None
) -> GatewayProcess:
    config = {
        "data_dir": str(tmp),
        "log_level": "info",
        "backends": {
            "discover": [],
            "health_interval": 0.5,
            "models": [{"name": "tiny", "replicas": [{"url": upstream_url, "vllm": False}]}],
        },
        "cache": {"enabled": False},
        "workers": {"embedded": False},
    }
    config_path = tmp / "bearpaw.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "BEARPAW_CONFIG": str(config_path), **(env_extra or {})}
    issue = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gateway.db import get_engine, migrate\n"
            "from gateway.settings import get_settings\n"
            "from gateway.tenants import create_tenant, create_key\n"
            "s = get_settings(); migrate(s.db_url); e = get_engine(s.db_url)\n"
            "create_tenant(e, 'obs'); print(create_key(e, 'obs').secret)\n",
        ],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    key = issue.stdout.strip().splitlines()[-1]
    port = _free_port()
    log_path = tmp / "gateway.log"
    popen = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "gateway.main:app",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "30",
        ],
        cwd=ROOT,
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    gw = GatewayProcess(popen, f"http://127.0.0.1:{port}", key, log_path)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError("gateway exited:\n" + log_path.read_text()[-3000:])
        try:
            if httpx.get(gw.root + "/health", timeout=1).status_code == 200:
                return gw
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    gw.stop()
    raise RuntimeError("gateway did not start:\n" + log_path.read_text()[-3000:])


def _wait_ready(gw: GatewayProcess, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(gw.root + "/ready", timeout=2).status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError("gateway never became ready")


def _chat(stream: bool = False) -> dict:
    body: dict = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "one two three four five six"}],
        "max_tokens": 12,
    }
    if stream:
        body["stream"] = True
    return body


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultServer]:
    server = FaultServer(models=("tiny",)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(
    upstream: FaultServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    gw = start_gateway(tmp_path_factory.mktemp("obs"), upstream.base_url)
    _wait_ready(gw)
    yield gw
    gw.stop()


def test_metrics_exposition_has_families_after_traffic(gateway: GatewayProcess) -> None:
    headers = {"authorization": f"Bearer {gateway.key}"}
    with httpx.Client(base_url=gateway.root, headers=headers, timeout=30) as client:
        assert client.post("/v1/chat/completions", json=_chat()).status_code == 200
        with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) as r:
            assert r.status_code == 200
            assert "[DONE]" in r.read().decode()
        text = client.get("/metrics").text
    for family in (
        "bearpaw_requests_total",
        "bearpaw_request_latency_seconds",
        "bearpaw_tokens_total",
        "bearpaw_cost_usd_total",
        "bearpaw_cache_requests_total",
        "bearpaw_http_request_duration_seconds",
        "bearpaw_backend_healthy",
        "bearpaw_model_queue_depth",
        "bearpaw_async_queue_depth",
    ):
        assert f"# TYPE {family}" in text, family
    assert 'bearpaw_requests_total{cache="bypass",endpoint="chat.completions"' in text
    assert 'bearpaw_cache_requests_total{model="tiny",outcome="bypass"} 2.0' in text
    assert 'bearpaw_tokens_total{kind="completion",model="tiny"}' in text
    assert 'bearpaw_backend_healthy{model="tiny"' in text
    assert 'bearpaw_async_queue_depth{kind="job"}' in text


def test_request_id_is_returned_and_matches_the_log_line(gateway: GatewayProcess) -> None:
    r = httpx.post(
        gateway.root + "/v1/chat/completions",
        json=_chat(),
        headers={"authorization": f"Bearer {gateway.key}"},
        timeout=30,
    )
    assert r.status_code == 200
    request_id = r.headers["x-request-id"]
    assert request_id.startswith("req_")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [x for x in gateway.log_lines() if x.get("request_id") == request_id]
        if lines:
            break
        time.sleep(0.1)
    assert lines, "no log line carries the request id"
    line = lines[-1]
    assert line["path"] == "/v1/chat/completions"
    assert line["status"] == 200
    assert line["level"] == "info" and "duration_ms" in line
    # Error answers carry one too, and it is logged the same way.
    bad = httpx.post(gateway.root + "/v1/chat/completions", json=_chat(), timeout=30)
    assert bad.status_code == 401 and bad.headers["x-request-id"].startswith("req_")


def test_ready_is_503_when_no_replica_is_healthy(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens here
    gw = start_gateway(tmp_path, dead)
    try:
        assert httpx.get(gw.root + "/health", timeout=5).status_code == 200
        r = httpx.get(gw.root + "/ready", timeout=5)
        assert r.status_code == 503
        assert r.json()["status"] == "not_ready"
        metrics = httpx.get(gw.root + "/metrics", timeout=5).text
        assert 'bearpaw_backend_healthy{model="tiny"' in metrics
        assert "} 0.0" in metrics.split('bearpaw_backend_healthy{model="tiny"', 1)[1]
    finally:
        gw.stop()


def test_sigterm_drains_an_open_stream(tmp_path: Path) -> None:
    slow = FaultServer(models=("tiny",), chunk_delay=0.25).start()
    gw = start_gateway(tmp_path, slow.base_url, {"BEARPAW_DRAIN_SECONDS": "1.5"})
    try:
        _wait_ready(gw)
        received: list[str] = []
        first_chunk = threading.Event()
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                with httpx.stream(
                    "POST",
                    gw.root + "/v1/chat/completions",
                    json=_chat(stream=True),
                    headers={"authorization": f"Bearer {gw.key}"},
                    timeout=60,
                ) as r:
                    for line in r.iter_lines():
                        if line:
                            received.append(line)
                            first_chunk.set()
            except BaseException as exc:  # surfaced in the main thread
                errors.append(exc)
                first_chunk.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert first_chunk.wait(30)
        gw.popen.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Draining: still listening, but no longer ready.
        ready = httpx.get(gw.root + "/ready", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["draining"] is True
        reader.join(60)
        assert not errors, errors
        assert received[-1] == "data: [DONE]"
        contents = [
            json.loads(x[6:])["choices"][0]["delta"].get("content", "")
            for x in received[:-1]
            if json.loads(x[6:]).get("choices")
        ]
        assert "".join(contents).strip().endswith("hello.")
        gw.popen.wait(60)
        log = gw.log_path.read_text()
        assert "draining" in log
    finally:
        gw.stop()
        slow.stop()
