"""Interactive latency beside batch work, naive or under the SLO loop.

    python bench/slo_backfill.py --base-url http://127.0.0.1:8000/v1 \\
        --traces steady,diurnal --phases alone,naive64,slo1.1,slo1.5 --duration 90

Against any OpenAI-compatible base URL whose server root serves vLLM's
``/metrics``. Per trace (``steady``: ``--rate`` req/s; ``diurnal``: one cosine
cycle from ``--low`` to ``--high`` req/s and back), each phase sends the same
open-loop stream of streamed interactive chat requests (``ignore_eos``, exactly
``--max-tokens`` tokens) while a batch load runs beside it:

    alone      nothing else
    naiveK     K closed-loop batch lines at all times (what a client without
               Bearpaw does)
    sloR       batch lines admitted by Bearpaw's SLO loop (workers/slo_pacer.py,
               the same classes the Celery worker runs) at ratio R to the
               unloaded latency, the loop fed from this server's /metrics
               exactly as the worker's replica pool feeds it. The unloaded
               latency is the one measured in this trace's ``alone`` phase.
    fixedK     like naiveK; a sweep of these is the oracle for an SLO

The batch load here is admitted in-process, not through ``/v1/batches``: it is
the controller's decision measured on its own, without the gateway and worker
processes (see docs/fleet.md for what that leaves out).

Prints per window: interactive p50/p99 TTFT and latency, batch lines/s and
generated tokens/s, vLLM running/waiting/KV, the loop's limit; then a summary
with each phase's p99 over the ``alone`` phase of the same trace. ``--out``
writes every row as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.vllm_metrics import Histogram, VllmMetrics, parse_vllm_metrics  # noqa: E402
from workers.slo_pacer import ModelPacer  # noqa: E402

WORDS = (
    "time person year way day thing world life hand part child eye place work week case point "
    "company number group problem fact network server request latency queue batch token model "
    "gateway policy priority budget tenant cache stream response client retry window limit route"
).split()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def arrivals(trace: str, duration: float, rate: float, low: float, high: float) -> list[float]:
    """Open-loop send times: where the integral of the rate crosses each integer."""
    times: list[float] = []
    dt, t, acc = 0.001, 0.0, 0.0
    while t < duration:
        if trace == "steady":
            r = rate
        else:  # one cycle: low at both ends, high in the middle
            r = low + (high - low) * (1 - math.cos(2 * math.pi * t / duration)) / 2
        acc += r * dt
        if acc >= 1.0:
            acc -= 1.0
            times.append(t)
        t += dt
    return times


@dataclass
class Bounds:
    """The SLO the loop holds (gateway.settings.SloTarget's fields)."""

    ratio: float | None = None
    ttft_p99_ms: float | None = None
    tpot_p99_ms: float | None = None
    baseline_ttft_ms: float | None = None
    baseline_tpot_ms: float | None = None
    ratio_tokens: int = 128
    min_concurrency: int = 1
    max_concurrency: int = 64
    window_s: float = 3.0
    headroom: float = 0.85
    admit_burst: int = 4


class Server:
    """This server as the pacer's PoolWindow reads a replica."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.metrics: VllmMetrics | None = None
        self.metrics_at = 0.0
        self.outstanding = 0
        self.outstanding_at_scrape = 0

    def fresh_metrics(self, now: float, stale_after: float) -> VllmMetrics | None:
        if self.metrics is None or now - self.metrics_at > stale_after:
            return None
        return self.metrics


class OnePool:
    """The two things ModelPacer asks of a ReplicaPool."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.settings = type("S", (), {"metrics_stale_seconds": 5.0})()

    def replicas(self, model: str | None = None) -> list[Server]:
        return [self.server]


@dataclass
class Phase:
    trace: str
    name: str
    inter: list[dict[str, float]] = field(default_factory=list)  # per request
    batch: list[dict[str, float]] = field(default_factory=list)  # per finished line
    samples: list[dict[str, float]] = field(default_factory=list)  # /metrics
    errors: int = 0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.base = args.base_url.rstrip("/")
        self.root = self.base[: -len("/v1")] if self.base.endswith("/v1") else self.base
        self.server = Server(self.root)
        self.rng = random.Random(7)
        self.model = args.model
        self.client = httpx.AsyncClient(
            timeout=600, limits=httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
        )

    async def scrape(self) -> VllmMetrics | None:
        try:
            r = await self.client.get(self.root + "/metrics", timeout=5)
        except httpx.HTTPError:
            return None
        m = parse_vllm_metrics(r.text, self.model)
        self.server.metrics, self.server.metrics_at = m, time.monotonic()
        self.server.outstanding_at_scrape = self.server.outstanding
        return m

    async def interactive(self, phase: Phase, t0: float, send_at: float) -> None:
        await asyncio.sleep(max(0.0, t0 + send_at - time.monotonic()))
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": text(self.rng, self.a.prompt_words)}],
            "max_tokens": self.a.max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        start = time.monotonic()
        first = None
        tokens = 0
        try:
            async with self.client.stream("POST", self.base + "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    phase.errors += 1
                    await r.aread()
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        first = first or time.monotonic()
                        tokens += 1
        except httpx.HTTPError:
            phase.errors += 1
            return
        end = time.monotonic()
        if first is None:
            phase.errors += 1
            return
        phase.inter.append(
            {"at": start - t0, "ttft": first - start, "latency": end - start, "chunks": tokens}
        )

    async def batch_line(self, phase: Phase, t0: float) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": text(self.rng, self.a.batch_prompt_words)}],
            "max_tokens": self.a.batch_max_tokens,
            "ignore_eos": True,
            "temperature": 0,
        }
        self.server.outstanding += 1
        try:
            r = await self.client.post(self.base + "/chat/completions", json=body)
            if r.status_code == 200:
                usage = r.json().get("usage") or {}
                phase.batch.append(
                    {"at": time.monotonic() - t0, "tokens": usage.get("completion_tokens", 0)}
                )
        except httpx.HTTPError:
            pass
        finally:
            self.server.outstanding -= 1

    async def run_phase(self, trace: str, name: str, base: dict[str, float]) -> Phase:
        a = self.a
        phase = Phase(trace, name)
        schedule = arrivals(trace, a.duration, a.rate, a.low, a.high)
        pacer: ModelPacer | None = None
        fixed = 0
        if name.startswith(("naive", "fixed")):
            fixed = int(name.removeprefix("naive").removeprefix("fixed"))
        elif name.startswith("slo"):
            bounds = Bounds(
                ratio=float(name[3:]),
                baseline_ttft_ms=base.get("ttft_ms"),
                baseline_tpot_ms=base.get("tpot_ms"),
                ratio_tokens=a.max_tokens,
                max_concurrency=a.slo_max,
                window_s=a.slo_window,
            )
            pacer = ModelPacer(OnePool(self.server), self.model, bounds)  # type: ignore[arg-type]
        stop = asyncio.Event()
        running: set[asyncio.Task[None]] = set()
        # Fixed loads start early to be in their steady state; the loop starts
        # with the interactive stream (an early start would find the servers
        # idle, fill them as a valley, and measure that transient instead).
        t0 = time.monotonic() + (a.warmup if fixed else 0.0)

        async def admit() -> None:
            while not stop.is_set():
                limit = fixed if pacer is None else pacer.limit()
                room = limit - len(running)
                if pacer is not None:
                    room = min(room, pacer.bounds.admit_burst)
                for _ in range(max(0, room)):
                    task = asyncio.create_task(self.batch_line(phase, t0))
                    running.add(task)
                    task.add_done_callback(running.discard)
                await asyncio.sleep(0.05)

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
                            "limit": float(pacer.pacer.limit if pacer else fixed),
                            "own": float(self.server.outstanding),
                        }
                    )
                await asyncio.sleep(a.scrape_s)

        bg = [asyncio.create_task(sample())]
        if fixed or pacer is not None:
            bg.append(asyncio.create_task(admit()))
        await asyncio.gather(*(self.interactive(phase, t0, s) for s in schedule))
        stop.set()
        await asyncio.gather(*bg)
        for task in list(running):
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        return phase

    async def baseline(self, before: VllmMetrics | None, after: VllmMetrics | None) -> dict:
        """The alone phase's TTFT p99 and mean inter-token time, from /metrics."""
        if before is None or after is None or after.ttft is None or after.itl is None:
            return {}
        ttft = after.ttft.minus(before.ttft or Histogram()).quantile(0.99)
        tpot = after.itl.minus(before.itl or Histogram()).mean
        out = {}
        if ttft:
            out["ttft_ms"] = ttft * 1000
        if tpot:
            out["tpot_ms"] = tpot * 1000
        return out


def windows(phase: Phase, width: float, duration: float) -> list[dict[str, Any]]:
    rows = []
    n = max(1, math.ceil(duration / width))
    for w in range(n):
        lo, hi = w * width, (w + 1) * width
        inter = [r for r in phase.inter if lo <= r["at"] < hi]
        lines = [b for b in phase.batch if lo <= b["at"] < hi]
        samples = [s for s in phase.samples if lo <= s["at"] < hi]
        gen = None
        if len(samples) >= 2:
            gen = (samples[-1]["gen"] - samples[0]["gen"]) / (samples[-1]["at"] - samples[0]["at"])
        rows.append(
            {
                "trace": phase.trace,
                "phase": phase.name,
                "t": lo,
                "requests": len(inter),
                "ttft_p50": pct([r["ttft"] for r in inter], 0.5) * 1000,
                "ttft_p99": pct([r["ttft"] for r in inter], 0.99) * 1000,
                "lat_p50": pct([r["latency"] for r in inter], 0.5) * 1000,
                "lat_p99": pct([r["latency"] for r in inter], 0.99) * 1000,
                "batch_lines_s": len(lines) / width,
                "batch_tok_s": sum(b["tokens"] for b in lines) / width,
                "gen_tok_s": gen,
                "running": _mean(s["running"] for s in samples),
                "waiting_max": max((s["waiting"] for s in samples), default=float("nan")),
                "kv_max": max((s["kv"] for s in samples), default=float("nan")),
                "limit": _mean(s["limit"] for s in samples),
            }
        )
    return rows


def summary(phase: Phase, duration: float) -> dict[str, Any]:
    inside = [s for s in phase.samples if 0 <= s["at"] <= duration]
    gen = None
    if len(inside) >= 2:
        gen = (inside[-1]["gen"] - inside[0]["gen"]) / (inside[-1]["at"] - inside[0]["at"])
    lines = [b for b in phase.batch if 0 <= b["at"] <= duration]
    return {
        "trace": phase.trace,
        "phase": phase.name,
        "requests": len(phase.inter),
        "errors": phase.errors,
        "ttft_p50": pct([r["ttft"] for r in phase.inter], 0.5) * 1000,
        "ttft_p99": pct([r["ttft"] for r in phase.inter], 0.99) * 1000,
        "lat_p50": pct([r["latency"] for r in phase.inter], 0.5) * 1000,
        "lat_p99": pct([r["latency"] for r in phase.inter], 0.99) * 1000,
        "batch_lines_s": len(lines) / duration,
        "batch_tok_s": sum(b["tokens"] for b in lines) / duration,
        "gen_tok_s": gen,
        "limit_mean": _mean(s["limit"] for s in inside),
    }


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _f(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


async def main(args: argparse.Namespace) -> None:
    bench = Bench(args)
    if bench.model is None:
        models = (await bench.client.get(bench.base + "/models")).json()["data"]
        bench.model = models[0]["id"]
    print(f"model {bench.model} at {bench.base}; {args.duration:.0f} s per phase", flush=True)
    all_windows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for trace in args.traces.split(","):
        base: dict[str, float] = {}
        alone_p99 = None
        for name in args.phases.split(","):
            before = await bench.scrape()
            phase = await bench.run_phase(trace, name, base)
            after = await bench.scrape()
            if name == "alone":
                base = await bench.baseline(before, after)
            rows = windows(phase, args.window, args.duration)
            all_windows.extend(rows)
            print(f"\n[{trace} / {name}]  baseline {base}", flush=True)
            print(
                f"{'t':>5} {'req':>4} {'ttft50':>7} {'ttft99':>7} {'lat50':>7} {'lat99':>7} "
                f"{'lines/s':>8} {'btok/s':>8} {'gen/s':>8} {'run':>6} {'wait':>5} {'kv':>6} "
                f"{'limit':>6}"
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
            s = summary(phase, args.duration)
            if name == "alone":
                alone_p99 = s["lat_p99"]
                s["interactive_gen_tok_s"] = s["gen_tok_s"]
            s["p99_x_alone"] = s["lat_p99"] / alone_p99 if alone_p99 else None
            summaries.append(s)
    print("\nsummary (latency ms; x alone = latency p99 over the same trace's alone phase)")
    print(
        f"{'trace':8} {'phase':8} {'req':>4} {'err':>3} {'ttft50':>7} {'ttft99':>7} {'lat50':>7} "
        f"{'lat99':>7} {'x alone':>7} {'lines/s':>8} {'btok/s':>8} {'gen/s':>8} {'limit':>6}"
    )
    for s in summaries:
        print(
            f"{s['trace']:8} {s['phase']:8} {s['requests']:4d} {s['errors']:3d} "
            f"{_f(s['ttft_p50']):>7} {_f(s['ttft_p99']):>7} {_f(s['lat_p50']):>7} "
            f"{_f(s['lat_p99']):>7} {_f(s['p99_x_alone'], 2):>7} {_f(s['batch_lines_s'], 2):>8} "
            f"{_f(s['batch_tok_s']):>8} {_f(s['gen_tok_s']):>8} {_f(s['limit_mean'], 1):>6}"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "summary": summaries, "windows": all_windows}, indent=1)
        )
    await bench.client.aclose()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--traces", default="steady,diurnal")
    p.add_argument("--phases", default="alone,naive64,slo1.1,slo1.5")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of interactive load")
    p.add_argument("--warmup", type=float, default=5.0, help="fixed batch starts this long before")
    p.add_argument("--rate", type=float, default=10.0, help="steady trace, req/s")
    p.add_argument("--low", type=float, default=2.0, help="diurnal trace, lowest req/s")
    p.add_argument("--high", type=float, default=15.0, help="diurnal trace, highest req/s")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=150)
    p.add_argument("--batch-max-tokens", type=int, default=512)
    p.add_argument("--batch-prompt-words", type=int, default=700)
    p.add_argument("--window", type=float, default=10.0, help="seconds per printed window")
    p.add_argument("--scrape-s", type=float, default=1.0, help="/metrics period (the pool's)")
    p.add_argument("--slo-window", type=float, default=3.0)
    p.add_argument("--slo-max", type=int, default=64)
    p.add_argument("--out", default=None)
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
