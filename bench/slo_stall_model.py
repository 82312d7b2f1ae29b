"""The SLO loop (workers/slo_pacer.ModelPacer, unmodified) against a model of
the interference measured on the H200, where the excess of the p99 request is
carried by the few interactive streams that meet a batch prefill.

No server and no clock: simulated time in steps of 0.2 s, the gateway's
stream feed filled with synthetic streams, one vLLM scrape a second. Each
interactive stream (0.676 s unloaded at 10 streams/s, the H200's p99 request)
is slowed by 1.7 % per sequence in the decode batch beyond those of 10
streams/s (batch lines and other interactive streams) and by ``--stall``
seconds for every batch prefill it meets; prefills come at (lines / line life)
per second. Lines follow the limit up at once and drain down as they finish.
The loop is given the trace's p99 alone as its baseline, as bench/gpu_stack.py
gives it the alone phase's.

Prints, for run 4's loop and today's, at 1.1x and 1.5x: the realised p99 and
the worst 15 s window's (x alone, after a minute of warm-up), the mean lines in
flight and the generated tokens x interactive-only, beside fixed concurrencies
on the same model: a model to compare loop designs on, not a measurement of a
GPU (it is kinder than the H200 on the diurnal trace: there fixed12 already
gave 1.61x).

    python bench/slo_stall_model.py
    python bench/slo_stall_model.py --trace diurnal     # 2 -> 15 -> 2 streams/s a minute
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.config import BackendSettings, ModelConfig, ReplicaConfig  # noqa: E402
from backends.pool import ReplicaPool  # noqa: E402
from backends.vllm_metrics import Histogram, VllmMetrics  # noqa: E402
from gateway.settings import SloTarget  # noqa: E402
from workers import slo_pacer  # noqa: E402
from workers.stream_feed import GatewayFeed  # noqa: E402

BASE_S = 0.676  # the unloaded p99 request on the H200 (128 tokens)
LINE_S = 3.2  # a 512-token batch line's life there
STEADY_RATE = 10.0  # interactive streams/s of the unloaded figure


def poisson(rng: random.Random, lam: float) -> int:
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p < limit:
            return k
        k += 1


def latency(rng: random.Random, lines: int, stall: float, rate: float = STEADY_RATE) -> float:
    """One interactive stream's latency. A decode step costs 1.7 % more per
    sequence in it, batch lines and the other interactive streams alike (at
    10 streams/s about 7 of them run at once, the unloaded figure's load)."""
    prefills = poisson(rng, lines / LINE_S * BASE_S)
    others = rate * BASE_S - STEADY_RATE * BASE_S
    slow = 1 + 0.017 * (lines + others)
    return BASE_S * slow * (0.985 + 0.01 * rng.random()) + stall * prefills


def fixed_p99(lines: int, stall: float, rates: Callable[[float], float], n: int = 20_000) -> float:
    """The p99 latency (s) with ``lines`` batch lines always in flight, over
    streams spread over the trace as its rates spread them."""
    rng = random.Random(lines)
    values, t = [], 0.0
    while len(values) < n:
        rate = rates(t)
        t += rng.expovariate(rate)
        values.append(latency(rng, lines, stall, rate))
    return _p99(values)


def pool() -> ReplicaPool:
    model = ModelConfig(name="m", replicas=[ReplicaConfig(url="http://127.0.0.1:1/v1")])
    return ReplicaPool(BackendSettings(discover=[], models=[model]))


def scrape(replica: object, at: float, running: float, samples: int) -> None:
    empty = Histogram({0.1: float(samples), float("inf"): float(samples)}, 0.02 * samples, samples)
    metrics = VllmMetrics(running=running, ttft=empty, itl=empty)
    metrics.seen = {"running"}
    replica.set_metrics(metrics, at)  # type: ignore[attr-defined]


def rate_at(trace: str, t: float, rate: float, low: float, high: float, cycle: float) -> float:
    """Interactive streams/s: steady, or a cosine between low and high (one cycle per ``cycle`` s,
    low at its ends, as bench/gpu_stack.py's diurnal phase)."""
    if trace == "steady":
        return rate
    return low + (high - low) * (1 - math.cos(2 * math.pi * t / cycle)) / 2


def run(
    ratio: float,
    stall: float,
    seconds: float,
    rates: Callable[[float], float],
    seed: int,
    base: float,
) -> tuple[float, float, float, float]:
    """(p99 x alone, worst 15 s window's p99 x alone, mean lines, total
    generated tokens x interactive-only), after a minute of warm-up. ``base``
    is the trace's p99 alone, the baseline the loop is given (as the GPU bench
    gives it the alone phase's)."""
    rng = random.Random(seed)
    replicas = pool()
    (replica,) = replicas.replicas("m")
    feed = GatewayFeed("http://model", None)
    feed.healthy = True
    bounds = SloTarget(ratio=ratio, baseline_latency_ms=base * 1000, window_s=3.0)
    pacer = slo_pacer.ModelPacer(replicas, "m", bounds, feed)
    seq, lats, lines_seen, in_flight = 0, [], [], 1.0
    windows: dict[int, list[float]] = {}
    interactive_tokens = 0
    dt, t0 = 0.2, 100.0
    for step in range(int(seconds / dt)):
        t = t0 + step * dt
        limit = pacer.pacer.limit
        in_flight = limit if in_flight < limit else max(limit, in_flight * (1 - dt / LINE_S))
        lines = round(in_flight)
        items = []
        rate = rates(t - t0)
        for _ in range(poisson(rng, rate * dt)):
            seq += 1
            lat = latency(rng, lines, stall, rate)
            tpot = (lat - 0.03) / 128
            items.append(
                {"seq": seq, "age_s": 0.0, "model": "m", "ttft_s": 0.03, "tpot_s": tpot}
                | {"tokens": 128, "duration_s": lat}
            )
            if t > t0 + 60:
                lats.append(lat)
                windows.setdefault(int((t - t0) // 15), []).append(lat)
                interactive_tokens += 128
        feed.ingest({"last_seq": seq, "data": items}, t)
        if step % 5 == 0:  # one scrape a second, as the worker's
            scrape(replica, t, running=lines + 1, samples=int(t))
            replica.outstanding_at_scrape = lines  # type: ignore[attr-defined]
            pacer.limit(t)
        if t > t0 + 60:
            lines_seen.append(lines)
    worst = max(_p99(w) for w in windows.values() if len(w) >= 20)
    lines = statistics.mean(lines_seen)
    # A line makes 512 tokens over its life; the interactive streams 128 each.
    batch_tokens = lines * 512 / LINE_S * (seconds - 60)
    return _p99(lats) / base, worst / base, lines, 1 + batch_tokens / interactive_tokens


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * len(ordered))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stall", type=float, default=0.02, help="s a stream loses per prefill met")
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--trace", default="steady", choices=["steady", "diurnal"])
    p.add_argument("--rate", type=float, default=10.0, help="steady: interactive streams/s")
    p.add_argument("--low", type=float, default=2.0)
    p.add_argument("--high", type=float, default=15.0)
    p.add_argument("--cycle", type=float, default=60.0, help="diurnal: s per cycle")
    p.add_argument("--seeds", type=int, default=4)
    a = p.parse_args()

    def rates(t: float) -> float:
        return rate_at(a.trace, t, a.rate, a.low, a.high, a.cycle)

    base = fixed_p99(0, a.stall, rates)
    fixed = {k: fixed_p99(k, a.stall, rates) / base for k in (1, 2, 3, 4, 8, 12, 16)}
    cells = ", ".join(f"{k}: {v:.3f}" for k, v in fixed.items())
    print(f"{a.trace} trace, p99 alone {base * 1000:.0f} ms; fixed lines -> p99 x alone: {cells}")
    print(
        f"median of {a.seeds} seeds (worst seed's p99 in brackets)\n"
        f"{'loop':>34} {'SLO':>5} {'p99 x':>13} {'worst 15 s':>10} {'lines':>6} {'tokens x':>8}"
    )
    now = (slo_pacer.CLIMB_EVIDENCE, slo_pacer.LONG_STREAMS)
    loops = {
        "run 4's (climb on 10 streams)": (slo_pacer.MIN_EVIDENCE, 0),
        f"climb on up to {now[0]}, p99 of {now[1]}": now,
    }
    for name, (evidence, long_streams) in loops.items():
        slo_pacer.CLIMB_EVIDENCE, slo_pacer.LONG_STREAMS = evidence, long_streams
        for ratio in (1.1, 1.5):
            runs = [run(ratio, a.stall, a.seconds, rates, s, base) for s in range(a.seeds)]
            p99, worst, lines, tokens = (statistics.median(col) for col in zip(*runs, strict=True))
            print(
                f"{name:>34} {ratio:>4}x {p99:>6.3f} ({max(r[0] for r in runs):.3f}) "
                f"{worst:>10.3f} {lines:>6.1f} {tokens:>8.2f}"
            )
    slo_pacer.CLIMB_EVIDENCE, slo_pacer.LONG_STREAMS = now


if __name__ == "__main__":
    main()
