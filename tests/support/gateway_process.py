"""A real Bearpaw gateway in its own process (uvicorn), for end-to-end tests.

Start one with ``GatewayProcess(tmp_path, backends=[vllm.base_url]).start()``, get a
key with ``create_key("acme")`` and point ``OpenAI(base_url=gw.base_url, ...)`` at it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.vllm_server import free_port

REPO = Path(__file__).resolve().parents[2]


class GatewayProcess:
    def __init__(
        self,
        data_dir: Path,
        backends: list[str] | None = None,
        env: dict[str, str] | None = None,
        config: dict[str, Any] | None = None,
        admin_key: str = "admin-test-key",
        port: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.admin_key = admin_key
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / f"gateway-{self.port}.log"
        self.env = {
            "BEARPAW_DATA_DIR": str(self.data_dir),
            "BEARPAW_ADMIN_KEY": admin_key,
            "BEARPAW_BACKENDS__DISCOVER": json.dumps(backends or []),
            "BEARPAW_BACKENDS__HEALTH_INTERVAL": "0.5",
            "BEARPAW_WORKERS__EMBEDDED": "false",
            "HF_HUB_OFFLINE": "1",
            **(env or {}),
        }
        if config is not None:
            path = self.data_dir / f"bearpaw-{self.port}.json"
            self.data_dir.mkdir(parents=True, exist_ok=True)
            # JSON is valid YAML, so the YAML settings source reads it.
            path.write_text(json.dumps(config))
            self.env["BEARPAW_CONFIG"] = str(path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def database_url(self) -> str:
        return self.env.get("BEARPAW_DATABASE_URL") or f"sqlite:///{self.data_dir / 'bearpaw.db'}"

    def start(self, timeout: float = 120.0) -> GatewayProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "gateway.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gateway not healthy after {timeout}s:\n{self.log_tail()}")

    def wait_models(self, key: str, models: set[str], timeout: float = 60.0) -> None:
        """Waits until discovery has found `models` behind the gateway."""
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline:
            r = httpx.get(
                self.base_url + "/models", headers={"authorization": f"Bearer {key}"}, timeout=5
            )
            seen = {m["id"] for m in r.json().get("data", [])} if r.status_code == 200 else set()
            if models <= seen:
                return
            time.sleep(0.3)
        raise RuntimeError(f"models {models} not served after {timeout}s (saw {seen})")

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.admin_key}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def create_key(self, tenant: str, **tenant_fields: Any) -> str:
        """Creates the tenant (if new) through the admin API and returns a new key."""
        r = self.admin("POST", "/admin/tenants", json={"name": tenant, **tenant_fields})
        if r.status_code not in (201, 400):
            raise RuntimeError(r.text)
        r = self.admin("POST", f"/admin/tenants/{tenant}/keys", json={"name": "test"})
        r.raise_for_status()
        return r.json()["key"]

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
