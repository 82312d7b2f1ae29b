"""A real gateway (uvicorn) and real Celery workers as child processes.

    env = bearpaw_env(tmp_path, backend_url, broker_url="redis://127.0.0.1:6379/5")
    with GatewayProcess(env) as gw, WorkerProcess(env) as worker:
        ...                       # gw.base_url ends with /v1
        worker.kill()             # SIGKILL to the worker and its pool processes
        worker.start()            # a fresh worker on the same broker and database

Both share configuration through BEARPAW_* environment variables only, like a
deployment does. Each child runs in its own process session so that a kill
reaches every process it forked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.vllm_server import REPO_ROOT, free_port


def bearpaw_env(
    data_dir: Path,
    backend_url: str,
    broker_url: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """Environment for a gateway/worker pair on one data dir and broker."""
    env = dict(os.environ)
    env.update(
        BEARPAW_DATA_DIR=str(data_dir),
        BEARPAW_BACKENDS__DISCOVER=f'["{backend_url}"]',
        BEARPAW_LOG_JSON="false",
        BEARPAW_LOG_LEVEL="warning",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    if broker_url:
        env["BEARPAW_BROKER_URL"] = broker_url
    env.update(extra)
    return env


class _Child:
    name = "child"

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole process session: no cleanup, no acks."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def __enter__(self):  # noqa: ANN204
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GatewayProcess(_Child):
    name = "gateway"

    def __init__(self, env: dict[str, str], port: int | None = None) -> None:
        self.port = port or free_port()
        data = Path(env["BEARPAW_DATA_DIR"])
        super().__init__(env, data / "gateway.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "gateway.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]

    def start(self, timeout: float = 120.0) -> None:
        super().start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"gateway exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"gateway did not answer /health in {timeout}s:\n{self.log_tail()}")


class WorkerProcess(_Child):
    name = "worker"

    def __init__(self, env: dict[str, str], concurrency: int = 1) -> None:
        self.concurrency = concurrency
        data = Path(env["BEARPAW_DATA_DIR"])
        super().__init__(env, data / "worker.log")

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "worker",
            "--loglevel",
            "INFO",
            "--concurrency",
            str(self.concurrency),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]

    def start(self, timeout: float = 120.0) -> None:
        before = len(self.log_tail(10**9))
        super().start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker exited:\n{self.log_tail()}")
            if "ready." in self.log_tail(10**9)[before:]:
                return
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"worker not ready in {timeout}s:\n{self.log_tail()}")


class BearpawStack:
    """A gateway and a worker on one data dir and broker, with two tenants' keys."""

    def __init__(self, data_dir: Path, backend_url: str, broker_url: str | None, **env: str):
        from gateway.db import get_engine, migrate
        from gateway.tenants import create_key, create_tenant

        data_dir.mkdir(parents=True, exist_ok=True)
        self.env = bearpaw_env(data_dir, backend_url, broker_url, **env)
        self.db_url = f"sqlite:///{(data_dir / 'bearpaw.db').resolve()}"
        migrate(self.db_url)
        self.engine = get_engine(self.db_url)
        create_tenant(self.engine, "acme")
        create_tenant(self.engine, "globex")
        self.api_key = create_key(self.engine, "acme").secret
        self.other_key = create_key(self.engine, "globex").secret
        self.gateway = GatewayProcess(self.env)
        self.worker = WorkerProcess(self.env)

    def start(self) -> BearpawStack:
        self.gateway.start()
        self.worker.start()
        return self

    def stop(self) -> None:
        self.worker.stop()
        self.gateway.stop()

    def ensure_worker(self) -> None:
        if not self.worker.alive():
            self.worker.start()
