"""The `bearpaw` command line, run as a user would (subprocess, own data dir)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bearpaw(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BEARPAW_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tenants_and_keys(tmp_path):
    r = bearpaw(tmp_path, "tenants", "create", "acme", "--tier", "interactive", "--rpm", "60")
    assert r.returncode == 0, r.stderr
    again = bearpaw(tmp_path, "tenants", "create", "acme")
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = bearpaw(tmp_path, "tenants", "create", "x", "--tier", "platinum")
    assert bad.returncode == 1 and "tier must be one of" in bad.stderr
    created = bearpaw(tmp_path, "keys", "create", "acme", "--name", "ci")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("bp-")
    keys = json.loads(bearpaw(tmp_path, "keys", "list", "--json").stdout)
    assert len(keys) == 1 and keys[0]["revoked_at"] is None
    # The secret is shown once: listings carry only its prefix.
    assert secret not in json.dumps(keys) and secret.startswith(keys[0]["prefix"])
    assert bearpaw(tmp_path, "keys", "revoke", keys[0]["id"]).returncode == 0
    keys = json.loads(bearpaw(tmp_path, "keys", "list", "--json").stdout)
    assert keys[0]["revoked_at"] is not None
    missing = bearpaw(tmp_path, "keys", "revoke", "key_nope")
    assert missing.returncode == 1 and "no key" in missing.stderr


PAIRS = [
    ("How do I learn to play the guitar quickly?", "How can I learn guitar fast?", True),
    ("How do I learn Python?", "How do I learn Java?", False),
    ("What is the capital of France?", "What's the capital city of France?", True),
    ("What is 2 + 2?", "What is 2 + 3?", False),
    ("Why is the sky blue?", "What makes the sky look blue?", True),
    ("Is coffee bad for you?", "Is coffee good for you?", False),
    ("How tall is Mount Everest?", "What is the height of Mount Everest?", True),
    ("Who wrote Hamlet?", "Who wrote Macbeth?", False),
    ("How do I lose weight fast?", "What is the quickest way to lose weight?", True),
    ("Where do penguins live?", "What do penguins eat?", False),
]


def test_cache_eval_prints_operating_points(tmp_path):
    # Labeled pairs in the evaluator's format; the held-out split is every 5th
    # line, so repeat the set to give every split both labels.
    sample = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"a": a, "b": b, "same": same}) for a, b, same in PAIRS * 5]
    sample.write_text("\n".join(lines) + "\n")
    r = bearpaw(tmp_path, "cache", "eval", str(sample))
    assert r.returncode == 0, r.stderr
    for point in ("cosine>=0.90", "strict", "balanced", "aggressive"):
        assert point in r.stdout
    assert "held-out" in r.stdout and "recommend" in r.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "x"}\nnot json\n')
    r = bearpaw(tmp_path, "cache", "eval", str(bad))
    assert r.returncode != 0


def test_cache_purge_unknown_tenant_is_an_error(tmp_path):
    r = bearpaw(tmp_path, "cache", "purge", "nobody")
    assert r.returncode == 1 and "no tenant" in r.stderr


def test_serve_points_its_embedded_worker_at_itself(monkeypatch):
    """`bearpaw serve` gives its worker this gateway's URL for the SLO loop's
    stream latencies, unless one is configured."""
    from gateway.cli.main import worker_env
    from gateway.settings import Settings

    monkeypatch.delenv("BEARPAW_WORKERS__GATEWAY_URL", raising=False)
    env = worker_env(Settings(), "0.0.0.0", 8080)
    assert env["BEARPAW_WORKERS__GATEWAY_URL"] == "http://127.0.0.1:8080"
    assert worker_env(Settings(), "::1", 9)["BEARPAW_WORKERS__GATEWAY_URL"] == "http://[::1]:9"
    assert worker_env(Settings(), "10.0.0.5", 9)["BEARPAW_WORKERS__GATEWAY_URL"] == (
        "http://10.0.0.5:9"
    )
    configured = Settings(workers={"gateway_url": "http://gw.internal:8000"})
    assert "BEARPAW_WORKERS__GATEWAY_URL" not in worker_env(configured, "0.0.0.0", 8080)
