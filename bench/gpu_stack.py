"""The whole stack on the GPU machine: gateway, Celery worker and /v1/batches in
front of a real vLLM, the SLO loop deciding how many batch lines run.

Sub-commands (each prints tables; ``--out`` writes the rows as JSON):

    start     data dir, tenant key and a gateway process in its own session
              (it outlives the command, like the vLLM server), cache on the GPU
    overhead  64 concurrent streams straight to vLLM, then through the gateway:
              generated tokens/s and TTFT p50 of each; then 1 stream of each
    cache     the semantic cache with its embedder on the GPU, >= 100,000 entries:
              semantic hits/s under concurrent lookups (in-process)
    slo       interactive streamed traffic through the gateway (steady or diurnal
              trace) beside a /v1/batches job run by a Celery worker started per
              phase with that phase's settings:
                alone    no batch job
                naiveK   batch_concurrency K, no loop (what a fixed setting does)
                fixedK   the same; a sweep of these is the oracle
                sloR     the SLO loop (workers/slo_pacer.py) at ratio R to the
                         unloaded latency measured in this trace's alone phase,
                         reading the gateway's own stream latencies
                         (GET /admin/latency/streams) and vLLM's /metrics;
                         --no-feed: /metrics only
    report    merges slo JSON files: per trace and phase, and one line per SLO

    python bench/gpu_stack.py start --vllm-url http://127.0.0.1:8000/v1
    python bench/gpu_stack.py slo --traces steady --phases alone,naive64,slo1.1,slo1.5 \\
        --duration 45 --out bench/results/gpu/steady.json
    python bench/gpu_stack.py report bench/results/gpu/*.json

Interactive requests send ``cache-control: no-cache`` (the cache stores every
answer, embedding it on the GPU, but never answers: random-word prompts look
alike to an embedder and hits would leave the GPU idle). Batch lines sample at
temperature 1, which the cache bypasses for the same reason. The worker runs
with the cache off (its lines never use it) so that it starts in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from slo_backfill import (  # noqa: E402
    Bench,
    Phase,
    _f,
    arrivals,
    pct,
    summary,
    text,
    windows,
)

STATE = Path(os.environ.get("BEARPAW_GPU_STATE", "/tmp/bp/state.json"))
BENCH_ADMIN_KEY = "bench-admin"


# --------------------------------------------------------------------- start


def cmd_start(a: argparse.Namespace) -> None:
    from harness import create_key, gateway_config, wait_http

    data = Path(a.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    models = [{"name": a.model, "replicas": [{"url": a.vllm_url, "vllm": True}]}]
    extra = {
        "cache": {"enabled": True, "device": a.cache_device},
        "backends": {"http_engine": a.http_engine, "metrics_interval": 1.0},
        # The worker's SLO loop reads the gateway's streams through the admin API.
        "admin_key": BENCH_ADMIN_KEY,
    }
    config = gateway_config(data, models, cache=True, log_level="warning", extra=extra)
    key = create_key(data, config)
    log = (data / "gateway.log").open("wb")
    cmd = [sys.executable, "-m", "uvicorn", "gateway.main:app", "--host", "127.0.0.1"]
    cmd += ["--port", str(a.port), "--loop", "uvloop", "--http", "httptools"]
    cmd += ["--no-access-log", "--log-level", "warning"]
    env = {**os.environ, "BEARPAW_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}
    popen = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    (data.parent / "gateway.pid").write_text(str(popen.pid))
    t0 = time.monotonic()
    wait_http(f"http://127.0.0.1:{a.port}/ready", timeout=240)
    state = {
        "url": f"http://127.0.0.1:{a.port}/v1",
        "key": key,
        "config": str(config),
        "data_dir": str(data),
        "vllm_url": a.vllm_url,
        "model": a.model,
    }
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps(state))
    print(f"gateway ready in {time.monotonic() - t0:.1f} s at {state['url']}", flush=True)


def load_state() -> dict[str, Any]:
    return json.loads(STATE.read_text())


# ------------------------------------------------------------------ overhead


async def stream_once(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[float, float, int] | None:
    start = time.perf_counter()
    first = None
    chunks = 0
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices")
            if choices and choices[0].get("delta", {}).get("content"):
                first = first or time.perf_counter()
                chunks += 1
    if first is None:
        return None
    return first - start, time.perf_counter() - start, chunks


async def closed_loop(
    url: str,
    headers: dict[str, str],
    model: str,
    streams: int,
    seconds: float,
    tokens: int,
    metrics_url: str,
) -> dict[str, float]:
    rng = random.Random(11)
    ttfts: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        stop_at = time.perf_counter() + seconds

        async def one() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": text(rng, 150)}],
                    "max_tokens": tokens,
                    "ignore_eos": True,
                    "temperature": 0,
                    "stream": True,
                }
                try:
                    got = await stream_once(client, url, body, headers)
                except httpx.HTTPError:
                    got = None
                if got is None:
                    errors += 1
                else:
                    ttfts.append(got[0])

        before = await vllm_gen(client, metrics_url)
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(streams)))
        wall = time.perf_counter() - t0
        after = await vllm_gen(client, metrics_url)
    return {
        "streams": streams,
        "requests": len(ttfts),
        "errors": errors,
        "gen_tok_s": (after - before) / wall,
        "ttft_p50_ms": pct(ttfts, 0.5) * 1000,
        "ttft_p99_ms": pct(ttfts, 0.99) * 1000,
    }


async def vllm_gen(client: httpx.AsyncClient, url: str) -> float:
    from backends.vllm_metrics import parse_vllm_metrics

    r = await client.get(url, timeout=10)
    return parse_vllm_metrics(r.text).generation_tokens_total or 0.0


def cmd_overhead(a: argparse.Namespace) -> None:
    """Tokens/s at ``--streams`` concurrent streams, direct vs via the gateway;
    then time to first token at one stream (``--ttft-tokens`` long answers, so
    a short cell still has ~100 samples), direct, via the gateway as in the SLO
    phases (the cache stores every answer, embedding it on the GPU), and via
    the gateway with ``no-store`` (no embedding): what the cache's store costs
    the next request's first token."""
    s = load_state()
    metrics_url = s["vllm_url"].removesuffix("/v1") + "/metrics"
    direct = (s["vllm_url"] + "/chat/completions", {})
    auth = {"Authorization": f"Bearer {s['key']}", "cache-control": "no-cache"}
    via = (s["url"] + "/chat/completions", auth)
    via_nostore = (s["url"] + "/chat/completions", {**auth, "cache-control": "no-store"})
    cells = [
        ("direct", direct, a.streams, a.seconds, a.tokens),
        ("gateway", via, a.streams, a.seconds, a.tokens),
        ("direct", direct, 1, a.ttft_seconds, a.ttft_tokens),
        ("gateway", via, 1, a.ttft_seconds, a.ttft_tokens),
        ("gw-nostore", via_nostore, 1, a.ttft_seconds, a.ttft_tokens),
        ("direct", direct, 1, a.ttft_seconds, a.ttft_tokens),
    ]
    rows = []
    for name, (url, headers), streams, seconds, tokens in cells:
        loop = closed_loop(url, headers, s["model"], streams, seconds, tokens, metrics_url)
        r = asyncio.run(loop)
        r["path"], r["tokens"] = name, tokens
        rows.append(r)
        print(
            f"{name:10} streams {streams:3d} x {tokens:3d} tok: {r['requests']:5d} req, "
            f"{r['errors']} err, {r['gen_tok_s']:8.0f} gen tok/s, TTFT p50 "
            f"{r['ttft_p50_ms']:.2f} ms p99 {r['ttft_p99_ms']:.2f} ms",
            flush=True,
        )
    d64, g64, d1, g1, n1, d1b = rows
    direct_1 = (d1["ttft_p50_ms"] + d1b["ttft_p50_ms"]) / 2  # before and after the gateway cells
    out = {
        "rows": rows,
        "tok_ratio_64": g64["gen_tok_s"] / d64["gen_tok_s"],
        "added_ttft_p50_ms_64": g64["ttft_p50_ms"] - d64["ttft_p50_ms"],
        "added_ttft_p50_ms_1": g1["ttft_p50_ms"] - direct_1,
        "added_ttft_p50_ms_1_nostore": n1["ttft_p50_ms"] - direct_1,
    }
    print(
        f"\nOVERHEAD: tokens/s at {a.streams} streams via gateway / direct = "
        f"{out['tok_ratio_64']:.3f} (goal >= 0.98); added TTFT p50 "
        f"{out['added_ttft_p50_ms_1']:.2f} ms at 1 stream (goal <= 2 ms; "
        f"{out['added_ttft_p50_ms_1_nostore']:.2f} ms without the cache store), "
        f"{out['added_ttft_p50_ms_64']:.2f} ms at {a.streams} streams",
        flush=True,
    )
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


# --------------------------------------------------------------------- cache


def cmd_cache(a: argparse.Namespace) -> None:
    asyncio.run(cache_bench(a))


def synthetic_vectors(entries: int, picks: Any, dim: int) -> tuple[Any, Any]:
    """Unit vectors shaped like the real embeddings of ``cache_bench``'s
    questions, for runs where the model must not count (``--embeddings
    synthetic``): the 48 (aspect, topic) groups of questions are clusters
    (cosine about 0.85 within one, about 0 across), and a lookup's reworded
    question lies at cosine about 0.99 from its own entry, so every lookup
    gets ``search_k`` candidates for the verifier, as with the real model."""
    import numpy as np

    rng = np.random.default_rng(14)
    groups = rng.normal(size=(48, dim)).astype(np.float32)
    groups /= np.linalg.norm(groups, axis=1, keepdims=True)
    idx = np.arange(entries)
    noise = rng.normal(size=(entries, dim)).astype(np.float32) / np.sqrt(dim)
    fill = groups[(idx % 6) + 6 * ((idx // 6) % 8)] + 0.42 * noise
    fill /= np.linalg.norm(fill, axis=1, keepdims=True)
    jitter = rng.normal(size=(len(picks), dim)).astype(np.float32) / np.sqrt(dim)
    looks = fill[picks] + 0.1 * jitter
    looks /= np.linalg.norm(looks, axis=1, keepdims=True)
    return fill, looks


async def cache_bench(a: argparse.Namespace) -> None:
    """Bulk-fills the cache's table (embeddings computed on the GPU in large
    batches), lets SemanticCache load it as it does at start-up, then measures
    reworded lookups (embedding + vector search + verifier) at concurrency.

    Besides lookups/s it reports CPU time per lookup: of the event-loop thread
    (which excludes the embedder's model, run in its own thread) and of the
    whole process. With ``--embeddings synthetic`` the model is not run at all
    in the measured phase, so the process figure is the cache's own cost per
    lookup (search, verifier, bookkeeping): what decides the rate on a GPU.
    ``--profile FILE`` writes a cProfile of the event-loop thread."""
    import cProfile
    import pstats
    import tempfile

    import numpy as np
    from sqlalchemy import create_engine
    from sqlmodel import Session

    from cache import store as db
    from cache.config import CacheSettings
    from cache.embedder import Embedder
    from cache.keys import canonical_hash, namespace_for
    from cache.semantic_cache import SemanticCache

    table: dict[str, Any] = {}

    class Precomputed(Embedder):
        """The cache's embedder, answering known texts from ``table``."""

        def encode(self, texts: list[str], batch_size: int = 64) -> Any:
            if texts and all(t in table for t in texts):
                return np.vstack([table[t] for t in texts])
            return super().encode(texts, batch_size)

    if a.embeddings == "synthetic":
        import cache.semantic_cache as semantic_module

        semantic_module.Embedder = Precomputed  # type: ignore[misc]

    def question(i: int) -> str:
        topics = ["Rome", "jazz", "volcanoes", "chess", "Python", "bees", "tax law", "bread"]
        aspects = ["history", "basics", "best books", "common mistakes", "cost", "origin"]
        return (
            f"What should I know about the {aspects[i % 6]} of {topics[(i // 6) % 8]}, "
            f"case number {i}?"
        )

    def chat(q: str) -> dict[str, Any]:
        return {"model": "llama", "messages": [{"role": "user", "content": q}], "temperature": 0}

    rows = []
    for spaces in [int(x) for x in a.namespaces.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            engine = create_engine(f"sqlite:///{tmp}/c.db")
            settings = CacheSettings(
                device=a.device, max_entries=a.entries + 10, sweep_interval_s=3600
            )
            db.create_table(engine)
            embedder = Embedder(settings.embedder, settings.device, settings.embedder_runtime)
            qs = [question(i) for i in range(a.entries)]
            rng = np.random.default_rng(0)
            picks = rng.integers(0, a.entries, size=a.lookups)
            t0 = time.perf_counter()
            if a.embeddings == "synthetic":
                vectors, looks = synthetic_vectors(a.entries, picks, embedder.dim)
                table.clear()
                table.update(
                    (question(int(i)).lower(), v) for i, v in zip(picks, looks, strict=True)
                )
            else:
                vectors = embedder.encode(qs, batch_size=1024)
            embed_s = time.perf_counter() - t0
            now = time.time()
            tenants = [f"t{i % spaces}" for i in range(a.entries)]
            with Session(engine) as session:
                for i, q in enumerate(qs):
                    req = chat(q)
                    ns = namespace_for(tenants[i], "llama", req)
                    session.add(
                        db.CacheEntry(
                            id=f"{i:032x}",
                            tenant=tenants[i],
                            namespace=ns,
                            exact_key=canonical_hash(ns, req),
                            query=q,
                            response='{"choices":[{"message":{"content":"ok"}}]}',
                            embedding=db.vector_to_bytes(vectors[i]),
                            model=settings.embedder,
                            created_at=now,
                            expires_at=now + 3600,
                            last_hit_at=now,
                        )
                    )
                session.commit()
            fill_s = time.perf_counter() - t0
            cache = SemanticCache(settings, engine)
            t1 = time.perf_counter()
            await cache.start()
            load_s = time.perf_counter() - t1
            # Reworded: another exact key and another embedding, the same question.
            reqs = [
                (namespace_for(tenants[i], "llama", chat(question(int(i)).lower())), i)
                for i in picks
            ]
            for ns, i in reqs[:64]:  # warm-up
                await cache.lookup(ns, chat(question(int(i)).lower() + " "))
            queue = list(reqs)

            async def worker(cache: SemanticCache, queue: list[tuple[str, int]]) -> int:
                got = 0
                while queue:
                    ns, i = queue.pop()
                    found = await cache.lookup(ns, chat(question(int(i)).lower()))
                    got += found is not None
                return got

            profile = cProfile.Profile() if a.profile else None
            t2, loop_cpu, proc_cpu = time.perf_counter(), time.thread_time(), time.process_time()
            if profile is not None:
                profile.enable()
            hits = sum(await asyncio.gather(*(worker(cache, queue) for _ in range(a.concurrency))))
            if profile is not None:
                profile.disable()
            wall = time.perf_counter() - t2
            loop_cpu = time.thread_time() - loop_cpu
            proc_cpu = time.process_time() - proc_cpu
            if profile is not None:
                with open(f"{a.profile}.{spaces}ns.txt", "w") as fh:
                    pstats.Stats(profile, stream=fh).sort_stats("tottime").print_stats(30)
            stats = cache.stats()
            await cache.close()
        row = {
            "entries": a.entries,
            "namespaces": spaces,
            "device": a.device,
            "runtime": embedder.runtime,
            "embed_fill_s": embed_s,
            "fill_s": fill_s,
            "load_s": load_s,
            "lookups": len(reqs),
            "concurrency": a.concurrency,
            "lookups_s": len(reqs) / wall,
            "hit_rate": hits / len(reqs),
            "hits_s": hits / wall,
            "embed_batches": stats.get("embed_batches"),
            "embeddings": a.embeddings,
            "loop_cpu_us_per_lookup": 1e6 * loop_cpu / len(reqs),
            "process_cpu_us_per_lookup": 1e6 * proc_cpu / len(reqs),
        }
        rows.append(row)
        print(
            f"CACHE: {a.entries:,} entries in {spaces} namespace(s), embedder on {a.device} "
            f"({embedder.runtime}): {row['lookups_s']:,.0f} lookups/s at {a.concurrency} "
            f"concurrent, hit rate {row['hit_rate']:.2f} -> {row['hits_s']:,.0f} semantic "
            f"hits/s (goal >= 5,000/s); fill {fill_s:.1f} s (embedding {embed_s:.1f} s), "
            f"load {load_s:.1f} s; CPU per lookup: event loop "
            f"{row['loop_cpu_us_per_lookup']:,.0f} us, process "
            f"{row['process_cpu_us_per_lookup']:,.0f} us ({a.embeddings} embeddings, "
            f"{row['embed_batches']} batches)",
            flush=True,
        )
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


# ----------------------------------------------------------------------- slo


class StackBench(Bench):
    """slo_backfill's interactive client, pointed at the gateway, with the
    batch load coming from /v1/batches run by a worker process."""

    def __init__(self, a: argparse.Namespace, state: dict[str, Any]) -> None:
        a.base_url = state["url"]
        a.model = state["model"]
        super().__init__(a)
        self.state = state
        self.root = state["vllm_url"].removesuffix("/v1")  # /metrics is vLLM's
        self.server.root = self.root
        self.client.headers.update(
            {"Authorization": f"Bearer {state['key']}", "cache-control": "no-cache"}
        )
        self.inflight = 0
        self.input_file: str | None = None

    async def interactive(self, phase: Phase, t0: float, send_at: float) -> None:
        await asyncio.sleep(max(0.0, t0 + send_at - time.monotonic()))
        self.inflight += 1
        try:
            await super().interactive(phase, t0, 0.0)
        finally:
            self.inflight -= 1

    async def upload(self) -> str:
        if self.input_file is None:
            rng = random.Random(3)
            lines = []
            for i in range(self.a.batch_lines):
                body = {
                    "model": self.model,
                    "messages": [{"role": "user", "content": text(rng, self.a.batch_prompt_words)}],
                    "max_tokens": self.a.batch_max_tokens,
                    "ignore_eos": True,
                    "temperature": 1.0,
                }
                lines.append(
                    json.dumps(
                        {
                            "custom_id": f"l{i}",
                            "method": "POST",
                            "url": "/v1/chat/completions",
                            "body": body,
                        }
                    )
                )
            files = {"file": ("batch.jsonl", "\n".join(lines).encode(), "application/jsonl")}
            r = await self.client.post(
                self.base + "/files", files=files, data={"purpose": "batch"}, timeout=120
            )
            r.raise_for_status()
            self.input_file = r.json()["id"]
        return self.input_file

    def worker_config(self, name: str, base: dict[str, float]) -> Path:
        config = yaml.safe_load(Path(self.state["config"]).read_text())
        config["cache"] = {"enabled": False}
        config["log_level"] = "info"  # the SLO loop logs each limit change
        workers: dict[str, Any] = {
            "embedded": False,
            "concurrency": 1,
            # One task works the whole job: no drain to zero at chunk ends.
            "batch_chunk_lines": 100_000,
        }
        if self.a.feed:
            # As `bearpaw serve` sets it for an embedded worker.
            workers["gateway_url"] = self.state["url"].removesuffix("/v1")
        if name.startswith(("naive", "fixed")):
            k = int(name.removeprefix("naive").removeprefix("fixed"))
            workers.update(
                batch_concurrency=k, backfill_busy_concurrency=k, backfill_max_waiting=1e9
            )
        else:
            workers["slo"] = {
                "*": {
                    "ratio": float(name[3:]),
                    "baseline_ttft_ms": base.get("ttft_ms"),
                    "baseline_tpot_ms": base.get("tpot_ms"),
                    # The alone phase's p99 request, what the gateway's reading is set against.
                    "baseline_latency_ms": base.get("latency_ms") if self.a.feed else None,
                    "ratio_tokens": self.a.max_tokens,
                    "max_concurrency": self.a.slo_max,
                    "window_s": self.a.slo_window,
                    "admit_burst": self.a.admit_burst,
                }
            }
        config["workers"] = workers
        path = Path(self.state["data_dir"]) / f"worker-{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start_worker(self, config: Path, name: str) -> subprocess.Popen[bytes]:
        log = (Path(self.state["data_dir"]) / f"worker-{name}.log").open("wb")
        cmd = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker"]
        cmd += ["--loglevel", "INFO", "--concurrency", "1"]
        env = {**os.environ, "BEARPAW_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        Path("/tmp/bp").mkdir(exist_ok=True)
        Path("/tmp/bp/worker.pid").write_text(str(popen.pid))
        return popen

    async def vllm_running(self) -> float:
        m = await self.scrape()
        return (m.running + m.waiting) if m is not None else 0.0

    async def run_stack_phase(self, trace: str, name: str, base: dict[str, float]) -> Phase:
        a = self.a
        phase = Phase(trace, name)
        schedule = arrivals(trace, a.duration, a.rate, a.low, a.high)
        worker = None
        batch_id = None
        t_setup = time.monotonic()
        if name != "alone":
            file_id = await self.upload()
            worker = self.start_worker(self.worker_config(name, base), name)
            r = await self.client.post(
                self.base + "/batches",
                json={
                    "input_file_id": file_id,
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                },
            )
            r.raise_for_status()
            batch_id = r.json()["id"]
            deadline = time.monotonic() + 90
            while await self.vllm_running() < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            if name.startswith(("naive", "fixed")):
                await asyncio.sleep(a.warmup)  # a fixed load in its steady state
        phase_setup_s = time.monotonic() - t_setup
        t0 = time.monotonic()
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                m = await self.scrape()
                if m is not None:
                    phase.samples.append(
                        {
                            "at": time.monotonic() - t0,
                            "running": m.running,
                            "waiting": m.waiting,
                            "kv": m.kv_usage,
                            "gen": m.generation_tokens_total,
                            # batch lines at the server: all of vLLM's less ours
                            "limit": max(0.0, m.running + m.waiting - self.inflight),
                        }
                    )
                await asyncio.sleep(a.scrape_s)

        async def poll_batch() -> None:
            done = None
            while not stop.is_set():
                try:
                    r = await self.client.get(f"{self.base}/batches/{batch_id}", timeout=10)
                    counts = r.json().get("request_counts") or {}
                    now_done = int(counts.get("completed", 0)) + int(counts.get("failed", 0))
                except (httpx.HTTPError, ValueError):
                    now_done = done
                if done is not None and now_done is not None and now_done > done:
                    at = time.monotonic() - t0
                    for _ in range(now_done - done):
                        phase.batch.append({"at": at, "tokens": a.batch_max_tokens})
                if now_done is not None:
                    done = now_done
                await asyncio.sleep(1.0)

        bg = [asyncio.create_task(sample())]
        if batch_id is not None:
            bg.append(asyncio.create_task(poll_batch()))
        await asyncio.gather(*(self.interactive(phase, t0, s) for s in schedule))
        stop.set()
        await asyncio.gather(*bg)
        if batch_id is not None:
            try:
                await self.client.post(f"{self.base}/batches/{batch_id}/cancel", timeout=10)
            except httpx.HTTPError:
                pass
        if worker is not None:
            # Its lines' connections close with it; vLLM aborts them.
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            worker.wait()
        deadline = time.monotonic() + 30
        while await self.vllm_running() >= 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        phase.setup_s = phase_setup_s  # type: ignore[attr-defined]
        return phase


async def slo_main(a: argparse.Namespace) -> None:
    state = load_state()
    bench = StackBench(a, state)
    print(f"gateway {bench.base}, vLLM {bench.root}; {a.duration:.0f} s per phase", flush=True)
    out: dict[str, Any] = {"args": vars(a), "summary": [], "windows": [], "baseline": {}}
    prior = json.loads(Path(a.baseline_from).read_text()) if a.baseline_from else {}
    for trace in a.traces.split(","):
        base: dict[str, float] = dict(prior.get("baseline", {}).get(trace, {}))
        for name in a.phases.split(","):
            before = await bench.scrape()
            t_phase = time.monotonic()
            phase = await bench.run_stack_phase(trace, name, base)
            after = await bench.scrape()
            if name == "alone":
                base = await bench.baseline(before, after)
                # The p99 request "x alone" is measured against (its client-side latency).
                base["latency_ms"] = summary(phase, a.duration)["lat_p99"]
                out["baseline"][trace] = base
            rows = windows(phase, a.window, a.duration)
            out["windows"].extend(rows)
            print_windows(trace, name, base, rows)
            s = summary(phase, a.duration)
            s["setup_s"] = getattr(phase, "setup_s", 0.0)
            s["phase_wall_s"] = time.monotonic() - t_phase
            s["window_lat_p99_max"] = max(
                (r["lat_p99"] for r in rows if not math.isnan(r["lat_p99"])), default=None
            )
            out["summary"].append(s)
            print(
                f"  -> p99 {s['lat_p99']:.0f} ms (worst window {_f(s['window_lat_p99_max'])}), "
                f"{s['batch_lines_s']:.2f} lines/s, gen {_f(s['gen_tok_s'])} tok/s, errors "
                f"{s['errors']}, setup {s['setup_s']:.1f} s, phase {s['phase_wall_s']:.0f} s",
                flush=True,
            )
            if a.out:
                Path(a.out).write_text(json.dumps(out, indent=1))
    await bench.client.aclose()


def print_windows(trace: str, name: str, base: dict[str, float], rows: list[dict]) -> None:
    print(f"\n[{trace} / {name}]  baseline {base}", flush=True)
    print(
        f"{'t':>5} {'req':>4} {'ttft50':>7} {'ttft99':>7} {'lat50':>7} {'lat99':>7} "
        f"{'lines/s':>8} {'btok/s':>8} {'gen/s':>8} {'run':>6} {'wait':>5} {'kv':>6} "
        f"{'batch':>6}"
    )
    for r in rows:
        print(
            f"{r['t']:5.0f} {r['requests']:4d} {_f(r['ttft_p50']):>7} "
            f"{_f(r['ttft_p99']):>7} {_f(r['lat_p50']):>7} {_f(r['lat_p99']):>7} "
            f"{_f(r['batch_lines_s'], 2):>8} {_f(r['batch_tok_s']):>8} "
            f"{_f(r['gen_tok_s']):>8} {_f(r['running'], 1):>6} {_f(r['waiting_max']):>5} "
            f"{_f(r['kv_max'], 3):>6} {_f(r['limit'], 1):>6}",
            flush=True,
        )


# -------------------------------------------------------------------- report


def cmd_report(a: argparse.Namespace) -> None:
    summaries: dict[tuple[str, str], dict[str, Any]] = {}
    windows_by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in a.files:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "summary" not in data:
            continue
        for s in data["summary"]:
            summaries[(s["trace"], s["phase"])] = s
        for w in data["windows"]:
            windows_by.setdefault((w["trace"], w["phase"]), []).append(w)
    traces = sorted({t for t, _ in summaries}, key=lambda t: (t != "steady", t))
    print("\nsummary (ms; x alone = p99 latency over the same trace's alone phase)")
    print(
        f"{'trace':8} {'phase':8} {'req':>5} {'err':>3} {'ttft50':>7} {'ttft99':>7} "
        f"{'lat50':>6} {'lat99':>6} {'x alone':>7} {'worst w':>7} {'lines/s':>8} "
        f"{'gen/s':>7} {'x inter':>7}"
    )
    alone: dict[str, dict[str, Any]] = {t: summaries.get((t, "alone"), {}) for t in traces}
    for (t, p), s in sorted(summaries.items(), key=lambda kv: (traces.index(kv[0][0]), kv[0][1])):
        ap99 = alone[t].get("lat_p99")
        agen = alone[t].get("gen_tok_s")
        s["x_alone"] = s["lat_p99"] / ap99 if ap99 else None
        worst = s.get("window_lat_p99_max")
        s["worst_x"] = worst / ap99 if ap99 and worst else None
        s["x_inter"] = s["gen_tok_s"] / agen if agen and s.get("gen_tok_s") else None
        print(
            f"{t:8} {p:8} {s['requests']:5d} {s['errors']:3d} {_f(s['ttft_p50']):>7} "
            f"{_f(s['ttft_p99']):>7} {_f(s['lat_p50']):>6} {_f(s['lat_p99']):>6} "
            f"{_f(s['x_alone'], 2):>7} {_f(s['worst_x'], 2):>7} "
            f"{_f(s['batch_lines_s'], 2):>8} {_f(s['gen_tok_s']):>7} {_f(s['x_inter'], 2):>7}"
        )
    print(
        "\nheld = whole-phase p99 latency <= ratio x alone's; 'every window' also asks it of "
        f"each {a.window_note} window's p99 (about 2 of each window's requests set it)."
    )
    for ratio in sorted({p[3:] for _, p in summaries if p.startswith("slo")}, key=float):
        r = float(ratio)
        parts = []
        held_all = True
        every_window = True
        for t in traces:
            s = summaries.get((t, f"slo{ratio}"))
            if s is None:
                parts.append((t, None, None))
                continue
            held_all = held_all and s["x_alone"] is not None and s["x_alone"] <= r
            every_window = every_window and s["worst_x"] is not None and s["worst_x"] <= r
            fixed = [
                v
                for (tt, p), v in summaries.items()
                if tt == t and p.startswith(("fixed", "naive")) and v.get("x_alone") is not None
            ]
            ok = [v for v in fixed if v["x_alone"] <= r]
            oracle = max(ok, key=lambda v: v["batch_lines_s"], default=None)
            ratio_oracle = (
                s["batch_lines_s"] / oracle["batch_lines_s"]
                if oracle and oracle["batch_lines_s"]
                else None
            )
            parts.append((t, ratio_oracle, oracle["phase"] if oracle else None))
            print(
                f"  {t} slo{ratio}: x alone {_f(s['x_alone'], 2)}, worst window "
                f"{_f(s['worst_x'], 2)}, {s['batch_lines_s']:.2f} lines/s; oracle "
                f"{oracle['phase'] if oracle else '-'} "
                f"({_f(oracle['batch_lines_s'], 2) if oracle else '-'} lines/s, x alone "
                f"{_f(oracle['x_alone'], 2) if oracle else '-'}) of "
                f"{', '.join(v['phase'] for v in fixed) or 'no fixed phase'}"
            )
        steady = next((x for t, x, _ in parts if t == "steady"), None)
        diurnal = next((x for t, x, _ in parts if t == "diurnal"), None)
        ds = summaries.get(("diurnal", f"slo{ratio}"))
        tokens = ds.get("x_inter") if ds else None
        print(
            f"SLO {ratio}x: held {'yes' if held_all else 'no'} "
            f"(every window: {'yes' if every_window else 'no'}), steady batch/oracle "
            f"{_f(steady, 2)}, diurnal batch/oracle {_f(diurnal, 2)}, diurnal tokens "
            f"{_f(tokens, 2)}x interactive-only"
        )


# ---------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("--vllm-url", default="http://127.0.0.1:8000/v1")
    s.add_argument("--model", default="llama")
    s.add_argument("--port", type=int, default=9000)
    s.add_argument("--data-dir", default="/tmp/bp/data")
    s.add_argument("--cache-device", default="cuda")
    # The product's default engine; the first H200 run (2026-12-01) used httpcore.
    s.add_argument("--http-engine", default="aiohttp", choices=["aiohttp", "httpcore", "native"])
    o = sub.add_parser("overhead")
    o.add_argument("--streams", type=int, default=64)
    o.add_argument("--seconds", type=float, default=20.0)
    o.add_argument("--tokens", type=int, default=128)
    o.add_argument("--ttft-seconds", type=float, default=8.0)
    o.add_argument("--ttft-tokens", type=int, default=8)
    o.add_argument("--out", default=None)
    c = sub.add_parser("cache")
    c.add_argument("--entries", type=int, default=100_000)
    c.add_argument("--namespaces", default="1,100")
    c.add_argument("--lookups", type=int, default=20_000)
    c.add_argument("--concurrency", type=int, default=256)
    c.add_argument("--device", default="cuda")
    c.add_argument(
        "--embeddings",
        default="model",
        choices=["model", "synthetic"],
        help="synthetic: clustered unit vectors instead of the model (fill and lookups), "
        "so the figures are the cache's own cost without the model",
    )
    c.add_argument("--profile", default=None, help="cProfile the event loop to FILE.<n>ns.txt")
    c.add_argument("--out", default=None)
    r = sub.add_parser("slo")
    r.add_argument("--traces", default="steady")
    r.add_argument("--phases", default="alone,naive64,slo1.1,slo1.5")
    r.add_argument("--duration", type=float, default=45.0)
    r.add_argument("--warmup", type=float, default=5.0)
    r.add_argument("--rate", type=float, default=10.0)
    r.add_argument("--low", type=float, default=2.0)
    r.add_argument("--high", type=float, default=15.0)
    r.add_argument("--max-tokens", type=int, default=128)
    r.add_argument("--prompt-words", type=int, default=150)
    r.add_argument("--batch-max-tokens", type=int, default=512)
    r.add_argument("--batch-prompt-words", type=int, default=700)
    r.add_argument("--batch-lines", type=int, default=1500)
    r.add_argument("--window", type=float, default=15.0)
    r.add_argument("--scrape-s", type=float, default=1.0)
    r.add_argument("--slo-window", type=float, default=3.0)
    r.add_argument("--slo-max", type=int, default=64)
    r.add_argument(
        "--admit-burst",
        type=int,
        default=1,
        help="SLO phases: lines started per runner wake-up (1 staggers batch prefills)",
    )
    r.add_argument("--baseline-from", default=None, help="a JSON of an earlier slo run")
    r.add_argument(
        "--no-feed",
        dest="feed",
        action="store_false",
        help="SLO loop on vLLM's /metrics only (not the gateway's own stream latencies)",
    )
    r.add_argument("--out", default=None)
    rep = sub.add_parser("report")
    rep.add_argument("files", nargs="+")
    rep.add_argument("--window-note", default="15 s")
    a = p.parse_args()
    if a.cmd == "start":
        cmd_start(a)
    elif a.cmd == "overhead":
        cmd_overhead(a)
    elif a.cmd == "cache":
        cmd_cache(a)
    elif a.cmd == "slo":
        asyncio.run(slo_main(a))
    else:
        cmd_report(a)


if __name__ == "__main__":
    main()
