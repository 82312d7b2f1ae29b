"""ReplicaPool behaviour against failures on demand.

Failures come from httpx.MockTransport handlers (for exact control) and from
the fault server's real sockets (resets, hangs, cut streams); the answers of
healthy replicas here are minimal stand-ins. Real answers are checked against
real vLLM in test_backends_vllm.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from backends import (
    BackendSettings,
    ModelConfig,
    ModelNotFound,
    NoReplicaAvailable,
    ReplicaConfig,
    ReplicaPool,
    UpstreamError,
    UpstreamTimeout,
)
from backends.hosted import HostedProvider
from backends.upstream import SseReader
from tests.support.fault_server import FaultServer

Handler = Callable[[httpx.Request], httpx.Response]

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
# Real-socket failure paths run on both engines under the shared httpx client.
ENGINES = pytest.mark.parametrize("engine", ["aiohttp", "httpcore", "native"])


def completion(model: str, text: str = "ok") -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def metrics_page(running: float, waiting: float, kv: float = 0.0, model: str = "m") -> str:
    labels = f'{{engine="0",model_name="{model}"}}'
    return (
        f"vllm:num_requests_running{labels} {running}\n"
        f"vllm:num_requests_waiting{labels} {waiting}\n"
        f"vllm:kv_cache_usage_perc{labels} {kv}\n"
    )


class Upstreams:
    """Routes MockTransport requests by host to per-replica handlers; records them."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.calls: list[tuple[str, str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.url.host, request.url.path, body))
        handler = self.handlers.get(request.url.host)
        if handler is None:
            raise httpx.ConnectError("connection refused", request=request)
        return handler(request)

    def inference_calls(self, host: str | None = None) -> list[Any]:
        return [
            body
            for h, path, body in self.calls
            if path.endswith("completions") and (host is None or h == host)
        ]


def healthy(
    model: str = "m", metrics: str | None = None, status: int = 200, text: str = "ok"
) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == "/metrics":
            return httpx.Response(200, text=metrics or metrics_page(0, 0, model=model))
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": model}]})
        if status != 200:
            body = {"error": {"message": f"status {status}", "type": "X", "code": status}}
            return httpx.Response(status, json=body)
        return httpx.Response(200, json=completion(json.loads(request.content)["model"], text))

    return handle


def make_pool(
    upstreams: Upstreams,
    hosts: list[str],
    *,
    upstream_model: str | None = None,
    vllm: bool = True,
    **settings: Any,
) -> ReplicaPool:
    model = ModelConfig(
        name="m",
        aliases=["m-alias"],
        replicas=[
            ReplicaConfig(url=f"http://{h}/v1", upstream_model=upstream_model, vllm=vllm)
            for h in hosts
        ],
        **{k: settings.pop(k) for k in ("hold_seconds", "hosted", "overflow") if k in settings},
    )
    config = BackendSettings(models=[model], discover=[], **settings)
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstreams))
    return ReplicaPool(config, client=client)


# ------------------------------------------------------------------ names


async def test_model_names_and_resolve() -> None:
    pool = make_pool(Upstreams(), ["a"])
    assert pool.model_names() == ["m", "m-alias"]
    assert pool.resolve("m-alias") == "m" and pool.resolve("m") == "m"
    assert pool.resolve("nope") is None
    with pytest.raises(ModelNotFound) as caught:
        await pool.request("nope", "/chat/completions", CHAT)
    assert caught.value.status == 404


async def test_request_rewrites_model_and_adds_priority_for_vllm_only() -> None:
    upstreams = Upstreams()
    upstreams.handlers["a"] = healthy()
    pool = make_pool(upstreams, ["a"], upstream_model="org/real-name")
    body = dict(CHAT)
    response = await pool.request("m-alias", "/chat/completions", body, priority=5)
    assert response.status == 200 and response.replica == "http://a/v1"
    assert response.body["model"] == "org/real-name"
    sent = upstreams.inference_calls("a")[0]
    assert sent["model"] == "org/real-name" and sent["priority"] == 5
    assert body == CHAT  # the caller's body is not mutated

    plain = make_pool(upstreams, ["a"], vllm=False)
    await plain.request("m", "/chat/completions", CHAT, priority=5)
    assert "priority" not in upstreams.inference_calls("a")[-1]
    await pool.close()
    await plain.close()


# ------------------------------------------------------------------ retries


async def test_retry_on_another_replica_after_503() -> None:
    upstreams = Upstreams()
    upstreams.handlers["bad"] = healthy(status=503)
    upstreams.handlers["good"] = healthy()
    pool = make_pool(upstreams, ["bad", "good"])
    for _ in range(4):
        response = await pool.request("m", "/chat/completions", CHAT)
        assert response.replica == "http://good/v1"
    bad = next(r for r in pool.replicas("m") if r.url == "http://bad/v1")
    # Three 503s open its breaker; from then on it is not even tried.
    assert len(upstreams.inference_calls("bad")) <= 3
    assert bad.breaker.state == "open"
    assert len(upstreams.inference_calls("good")) == 4


async def test_retry_after_connection_refused() -> None:
    upstreams = Upstreams()  # host "gone" has no handler: ConnectError
    upstreams.handlers["good"] = healthy()
    pool = make_pool(upstreams, ["gone", "good"])
    for _ in range(3):
        response = await pool.request("m", "/chat/completions", CHAT)
        assert response.replica == "http://good/v1"
    gone = next(r for r in pool.replicas("m") if r.url == "http://gone/v1")
    # A refused connection marks the replica down at once: it is tried only once.
    assert not gone.healthy and gone.failures_total == 1


async def test_reset_after_the_request_was_read_is_not_retried() -> None:
    # The server read the whole request before resetting: it may be generating,
    # so another replica must not run it again (tests/test_retry_safety.py
    # covers both engines end to end).
    with FaultServer() as broken:
        broken.set_fault("reset")
        upstreams = Upstreams()
        upstreams.handlers["good"] = healthy()
        mock = httpx.MockTransport(upstreams)
        real = httpx.AsyncHTTPTransport()
        host = f"127.0.0.1:{broken.port}"
        # The broken replica is a real socket, the other goes through the mock.
        client = httpx.AsyncClient(mounts={f"http://{host}": real, "all://": mock})
        model = ModelConfig(
            name="m",
            replicas=[
                ReplicaConfig(url=broken.base_url, upstream_model="tiny"),
                ReplicaConfig(url="http://good/v1"),
            ],
        )
        pool = ReplicaPool(BackendSettings(models=[model], discover=[]), client=client)
        pool._rotation = -1  # first pick starts at the broken replica
        with pytest.raises(UpstreamError) as caught:
            await pool.request("m", "/chat/completions", CHAT)
        assert caught.value.status == 502
        assert broken.request_count("/v1/chat/completions") == 1
        assert upstreams.inference_calls("good") == []
        await client.aclose()


async def test_4xx_is_passed_through_without_retry() -> None:
    upstreams = Upstreams()
    upstreams.handlers["a"] = healthy(status=400)
    upstreams.handlers["b"] = healthy(status=400)
    pool = make_pool(upstreams, ["a", "b"])
    with pytest.raises(UpstreamError) as caught:
        await pool.request("m", "/chat/completions", CHAT)
    assert caught.value.status == 400
    assert caught.value.body["error"]["message"] == "status 400"
    assert caught.value.to_openai() == caught.value.body
    assert len(upstreams.inference_calls()) == 1
    assert all(r.breaker.consecutive_failures == 0 for r in pool.replicas("m"))


@pytest.mark.parametrize(("status", "expected"), [(500, 502), (502, 502), (503, 503)])
async def test_5xx_everywhere_exhausts_retries(status: int, expected: int) -> None:
    upstreams = Upstreams()
    for host in "abcd":
        upstreams.handlers[host] = healthy(status=status)
    pool = make_pool(upstreams, list("abcd"), max_retries=2)
    with pytest.raises(UpstreamError) as caught:
        await pool.request("m", "/chat/completions", CHAT)
    assert caught.value.status == expected
    calls = upstreams.inference_calls()
    assert len(calls) == 3 and len({h for h, p, _ in upstreams.calls if p != "/health"}) == 3


async def test_breaker_opens_then_half_open_probe_closes_it() -> None:
    upstreams = Upstreams()
    upstreams.handlers["a"] = healthy(status=500)
    pool = make_pool(upstreams, ["a"], max_retries=0, breaker_failures=2, breaker_reset_seconds=0.2)
    replica = pool.replicas("m")[0]
    for _ in range(2):
        with pytest.raises(UpstreamError):
            await pool.request("m", "/chat/completions", CHAT)
    assert replica.breaker.state == "open"
    with pytest.raises(NoReplicaAvailable) as caught:
        await pool.request("m", "/chat/completions", CHAT)
    assert caught.value.status == 503
    assert len(upstreams.inference_calls()) == 2  # open: not called
    await asyncio.sleep(0.25)
    assert replica.breaker.state == "half_open"
    upstreams.handlers["a"] = healthy()
    response = await pool.request("m", "/chat/completions", CHAT)
    assert response.status == 200 and replica.breaker.state == "closed"


# ------------------------------------------------------------------ streams


def sse_handler(events: list[bytes], fail_after: int | None = None) -> Handler:
    class Body(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[override]
            for index, event in enumerate(events):
                if fail_after is not None and index == fail_after:
                    raise httpx.ReadError("connection reset by peer")
                # Split events across chunks to exercise reassembly.
                yield event[:5]
                yield event[5:]

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path in ("/health", "/metrics"):
            return httpx.Response(200, text=metrics_page(0, 0))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Body())

    return handle


EVENTS = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]


async def test_stream_yields_whole_events_and_releases_replica() -> None:
    upstreams = Upstreams()
    upstreams.handlers["a"] = sse_handler(EVENTS)
    pool = make_pool(upstreams, ["a"])
    stream = await pool.stream("m", "/chat/completions", CHAT | {"stream": True})
    assert stream.replica == "http://a/v1"
    assert pool.replicas("m")[0].outstanding == 1
    assert [event async for event in stream] == EVENTS
    assert pool.replicas("m")[0].outstanding == 0


async def test_stream_broken_before_first_event_is_not_retried() -> None:
    # A 200 means the replica started generating: a break before the first
    # event is the client's 502, not a second generation elsewhere.
    upstreams = Upstreams()
    upstreams.handlers["a"] = sse_handler(EVENTS, fail_after=0)
    upstreams.handlers["b"] = sse_handler(EVENTS)
    pool = make_pool(upstreams, ["a", "b"])
    pool._rotation = -1
    with pytest.raises(UpstreamError) as caught:
        await pool.stream("m", "/chat/completions", CHAT)
    assert caught.value.status == 502
    assert len(upstreams.inference_calls("a")) == 1
    assert upstreams.inference_calls("b") == []
    a = pool.replicas("m")[0]
    assert a.outstanding == 0 and a.failures_total == 1


async def test_no_retry_after_first_stream_byte() -> None:
    upstreams = Upstreams()
    upstreams.handlers["a"] = sse_handler(EVENTS, fail_after=1)
    upstreams.handlers["b"] = sse_handler(EVENTS)
    pool = make_pool(upstreams, ["a", "b"])
    pool._rotation = -1
    stream = await pool.stream("m", "/chat/completions", CHAT)
    assert stream.replica == "http://a/v1"
    received = []
    with pytest.raises(UpstreamError) as caught:
        async for event in stream:
            received.append(event)
    assert received == EVENTS[:1] and caught.value.status == 502
    assert upstreams.inference_calls("b") == []
    a = pool.replicas("m")[0]
    assert a.outstanding == 0 and a.failures_total == 1


@ENGINES
async def test_stream_cut_by_real_socket_is_not_retried(engine: str) -> None:
    with FaultServer() as server:
        server.set_fault("drop_stream", after_chunks=1)
        model = ModelConfig(
            name="m",
            replicas=[
                ReplicaConfig(url=server.base_url, upstream_model="tiny"),
                ReplicaConfig(url="http://127.0.0.1:9/v1"),  # would refuse if retried
            ],
        )
        pool = ReplicaPool(BackendSettings(models=[model], discover=[], http_engine=engine))
        pool._rotation = -1
        stream = await pool.stream("m", "/chat/completions", CHAT | {"stream": True})
        events = []
        with pytest.raises(UpstreamError):
            async for event in stream:
                events.append(event)
        assert len(events) == 1 and events[0].startswith(b"data: {")
        assert pool.replicas("m")[1].requests_total == 0
        await pool.close()


async def test_sse_reader_handles_crlf_and_missing_final_blank_line() -> None:
    async def chunks():
        for piece in (b"data: a\r\n", b"\r\ndata: b\r\n\r\nda", b"ta: c"):
            yield piece

    reader = SseReader(chunks())
    assert await reader.next_event() == b"data: a\r\n\r\n"
    assert await reader.next_event() == b"data: b\r\n\r\n"
    assert await reader.next_event() == b"data: c\r\n\r\n"
    assert await reader.next_event() is None


# ------------------------------------------------------------------ timeouts, cancellation


@ENGINES
async def test_read_timeout_raises_upstream_timeout(engine: str) -> None:
    with FaultServer() as server:
        server.set_fault("hang")
        model = ModelConfig(name="m", replicas=[ReplicaConfig(url=server.base_url)])
        pool = ReplicaPool(
            BackendSettings(models=[model], discover=[], read_timeout=30, http_engine=engine)
        )
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as caught:
            await pool.request("m", "/chat/completions", CHAT, timeout=0.3)
        assert caught.value.status == 504
        assert time.monotonic() - started < 5
        with pytest.raises(UpstreamTimeout):
            await pool.stream("m", "/chat/completions", CHAT | {"stream": True}, timeout=0.3)
        # A timeout is not retried elsewhere: the generation may still be running.
        assert server.request_count("/v1/chat/completions") == 2
        await pool.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@ENGINES
async def test_cancellation_closes_upstream_request(engine: str) -> None:
    with FaultServer() as server:
        server.set_fault("hang")
        model = ModelConfig(name="m", replicas=[ReplicaConfig(url=server.base_url)])
        pool = ReplicaPool(BackendSettings(models=[model], discover=[], http_engine=engine))
        task = asyncio.create_task(pool.request("m", "/chat/completions", CHAT))
        await wait_for(lambda: server.in_flight == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: server.disconnects == 1)
        replica = pool.replicas("m")[0]
        assert replica.outstanding == 0 and replica.breaker.consecutive_failures == 0
        await pool.close()


@ENGINES
async def test_cancellation_while_streaming_closes_upstream(engine: str) -> None:
    with FaultServer(chunk_delay=0.2) as server:
        model = ModelConfig(name="m", replicas=[ReplicaConfig(url=server.base_url)])
        pool = ReplicaPool(BackendSettings(models=[model], discover=[], http_engine=engine))
        body = CHAT | {"stream": True, "max_tokens": 50}
        stream = await pool.stream("m", "/chat/completions", body)

        async def consume() -> None:
            async for _ in stream:
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: server.disconnects == 1)
        assert pool.replicas("m")[0].outstanding == 0
        await stream.aclose()  # idempotent
        await pool.close()


# ------------------------------------------------------------------ health, hold, discovery


async def test_hold_until_a_replica_becomes_healthy() -> None:
    upstreams = Upstreams()  # "a" refuses connections for now
    pool = make_pool(upstreams, ["a"], hold_seconds=5, hold_poll_interval=0.05)
    await pool.check_health()
    assert not pool.replicas("m")[0].healthy
    task = asyncio.create_task(pool.request("m", "/chat/completions", CHAT))
    await asyncio.sleep(0.3)
    assert not task.done()
    started = time.monotonic()
    upstreams.handlers["a"] = healthy()  # the scaled-to-zero replica came up
    response = await asyncio.wait_for(task, 3)
    assert response.status == 200
    assert time.monotonic() - started < 1.0
    await pool.close()


async def test_hold_expires_with_no_replica_available() -> None:
    upstreams = Upstreams()
    pool = make_pool(upstreams, ["a"], hold_seconds=0.3, hold_poll_interval=0.05)
    await pool.check_health()
    started = time.monotonic()
    with pytest.raises(NoReplicaAvailable) as caught:
        await pool.request("m", "/chat/completions", CHAT)
    assert caught.value.status == 503
    assert 0.25 <= time.monotonic() - started < 2
    await pool.close()


async def test_health_loop_drops_and_restores_replicas() -> None:
    upstreams = Upstreams()
    upstreams.handlers["a"] = healthy()
    upstreams.handlers["b"] = healthy()
    pool = make_pool(upstreams, ["a", "b"], health_interval=0.05, metrics_interval=0.05)
    await pool.start()
    handler_b = upstreams.handlers.pop("b")
    await wait_for(lambda: not pool.replicas("m")[1].healthy)
    for _ in range(4):
        assert (await pool.request("m", "/chat/completions", CHAT)).replica == "http://a/v1"
    upstreams.handlers["b"] = handler_b
    await wait_for(lambda: pool.replicas("m")[1].healthy)
    replicas = {(await pool.request("m", "/chat/completions", CHAT)).replica for _ in range(4)}
    assert replicas == {"http://a/v1", "http://b/v1"}
    await pool.close()


async def test_metrics_drive_routing_and_queue_depth() -> None:
    upstreams = Upstreams()
    upstreams.handlers["busy"] = healthy(metrics=metrics_page(10, 6, 0.9))
    upstreams.handlers["idle"] = healthy(metrics=metrics_page(1, 0, 0.1))
    pool = make_pool(upstreams, ["busy", "idle"])
    await pool.scrape_metrics()
    for _ in range(5):
        assert (await pool.request("m", "/chat/completions", CHAT)).replica == "http://idle/v1"
    assert pool.queue_depth("m") == 6 and pool.queue_depth() == 6
    rows = {row["url"]: row for row in pool.snapshot()}
    assert rows["http://busy/v1"]["running"] == 10 and rows["http://busy/v1"]["kv_usage"] == 0.9
    assert rows["http://idle/v1"]["healthy"] and rows["http://idle/v1"]["breaker"] == "closed"
    assert rows["http://busy/v1"]["metrics_age"] < 5
    # Stale metrics: routing falls back to outstanding counts, depth to outstanding.
    for replica in pool.replicas("m"):
        replica.metrics_at -= 60
    assert pool.queue_depth("m") == 0
    await pool.close()


async def test_discovery_adds_replicas_and_retries_failures() -> None:
    upstreams = Upstreams()
    upstreams.handlers["d1"] = healthy(model="found")

    def with_vllm_owner(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            data = [{"id": "m", "owned_by": "vllm"}, {"id": "other", "owned_by": "vllm"}]
            return httpx.Response(200, json={"object": "list", "data": data})
        return healthy()(request)

    upstreams.handlers["d2"] = with_vllm_owner
    settings = BackendSettings(
        models=[ModelConfig(name="m", aliases=["m-alias"])],
        discover=["http://d1/v1", "http://d2/v1", "http://later/v1"],
        health_interval=0.05,
    )
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstreams))
    pool = ReplicaPool(settings, client=client)
    assert pool.model_names() == []  # nothing configured or discovered yet
    await pool.start()
    assert set(pool.model_names()) == {"found", "m", "m-alias", "other"}
    found = pool.replicas("found")[0]
    assert found.url == "http://d1/v1" and not found.vllm and found.discovered
    assert pool.replicas("m")[0].vllm and pool.replicas("m")[0].upstream_model == "m"
    upstreams.handlers["later"] = healthy(model="late")  # came up after the gateway
    await wait_for(lambda: pool.resolve("late") == "late")
    response = await pool.request("late", "/chat/completions", CHAT)
    assert response.replica == "http://later/v1"
    await pool.close()


# ------------------------------------------------------------------ hosted


class FakeLitellm:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def completion(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        if kwargs.get("stream"):
            return self._chunks(kwargs["model"])
        return completion(kwargs["model"], "from hosted")

    async def _chunks(self, model: str):
        for text in ("a", "b"):
            yield {"object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": 0, "delta": {"content": text}}]}  # fmt: skip


async def test_hosted_overflow_when_replicas_down_or_saturated() -> None:
    upstreams = Upstreams()
    upstreams.handlers["a"] = healthy(metrics=metrics_page(4, 50))
    pool = make_pool(upstreams, ["a"], hosted="openai/gpt-4o-mini", overflow=True)
    fake = FakeLitellm()
    pool.hosted = HostedProvider(completion=fake.completion)

    # Saturated (50 waiting > 32): overflow.
    await pool.scrape_metrics()
    response = await pool.request("m", "/chat/completions", CHAT, priority=3)
    assert response.replica == "hosted:openai/gpt-4o-mini"
    assert response.body["choices"][0]["message"]["content"] == "from hosted"
    call = fake.calls[-1]
    assert call["model"] == "openai/gpt-4o-mini" and "priority" not in call
    assert upstreams.inference_calls() == []

    # Queue drained: back to the replica.
    upstreams.handlers["a"] = healthy(metrics=metrics_page(4, 2))
    await pool.scrape_metrics()
    assert (await pool.request("m", "/chat/completions", CHAT)).replica == "http://a/v1"

    # Replica down: overflow again, streaming too.
    del upstreams.handlers["a"]
    await pool.check_health()
    stream = await pool.stream("m", "/chat/completions", CHAT | {"stream": True})
    assert stream.replica == "hosted:openai/gpt-4o-mini"
    events = [event async for event in stream]
    assert events[-1] == b"data: [DONE]\n\n"
    assert [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]] == ["a", "b"]
    await pool.close()


async def test_hosted_fallback_after_retries_fail() -> None:
    upstreams = Upstreams()
    upstreams.handlers["a"] = healthy(status=502)
    pool = make_pool(upstreams, ["a"], hosted="openai/gpt-4o-mini")
    fake = FakeLitellm()
    pool.hosted = HostedProvider(completion=fake.completion)
    response = await pool.request("m", "/chat/completions", CHAT)
    assert response.replica == "hosted:openai/gpt-4o-mini"
    assert len(upstreams.inference_calls()) == 1 and len(fake.calls) == 1
    await pool.close()


async def test_hosted_errors_map_to_backend_errors() -> None:
    class RateLimited(Exception):
        status_code = 429

    async def failing(**kwargs: Any) -> Any:
        raise RateLimited("slow down")

    provider = HostedProvider(completion=failing)
    config = ModelConfig(name="m", hosted="openai/x")
    with pytest.raises(UpstreamError) as caught:
        await provider.request(config, "/chat/completions", CHAT)
    assert caught.value.status == 429 and caught.value.body["error"]["message"] == "slow down"
    with pytest.raises(UpstreamError) as caught:
        await provider.request(config, "/audio/speech", CHAT)
    assert caught.value.status == 400


async def test_unknown_model_triggers_discovery_of_a_late_backend() -> None:
    # The backend starts after the pool: a request for its model must find it
    # instead of being refused as an unknown model.
    from tests.support.vllm_server import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    pool = ReplicaPool(BackendSettings(discover=[url], health_interval=3600, connect_timeout=0.5))
    await pool.start()
    try:
        assert pool.resolve("tiny") is None
        assert await pool.resolve_or_discover("tiny") is None  # still down
        server = FaultServer(port=port, models=("tiny",)).start()
        try:
            await asyncio.sleep(0.6)  # discovery rounds are spaced 0.5 s apart
            assert await pool.resolve_or_discover("tiny") == "tiny"
            assert await pool.resolve_or_discover("other") is None
            response = await pool.request("tiny", "/chat/completions", {"messages": []})
            assert response.status == 200
        finally:
            server.stop()
    finally:
        await pool.close()
