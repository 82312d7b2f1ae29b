"""A gateway killed with SIGKILL under load loses no acknowledged request's usage.

Real gateway process, real PostgreSQL, the fault server as a fast upstream. Eight
clients send requests (plain and streamed) in a loop; once enough answers are in,
the gateway is SIGKILLed mid-load. Every answer a client received in full (for a
stream: up to [DONE]) must have its usage row in the database with its tokens.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
from sqlalchemy import create_engine, select

from gateway.db import UsageRecord
from tests.support.gateway_process import GatewayProcess


def _one(client: httpx.Client, key: str, stream: bool, i: int) -> dict | None:
    """Sends one request; returns what the client was told, or None if cut off."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"count to {i} please"}],
        "max_tokens": 8,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"authorization": f"Bearer {key}"}
    if not stream:
        r = client.post("/v1/chat/completions", json=body, headers=headers)
        if r.status_code != 200:
            return None
        return {"id": r.headers["x-request-id"], "usage": r.json()["usage"]}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        usage, done = None, False
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                usage = json.loads(line[6:]).get("usage") or usage
        if not done:
            return None
        return {"id": r.headers["x-request-id"], "usage": usage}


def test_sigkill_loses_no_acknowledged_usage(fault_server, tmp_path, pg_url) -> None:
    gw = GatewayProcess(
        tmp_path,
        backends=[fault_server.base_url],
        env={
            "BEARPAW_CACHE__ENABLED": "false",
            "BEARPAW_DATABASE_URL": pg_url,
        },
    ).start()
    try:
        key = gw.create_key("crashy")
        gw.wait_models(key, {"tiny"})
        acked: list[dict] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client_loop(n: int) -> None:
            with httpx.Client(base_url=gw.url, timeout=30) as client:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        got = _one(client, key, stream=(n + i) % 2 == 0, i=i)
                    except httpx.HTTPError:
                        return  # the gateway is gone
                    if got is not None:
                        with lock:
                            acked.append(got)

        threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        gw.kill(signal.SIGKILL)  # mid-load: requests are in flight right now
        with lock:
            answered = list(acked)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        gw.stop()

    assert len(answered) >= 60
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            rows = {
                r.request_id: r
                for r in conn.execute(
                    select(UsageRecord).where(
                        UsageRecord.request_id.in_([a["id"] for a in answered])
                    )
                )
            }
    finally:
        engine.dispose()
    missing = [a["id"] for a in answered if a["id"] not in rows]
    assert not missing, f"{len(missing)} acknowledged requests lost their usage"
    for a in answered:
        row = rows[a["id"]]
        assert row.status_code == 200
        assert row.prompt_tokens == a["usage"]["prompt_tokens"]
        assert row.completion_tokens == a["usage"]["completion_tokens"]
