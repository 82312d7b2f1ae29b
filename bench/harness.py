"""Shared pieces of the benchmarks: real processes, a tenant key, wrk runs.

Every benchmark starts real servers (``uvicorn gateway.main:app`` in its own
process, configured through a YAML file in a temporary data directory) and
drives them from another process, so what it measures is what a client sees.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    """Prefix `taskset -c cpus` when asked and available (Linux only)."""
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *cmd]
    return cmd


def wait_http(url: str, timeout: float = 60.0, ok: Sequence[int] = (200,)) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code in ok:
                return
            last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout}s (last: {last!r})")


@dataclass
class Proc:
    """A child process that is stopped (SIGTERM, then SIGKILL) on exit."""

    popen: subprocess.Popen[bytes]
    name: str

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_upstream(port: int, cpus: str | None = None) -> Proc:
    cmd = pinned([PYTHON, str(ROOT / "bench" / "upstream.py"), "--port", str(port)], cpus)
    proc = Proc(subprocess.Popen(cmd, stdout=subprocess.DEVNULL), "upstream")
    wait_http(f"http://127.0.0.1:{port}/v1/models")
    return proc


@dataclass
class Gateway:
    proc: Proc
    url: str  # base URL with /v1
    key: str
    data_dir: Path
    log_path: Path

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def stop(self) -> None:
        self.proc.stop(timeout=40)


def gateway_config(
    data_dir: Path,
    models: list[dict[str, Any]],
    cache: bool,
    log_level: str = "info",
    extra: dict[str, Any] | None = None,
) -> Path:
    config: dict[str, Any] = {
        "data_dir": str(data_dir),
        "log_level": log_level,
        "backends": {"discover": [], "models": models, "health_interval": 2.0},
        "cache": {"enabled": cache},
        "workers": {"embedded": False},
    }
    for key, value in (extra or {}).items():
        # Sections merge (extra={"backends": {"http_engine": ...}} keeps the models).
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = data_dir / "bearpaw.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def create_key(data_dir: Path, config: Path, tenant: str = "bench", **fields: Any) -> str:
    """Migrate the database and issue a key, in a child process so this one
    never imports the gateway's settings (they are cached per process)."""
    code = (
        "import sys, json\n"
        "from gateway.db import get_engine, migrate\n"
        "from gateway.settings import get_settings\n"
        "from gateway.tenants import create_tenant, create_key\n"
        "s = get_settings(); migrate(s.db_url); e = get_engine(s.db_url)\n"
        "fields = json.loads(sys.argv[2])\n"
        "create_tenant(e, sys.argv[1], **fields)\n"
        "print(create_key(e, sys.argv[1], name='bench').secret)\n"
    )
    import json

    out = subprocess.run(
        [PYTHON, "-c", code, tenant, json.dumps(fields)],
        env={**os.environ, "BEARPAW_CONFIG": str(config)},
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def start_gateway(
    models: list[dict[str, Any]],
    cache: bool = False,
    cpus: str | None = None,
    log_level: str = "info",
    tenant_fields: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    ready_timeout: float = 180.0,
    graceful_timeout: int = 30,
) -> Gateway:
    data_dir = Path(tempfile.mkdtemp(prefix="bearpaw-bench-"))
    config = gateway_config(data_dir, models, cache, log_level, extra)
    key = create_key(data_dir, config, **(tenant_fields or {}))
    port = free_port()
    cmd = [
        PYTHON,
        "-m",
        "uvicorn",
        "gateway.main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",  # the gateway writes its own JSON access log
        "--log-level",
        "warning",
        "--timeout-graceful-shutdown",
        str(graceful_timeout),
    ]
    log_path = data_dir / "gateway.log"
    log_file = log_path.open("wb")
    env = {**os.environ, "BEARPAW_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}
    popen = subprocess.Popen(
        pinned(cmd, cpus), cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
    )
    gateway = Gateway(
        Proc(popen, "gateway"), f"http://127.0.0.1:{port}/v1", key, data_dir, log_path
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", timeout=ready_timeout)
    except Exception:
        gateway.stop()
        raise RuntimeError(
            "gateway did not become ready:\n" + log_path.read_text()[-3000:]
        ) from None
    return gateway


# ------------------------------------------------------------------- LiteLLM

LITELLM_VENV = ROOT / ".venv-bench-litellm"
LITELLM_KEY = "sk-bench-litellm-master"


@dataclass
class Peer:
    """Another gateway started for comparison: its process, base URL and key."""

    proc: Proc
    url: str  # base URL with /v1
    key: str
    log_path: Path

    def stop(self) -> None:
        self.proc.stop(timeout=20)


def ensure_litellm(venv: Path = LITELLM_VENV) -> Path:
    """The `litellm` executable of the bench's own venv, created by
    bench/setup_litellm.sh when missing (never the product's environment)."""
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        subprocess.run(
            ["bash", str(ROOT / "bench" / "setup_litellm.sh")],
            env={**os.environ, "LITELLM_VENV": str(venv)},
            check=True,
        )
    return exe


def litellm_version(exe: Path) -> str:
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    python = exe.parent / "python"
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def start_litellm(
    upstream_base: str,
    model: str = "bench",
    cpus: str | None = None,
    venv: Path = LITELLM_VENV,
    ready_timeout: float = 180.0,
) -> Peer:
    """The LiteLLM proxy (one uvicorn worker, a master key, no database) in
    front of `upstream_base`, the same model name as the gateway serves."""
    exe = ensure_litellm(venv)
    work = Path(tempfile.mkdtemp(prefix="bearpaw-bench-litellm-"))
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": upstream_base,
                    "api_key": "sk-upstream-unused",
                },
            }
        ],
        # A master key: requests are authenticated, as the gateway's are.
        "general_settings": {"master_key": LITELLM_KEY},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [str(exe), "--config", "config.yaml", "--port", str(port), "--num_workers", "1"]
    log_path = work / "litellm.log"
    env = {
        **os.environ,
        # Offline and quiet: the bundled model price map, no per-request INFO lines.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
    }
    with log_path.open("wb") as log_file:
        popen = subprocess.Popen(
            pinned(cmd, cpus), cwd=work, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    peer = Peer(Proc(popen, "litellm"), f"http://127.0.0.1:{port}/v1", LITELLM_KEY, log_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=ready_timeout)
    except Exception:
        peer.stop()
        raise RuntimeError("LiteLLM did not start:\n" + log_path.read_text()[-3000:]) from None
    return peer


# ----------------------------------------------------------------------- wrk

WRK_LUA = """
wrk.method = "{method}"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{body}]]
{auth}
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


@dataclass
class LoadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(
    url: str,
    body: str,
    connections: int,
    seconds: float,
    key: str | None = None,
    cpus: str | None = None,
    method: str = "POST",
) -> LoadResult:
    """Closed-loop load: `connections` clients each sending the next request as
    soon as the last answer (the whole body, so a whole stream) arrived."""
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA.format(method=method, body=body, auth=auth))
        script = f.name
    cmd = pinned(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            script,
            url,
        ],
        cpus,
    )
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    os.unlink(script)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(g) for g in m.groups())
    return LoadResult(rps, p50, p99, total, errors)


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
