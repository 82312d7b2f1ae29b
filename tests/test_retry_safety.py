"""Retries never run a generation twice.

A request is retried on another replica only when no byte of it can have been
processed (the connection was refused or could not be opened in time), when
the replica answered an error status, or when the server that read it is gone
(it refuses connections right after dropping ours, as a killed process does).
A replica that read the request and then reset or closed the connection while
still listening, timed out, or broke its stream may be generating already, so
the client gets the error and the other replica never sees the request. Every
case runs on real sockets (the fault server) with every engine.
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from backends import (
    BackendSettings,
    ModelConfig,
    ReplicaConfig,
    ReplicaPool,
    UpstreamError,
    UpstreamTimeout,
)
from tests.support.fault_server import FaultServer
from tests.support.gateway_process import GatewayProcess

ENGINES = pytest.mark.parametrize("engine", ["aiohttp", "httpcore", "native"])
CHAT_PATH = "/v1/chat/completions"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def two_servers():
    first, second = FaultServer().start(), FaultServer().start()
    yield first, second
    first.stop()
    second.stop()


def pool_for(urls: list[str], engine: str, **settings: object) -> ReplicaPool:
    model = ModelConfig(
        name="m", replicas=[ReplicaConfig(url=u, upstream_model="tiny") for u in urls]
    )
    pool = ReplicaPool(BackendSettings(models=[model], discover=[], http_engine=engine, **settings))
    pool._rotation = -1  # the first pick is the first replica
    return pool


def closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@ENGINES
@pytest.mark.parametrize("mode", ["reset", "close"])
@pytest.mark.parametrize("stream", [False, True])
async def test_request_that_reached_the_server_is_not_retried(
    two_servers, engine: str, mode: str, stream: bool
) -> None:
    broken, other = two_servers
    broken.set_fault(mode)  # reads the whole request, then RST (reset) or FIN (close)
    pool = pool_for([broken.base_url, other.base_url], engine)
    try:
        with pytest.raises(UpstreamError) as caught:
            if stream:
                await pool.stream("m", "/chat/completions", CHAT | {"stream": True})
            else:
                await pool.request("m", "/chat/completions", CHAT)
        assert caught.value.status == 502
        assert broken.request_count(CHAT_PATH) == 1
        assert other.request_count(CHAT_PATH) == 0
        first = pool.replicas("m")[0]
        assert first.failures_total == 1 and first.outstanding == 0
        # The replica is not marked down: it answered, it did not refuse.
        assert first.healthy
    finally:
        await pool.close()


@ENGINES
@pytest.mark.parametrize("stream", [False, True])
async def test_request_on_a_server_that_died_is_retried(two_servers, engine: str, stream: bool):
    # The process that read the request is gone (it stopped listening and its
    # connections were reset, like a killed vLLM): its generation died with
    # it, so another replica runs the request and nothing runs twice.
    dying, good = two_servers
    dying.set_fault("crash")
    pool = pool_for([dying.base_url, good.base_url], engine)
    try:
        if stream:
            answer = await pool.stream("m", "/chat/completions", CHAT | {"stream": True})
            assert [event async for event in answer][-1].startswith(b"data: [DONE]")
        else:
            answer = await pool.request("m", "/chat/completions", CHAT)
            assert answer.status == 200
        assert answer.replica == good.base_url
        assert dying.request_count(CHAT_PATH) == 1 and good.request_count(CHAT_PATH) == 1
        assert not pool.replicas("m")[0].healthy
    finally:
        await pool.close()


@ENGINES
@pytest.mark.parametrize("stream", [False, True])
async def test_timeout_of_a_sent_request_is_not_retried(two_servers, engine: str, stream: bool):
    slow, other = two_servers
    slow.set_fault("hang")
    pool = pool_for([slow.base_url, other.base_url], engine)
    try:
        with pytest.raises(UpstreamTimeout):
            if stream:
                await pool.stream("m", "/chat/completions", CHAT | {"stream": True}, timeout=0.3)
            else:
                await pool.request("m", "/chat/completions", CHAT, timeout=0.3)
        assert slow.request_count(CHAT_PATH) == 1
        assert other.request_count(CHAT_PATH) == 0
    finally:
        await pool.close()


@ENGINES
@pytest.mark.parametrize("stream", [False, True])
async def test_refused_connection_is_retried_elsewhere(two_servers, engine: str, stream: bool):
    _, good = two_servers
    gone = f"http://127.0.0.1:{closed_port()}/v1"
    pool = pool_for([gone, good.base_url], engine)
    try:
        if stream:
            answer = await pool.stream("m", "/chat/completions", CHAT | {"stream": True})
            events = [event async for event in answer]
            assert events[-1].startswith(b"data: [DONE]")
        else:
            answer = await pool.request("m", "/chat/completions", CHAT)
            assert answer.status == 200 and answer.body["choices"]
        assert answer.replica == good.base_url
        assert good.request_count(CHAT_PATH) == 1
        refused = pool.replicas("m")[0]
        # Refused means gone: it is marked down at once, not after more losses.
        assert refused.requests_total == 1 and not refused.healthy
    finally:
        await pool.close()


@ENGINES
async def test_error_status_is_still_retried(two_servers, engine: str) -> None:
    # An error status is the replica's own answer that it did not do the work.
    failing, good = two_servers
    failing.set_fault("status", status=503)
    pool = pool_for([failing.base_url, good.base_url], engine)
    try:
        answer = await pool.request("m", "/chat/completions", CHAT)
        assert answer.replica == good.base_url
        assert failing.request_count(CHAT_PATH) == 1 and good.request_count(CHAT_PATH) == 1
    finally:
        await pool.close()


@ENGINES
async def test_gateway_answers_502_and_never_asks_the_other_replica(
    two_servers, engine: str, tmp_path
) -> None:
    broken, other = two_servers
    gateway = GatewayProcess(
        tmp_path,
        backends=[broken.base_url, other.base_url],
        env={
            "BEARPAW_CACHE__ENABLED": "false",
            "BEARPAW_BACKENDS__HTTP_ENGINE": engine,
            "BEARPAW_BACKENDS__MAX_RETRIES": "2",
            "BEARPAW_BACKENDS__BREAKER_FAILURES": "1000",
        },
    ).start()
    try:
        key = gateway.create_key("acme")
        gateway.wait_models(key, {"tiny"})
        broken.reset()
        other.reset()
        broken.set_fault("reset")
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
            # Sequential requests alternate over the two idle replicas: some
            # land on the broken one.
            for i in range(6):
                response = await client.post(
                    "/chat/completions",
                    headers={"authorization": f"Bearer {key}"},
                    json={"model": "tiny", "messages": [{"role": "user", "content": f"q{i}"}]},
                )
                statuses.append(response.status_code)
                if response.status_code == 502:
                    error = response.json()["error"]
                    assert error["type"] == "server_error"
                    assert error["code"] == "upstream_error"
                    assert response.headers["x-request-id"].startswith("req_")
                else:
                    assert response.status_code == 200, response.text
                await asyncio.sleep(0)
        failed = statuses.count(502)
        assert failed >= 1
        # Each request the broken replica read is one 502; the other replica
        # served exactly the rest, none of them a second attempt.
        assert broken.request_count(CHAT_PATH) == failed
        assert other.request_count(CHAT_PATH) == statuses.count(200)
    finally:
        gateway.stop()
