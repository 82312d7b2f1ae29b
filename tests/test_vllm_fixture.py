"""The real-vLLM fixtures work: the official SDK talks to them, /metrics moves exactly by
the reported usage, and a killed replica really dies and comes back."""

from __future__ import annotations

import time

import httpx
import pytest
from openai import OpenAI

from tests.support.vllm_server import VllmServer

pytestmark = pytest.mark.vllm

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello"},
]


def client_for(server: VllmServer) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def metric_deltas(server: VllmServer, before: dict[str, float], expected: dict[str, float]):
    """Counter deltas since ``before``; waits briefly because vLLM records stats from the
    engine's output loop, which can trail the HTTP response by a moment."""
    deadline = time.monotonic() + 5
    while True:
        now = server.metrics()
        deltas = {name: now.get(name, 0.0) - before.get(name, 0.0) for name in expected}
        if deltas == expected or time.monotonic() > deadline:
            return deltas
        time.sleep(0.1)


def test_chat_through_sdk_moves_counters_by_reported_usage(vllm_server: VllmServer):
    client = client_for(vllm_server)
    before = vllm_server.metrics()

    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0
    )

    assert reply.object == "chat.completion"
    assert reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == 12  # a random model almost never emits EOS
    expected = {
        "vllm:prompt_tokens_total": float(reply.usage.prompt_tokens),
        "vllm:generation_tokens_total": float(reply.usage.completion_tokens),
        "vllm:request_success_total": 1.0,
    }
    assert metric_deltas(vllm_server, before, expected) == expected


def test_stream_with_usage_moves_counters_by_reported_usage(vllm_server: VllmServer):
    client = client_for(vllm_server)
    before = vllm_server.metrics()

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text.isascii()
    assert usage.completion_tokens == 8
    expected = {
        "vllm:prompt_tokens_total": float(usage.prompt_tokens),
        "vllm:generation_tokens_total": float(usage.completion_tokens),
    }
    assert metric_deltas(vllm_server, before, expected) == expected


def test_greedy_output_is_deterministic(vllm_server: VllmServer):
    client = client_for(vllm_server)
    answers = {
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(answers) == 1


def test_fixture_exposes_processes_and_gauges(vllm_server: VllmServer):
    names = set(vllm_server.processes().values())
    assert {"VLLM::Worker", "VLLM::EngineCor"} <= names
    assert vllm_server.pid in vllm_server.pids()
    metrics = vllm_server.metrics()
    assert metrics["vllm:num_requests_running"] == 0.0
    assert 0.0 <= metrics["vllm:kv_cache_usage_perc"] <= 1.0
    assert httpx.get(vllm_server.root_url + "/health").status_code == 200


def test_pair_serves_and_a_killed_replica_dies_and_comes_back(vllm_pair):
    first, second = vllm_pair
    assert first.port != second.port
    for server in vllm_pair:
        reply = client_for(server).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=4, temperature=0
        )
        assert reply.usage.completion_tokens == 4

    killed = first.kill()
    try:
        assert len(killed) >= 3  # API server, EngineCore, Worker (+ resource tracker)
        assert first.pids() == []
        with pytest.raises(httpx.ConnectError):
            httpx.get(first.root_url + "/health", timeout=2)
        # the other replica is unaffected
        reply = client_for(second).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=4, temperature=0
        )
        assert reply.usage.completion_tokens == 4
    finally:
        first.ensure_running(pin=True)
    assert httpx.get(first.root_url + "/health").status_code == 200
