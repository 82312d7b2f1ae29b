"""The SLO loop (workers/slo_pacer.ModelPacer, unmodified) against a model of
the interference measured on the H200, where the excess of the p99 request is
carried by the few interactive streams that meet a batch prefill.

No server and no clock: simulated time in steps of 0.2 s, the gateway's
stream feed filled with synthetic streams, one vLLM scrape a second. Each
interactive stream (0.676 s unloaded, the H200's p99 request) is slowed by
1.7 % per batch line in flight and by ``--stall`` seconds for every batch
prefill it meets; prefills come at (lines / line life) per second. Lines follow
the limit up at once and drain down as they finish.

Prints, per climb-evidence setting and SLO, the loop's realised p99 (over the
run after a minute of warm-up) and its mean lines in flight, beside fixed
concurrencies on the same model: a model to compare loop designs on, not a
measurement of a GPU.

    python bench/slo_stall_model.py
    python bench/slo_stall_model.py --stall 0.012 --seconds 900
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
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


def poisson(rng: random.Random, lam: float) -> int:
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p < limit:
            return k
        k += 1


def latency(rng: random.Random, lines: int, stall: float) -> float:
    prefills = poisson(rng, lines / LINE_S * BASE_S)
    return BASE_S * (1 + 0.017 * lines) * (0.985 + 0.01 * rng.random()) + stall * prefills


def fixed_p99(lines: int, stall: float, n: int = 20_000) -> float:
    rng = random.Random(lines)
    values = sorted(latency(rng, lines, stall) for _ in range(n))
    return values[int(0.99 * n)] / BASE_S


def pool() -> ReplicaPool:
    model = ModelConfig(name="m", replicas=[ReplicaConfig(url="http://127.0.0.1:1/v1")])
    return ReplicaPool(BackendSettings(discover=[], models=[model]))


def scrape(replica: object, at: float, running: float, samples: int) -> None:
    empty = Histogram({0.1: float(samples), float("inf"): float(samples)}, 0.02 * samples, samples)
    metrics = VllmMetrics(running=running, ttft=empty, itl=empty)
    metrics.seen = {"running"}
    replica.set_metrics(metrics, at)  # type: ignore[attr-defined]


def run(ratio: float, stall: float, seconds: float, rate: float, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    replicas = pool()
    (replica,) = replicas.replicas("m")
    feed = GatewayFeed("http://model", None)
    feed.healthy = True
    bounds = SloTarget(ratio=ratio, baseline_latency_ms=BASE_S * 1000, window_s=3.0)
    pacer = slo_pacer.ModelPacer(replicas, "m", bounds, feed)
    seq, lats, lines_seen, in_flight = 0, [], [], 1.0
    dt, t0 = 0.2, 100.0
    for step in range(int(seconds / dt)):
        t = t0 + step * dt
        limit = pacer.pacer.limit
        in_flight = limit if in_flight < limit else max(limit, in_flight * (1 - dt / LINE_S))
        lines = round(in_flight)
        items = []
        for _ in range(poisson(rng, rate * dt)):
            seq += 1
            lat = latency(rng, lines, stall)
            tpot = (lat - 0.03) / 128
            items.append(
                {"seq": seq, "age_s": 0.0, "model": "m", "ttft_s": 0.03, "tpot_s": tpot}
                | {"tokens": 128, "duration_s": lat}
            )
            if t > t0 + 60:
                lats.append(lat)
        feed.ingest({"last_seq": seq, "data": items}, t)
        if step % 5 == 0:  # one scrape a second, as the worker's
            scrape(replica, t, running=lines + 1, samples=int(t))
            replica.outstanding_at_scrape = lines  # type: ignore[attr-defined]
            pacer.limit(t)
        if t > t0 + 60:
            lines_seen.append(lines)
    lats.sort()
    return lats[int(0.99 * len(lats))] / BASE_S, statistics.mean(lines_seen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stall", type=float, default=0.02, help="s a stream loses per prefill met")
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--rate", type=float, default=10.0, help="interactive streams/s")
    p.add_argument("--seeds", type=int, default=4)
    a = p.parse_args()
    fixed = {k: fixed_p99(k, a.stall) for k in (1, 2, 3, 4, 8, 12, 16)}
    cells = ", ".join(f"{k}: {v:.3f}" for k, v in fixed.items())
    print(f"fixed concurrency -> p99 x unloaded: {cells}")
    print(f"\n{'loop':>34} {'SLO':>5} {'p99 x (median)':>14} {'worst seed':>10} {'lines':>6}")
    now = (slo_pacer.CLIMB_EVIDENCE, slo_pacer.LONG_STREAMS)
    loops = {
        "run 4's (climb on 10 streams)": (slo_pacer.MIN_EVIDENCE, 0),
        f"climb on up to {now[0]}, p99 of {now[1]}": now,
    }
    for name, (evidence, long_streams) in loops.items():
        slo_pacer.CLIMB_EVIDENCE, slo_pacer.LONG_STREAMS = evidence, long_streams
        for ratio in (1.1, 1.5):
            runs = [run(ratio, a.stall, a.seconds, a.rate, seed) for seed in range(a.seeds)]
            p99s = [r for r, _ in runs]
            print(
                f"{name:>34} {ratio:>4}x {statistics.median(p99s):>14.3f} {max(p99s):>10.3f} "
                f"{statistics.mean(n for _, n in runs):>6.1f}"
            )
    slo_pacer.CLIMB_EVIDENCE, slo_pacer.LONG_STREAMS = now


if __name__ == "__main__":
    main()
