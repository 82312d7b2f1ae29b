"""The SLO pacer (workers/slo_pacer.py) against synthetic metric sequences.

No clock is involved: every test feeds readings (or scrapes with explicit
timestamps) and checks the limits the loop answers.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from backends.config import BackendSettings, ModelConfig, ReplicaConfig
from backends.pool import ReplicaPool
from backends.vllm_metrics import Histogram, VllmMetrics, parse_vllm_metrics
from gateway.settings import SloTarget, WorkerSettings
from workers.batch_runner import BatchRunner
from workers.slo_pacer import TAIL_EXCESS, AimdLimit, PoolWindow, Reading, SloPacer, pacer_for

BUCKETS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0)


def hist(samples: list[float]) -> Histogram:
    """A cumulative histogram of the given latencies (seconds)."""
    buckets = {le: float(sum(1 for s in samples if s <= le)) for le in BUCKETS}
    buckets[float("inf")] = float(len(samples))
    return Histogram(buckets, sum(samples), float(len(samples)))


# ---------------------------------------------------------------- histograms


def test_histograms_parsed_summed_over_engines_and_windowed() -> None:
    text = "\n".join(
        [
            "# TYPE vllm:time_to_first_token_seconds histogram",
            *(
                f'vllm:time_to_first_token_seconds_bucket{{engine="{e}",le="{le}",'
                f'model_name="m"}} {n}'
                for e in ("0", "1")
                for le, n in (("0.02", 5), ("0.04", 9), ("0.1", 10), ("+Inf", 10))
            ),
            'vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 10',
            'vllm:time_to_first_token_seconds_count{engine="1",model_name="m"} 10',
            'vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.3',
            'vllm:time_to_first_token_seconds_sum{engine="1",model_name="m"} 0.3',
            'vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="m"} 100',
            'vllm:inter_token_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 100',
            'vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 100',
            'vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"} 0.6',
            'vllm:num_requests_running{engine="0",model_name="m"} 3',
        ]
    )
    metrics = parse_vllm_metrics(text, "m")
    assert metrics.running == 3
    assert metrics.ttft is not None and metrics.itl is not None
    assert metrics.ttft.count == 20
    assert metrics.ttft.buckets[0.02] == 10
    # Median: rank 10 of 20 lies at the top of the first bucket (10 at or below 20 ms).
    assert metrics.ttft.quantile(0.5) == pytest.approx(0.02)
    # p99: rank 19.8 of 20 lies in (0.04, 0.1], where the last 2 samples are.
    assert metrics.ttft.quantile(0.99) == pytest.approx(0.04 + 0.06 * 1.8 / 2)
    assert metrics.itl.mean == pytest.approx(0.006)

    later = hist([0.01] * 4 + [0.3] * 1)
    window = later.minus(hist([0.01] * 4))
    assert window.count == 1 and window.quantile(0.99) == pytest.approx(0.25 + 0.25 * 0.99)
    assert Histogram().quantile(0.99) is None
    # A restarted server's counters begin again: the newer scrape is the window.
    assert hist([0.01]).minus(hist([0.01] * 5)).count == 1


# ------------------------------------------------------------------ the AIMD


def test_backs_off_within_one_decision_and_never_below_the_floor() -> None:
    aimd = AimdLimit(lo=1, hi=64, start=32, settle_ticks=2)
    assert aimd.step(1.2, in_use=32) == 16  # at risk: halved at once
    assert aimd.step(1.2, in_use=16) == 16  # settling: the cut is on its way
    assert aimd.step(1.2, in_use=16) == 16
    assert aimd.step(1.2, in_use=16) == 8  # still over after settling: again
    assert aimd.step(3.0, in_use=8) == 2  # severe: a quarter, even while settling
    for _ in range(10):
        aimd.step(3.0, in_use=1)
    assert aimd.limit == 1


def test_climbs_back_when_met_and_stays_bounded() -> None:
    aimd = AimdLimit(lo=1, hi=20, start=4, settle_ticks=0)
    assert aimd.step(0.8, in_use=4) == 5  # comfortably inside: one more line
    assert aimd.step(0.2, in_use=5) == 6  # far inside: a quarter more (at least one)
    assert aimd.step(0.9, in_use=6) == 6  # near the bound: hold
    assert aimd.step(None, in_use=6) == 12  # nobody to protect: double
    for _ in range(10):
        aimd.step(None, in_use=aimd.limit)
    assert aimd.limit == 20
    # A limit the batch does not fill does not grow further.
    small = AimdLimit(lo=1, hi=64, start=8, settle_ticks=0)
    for _ in range(10):
        small.step(0.1, in_use=3)
    assert small.limit == 8


def latency_model(lines: int) -> tuple[float, float]:
    """Interactive (TTFT p99, TPOT) in seconds with `lines` batch lines running,
    shaped like the H200 measurement: per-token time grows ~1.7% per line."""
    return 0.03 + 0.006 * lines, 0.0051 * (1 + 0.017 * lines)


def run_loop(pacer: SloPacer, ticks: int, lag: int = 2) -> list[tuple[int, float]]:
    """Closed loop: the lines in flight follow the limit `lag` decisions later
    (lines already running finish first); returns (lines, loaded/unloaded) per tick."""
    history: list[int] = [pacer.limit] * (lag + 1)
    trace = []
    ttft0, tpot0 = latency_model(0)
    for _ in range(ticks):
        lines = history[-1 - lag]
        ttft, tpot = latency_model(lines)
        pacer.observe(Reading(ttft, tpot, busy=True, own=lines))
        trace.append((lines, (ttft + 128 * tpot) / (ttft0 + 128 * tpot0)))
        history.append(pacer.limit)
    return trace


def test_holds_a_ratio_slo_against_a_latency_model() -> None:
    bounds = SloTarget(ratio=1.5, baseline_ttft_ms=30, baseline_tpot_ms=5.1)
    pacer = SloPacer(bounds)
    trace = run_loop(pacer, 300)
    settled = trace[100:]
    lines = [n for n, _ in settled]
    # The model allows ~26 lines at 1.5x; the loop lives just below that.
    assert 10 <= min(lines) and max(lines) <= 30
    over = [r for _, r in settled if r > 1.5]
    assert len(over) <= len(settled) // 10  # rare, brief excursions
    assert max(r for _, r in settled) < 1.5 * 1.1


def test_tighter_slo_admits_fewer_lines() -> None:
    loose = run_loop(SloPacer(SloTarget(ratio=1.5, baseline_tpot_ms=5.1, baseline_ttft_ms=30)), 200)
    tight = run_loop(SloPacer(SloTarget(ratio=1.1, baseline_tpot_ms=5.1, baseline_ttft_ms=30)), 200)

    def mean(trace: list[tuple[int, float]]) -> float:
        return sum(n for n, _ in trace[100:]) / 100

    assert mean(tight) < mean(loose)
    assert all(r <= 1.1 * 1.1 for _, r in tight[100:])


def test_millisecond_bounds_and_valleys() -> None:
    pacer = SloPacer(SloTarget(ttft_p99_ms=100, tpot_p99_ms=7, max_concurrency=32))
    assert pacer.observe(Reading(0.05, 0.005, busy=True, own=1)) == 2
    assert pacer.last_pressure == pytest.approx(0.05 / 0.1 * 0 + 5 / 7)
    pacer.observe(Reading(0.3, 0.005, busy=True, own=2))  # TTFT over its bound
    assert pacer.limit == 1 and pacer.last_pressure == pytest.approx(3.0)
    pacer.aimd._settling = 0
    for _ in range(6):  # nobody else at the servers: double up to the cap
        pacer.observe(Reading(None, 0.005, busy=False, own=pacer.limit))
    assert pacer.limit == 32
    # Traffic is back but no latency sample yet: hold, do not guess.
    assert pacer.observe(Reading(None, None, busy=True, own=32)) == 32


def test_ratio_without_baseline_holds_the_floor_then_learns_it() -> None:
    pacer = SloPacer(SloTarget(ratio=1.2, min_concurrency=2))
    pacer.aimd.limit = 10
    # No baseline yet and our lines above the floor: nothing to learn from.
    assert pacer.observe(Reading(0.05, 0.006, busy=True, own=10)) == 2
    assert pacer.base_tpot is None
    # A window with only the floor's lines measures the unloaded latency.
    assert pacer.observe(Reading(0.03, 0.005, busy=True, own=2)) == 3
    assert pacer.base_tpot == pytest.approx(0.005)
    # Learned fast downwards, slowly upwards.
    pacer.observe(Reading(0.03, 0.004, busy=True, own=2))
    assert pacer.base_tpot == pytest.approx(0.0045)
    pacer.observe(Reading(0.03, 0.008, busy=True, own=1))
    assert pacer.base_tpot == pytest.approx(0.0045 * 0.95 + 0.008 * 0.05)


def test_slo_needs_a_bound() -> None:
    with pytest.raises(ValidationError):
        SloTarget()
    with pytest.raises(ValidationError):
        SloTarget(ratio=1.1, min_concurrency=8, max_concurrency=4)
    settings = WorkerSettings(slo={"*": {"ratio": 1.5}, "big": {"tpot_p99_ms": 30}})
    assert settings.slo_for("big").tpot_p99_ms == 30  # type: ignore[union-attr]
    assert settings.slo_for("other").ratio == 1.5  # type: ignore[union-attr]
    assert WorkerSettings().slo_for("other") is None


# ------------------------------------------------------ through a replica pool


def two_replica_pool() -> ReplicaPool:
    return ReplicaPool(
        BackendSettings(
            discover=[],
            models=[
                ModelConfig(
                    name="tiny",
                    replicas=[
                        ReplicaConfig(url="http://127.0.0.1:1/v1"),
                        ReplicaConfig(url="http://127.0.0.1:2/v1"),
                    ],
                )
            ],
        )
    )


def scrape(replica: object, at: float, running: float, ttft: list[float], itl: list[float]) -> None:
    metrics = VllmMetrics(running=running, ttft=hist(ttft), itl=hist(itl))
    metrics.seen = {"running"}
    replica.set_metrics(metrics, at)  # type: ignore[attr-defined]


def test_pool_window_reads_histogram_deltas_across_servers() -> None:
    pool = two_replica_pool()
    a, b = pool.replicas("tiny")
    window = PoolWindow(window_s=2.0, stale_after=5.0)
    a.outstanding = 2
    scrape(a, 100.0, running=2, ttft=[0.02] * 50, itl=[0.005] * 1000)
    scrape(b, 100.0, running=0, ttft=[], itl=[])
    first = window.read(pool.replicas("tiny"), 100.1)
    assert first is not None and first.ttft_p99 is None  # one scrape: no window yet
    assert first.busy is False and first.own == 2
    assert window.read(pool.replicas("tiny"), 100.2) is None  # nothing new since
    # One second later A served 10 more first tokens, two of them slow, and
    # tokens 8 ms apart; B served someone else's request (busy).
    scrape(a, 101.0, running=2, ttft=[0.02] * 58 + [0.3] * 2, itl=[0.005] * 1000 + [0.008] * 100)
    scrape(b, 101.0, running=1, ttft=[0.02], itl=[0.008] * 100)
    reading = window.read(pool.replicas("tiny"), 101.1)
    assert reading is not None and reading.busy is True
    assert reading.ttft_p99 is not None and reading.ttft_p99 > 0.25  # 2 slow of 11
    assert reading.tpot == pytest.approx(0.008)
    # Old scrapes leave the window: a quiet second later only its deltas count.
    scrape(a, 102.0, running=2, ttft=[0.02] * 58 + [0.3] * 2, itl=[0.005] * 1000 + [0.008] * 100)
    scrape(b, 102.0, running=1, ttft=[0.02], itl=[0.008] * 100)
    window.read(pool.replicas("tiny"), 102.1)
    scrape(a, 103.0, running=2, ttft=[0.02] * 60 + [0.3] * 2, itl=[0.005] * 1100 + [0.008] * 100)
    scrape(b, 103.0, running=0, ttft=[0.02], itl=[0.008] * 100)
    reading = window.read(pool.replicas("tiny"), 103.1)
    assert reading is not None
    assert reading.ttft_p99 is not None and reading.ttft_p99 <= 0.02
    assert reading.tpot == pytest.approx(0.005)


def test_batch_runner_uses_the_loop_only_under_an_slo() -> None:
    pool = two_replica_pool()
    a, b = pool.replicas("tiny")
    import time

    now = time.monotonic()
    scrape(a, now - 1.0, running=3, ttft=[0.02] * 10, itl=[0.005] * 100)
    scrape(b, now - 1.0, running=0, ttft=[], itl=[])
    cfg = WorkerSettings(
        batch_concurrency=16,
        slo={"tiny": SloTarget(ttft_p99_ms=100, tpot_p99_ms=10, min_concurrency=3)},
    )
    rt = SimpleNamespace(pool=pool, settings=SimpleNamespace(workers=cfg))
    runner = BatchRunner(rt, owner="test")  # type: ignore[arg-type]
    # Busy and no latency window yet: the loop holds its floor, not the fixed 2.
    assert runner._concurrency("tiny") == 3
    # A second scrape with fast interactive latencies: the loop climbs.
    scrape(a, now, running=3, ttft=[0.02] * 20, itl=[0.005] * 200)
    scrape(b, now, running=0, ttft=[], itl=[])
    assert runner._concurrency("tiny") > 3
    assert pacer_for(pool, "tiny", cfg.slo["tiny"]) is pacer_for(pool, "tiny", cfg.slo["tiny"])
    # Without an SLO for the model, the fixed numbers still apply.
    plain = BatchRunner(
        SimpleNamespace(pool=pool, settings=SimpleNamespace(workers=WorkerSettings())),  # type: ignore[arg-type]
        owner="test",
    )
    assert plain._concurrency("tiny") == WorkerSettings().backfill_busy_concurrency


def test_ratio_pressure_weighs_the_typical_excess_for_the_p99_request() -> None:
    # The reading is a typical request's latency; the p99 request meets more
    # batch prefills, so a reading at 60 % of the allowed excess is already
    # TAIL_EXCESS x 60 % of it for the p99 request, and the loop must not climb.
    pacer = SloPacer(SloTarget(ratio=1.5, baseline_ttft_ms=40, baseline_tpot_ms=5.0))
    unloaded = 0.040 + 128 * 0.005
    tpot = (unloaded * 1.3 - 0.040) / 128  # 30 % over: 60 % of the 50 % allowed
    reading = Reading(ttft_p99=0.040, tpot=tpot, busy=True, own=8)
    assert pacer.pressure(reading) == pytest.approx(TAIL_EXCESS * 0.6)
    pacer.aimd.limit = 8
    assert pacer.observe(reading) <= 8


# ------------------------------------------------- the gateway's own streams


def test_stream_ring_reads_by_cursor_and_stays_bounded() -> None:
    from gateway.stream_latency import StreamLatencies

    ring = StreamLatencies(size=4)
    assert ring.after(0) == []
    for i in range(6):
        ring.add("m", 0.01 * i, 0.005, 10, 0.06)
    assert ring.last_seq == 6
    # Only the newest 4 are kept; a reader that fell behind gets those.
    assert [s.seq for s in ring.after(0)] == [3, 4, 5, 6]
    assert [s.seq for s in ring.after(4)] == [5, 6]
    assert ring.after(6) == []
    assert [s.seq for s in ring.after(0, limit=1)] == [6]


def _answer(last: int, *items: tuple[int, float, float, float | None]) -> dict:
    return {
        "last_seq": last,
        "data": [
            {"seq": q, "age_s": age, "model": "tiny", "ttft_s": ttft, "tpot_s": tpot, "tokens": 64}
            for q, age, ttft, tpot in items
        ],
    }


def test_gateway_feed_keeps_a_window_and_follows_a_restart() -> None:
    from workers.stream_feed import GatewayFeed

    feed = GatewayFeed("http://gw", "k")
    feed.ingest(
        _answer(3, (1, 9.0, 0.02, 0.005), (2, 2.0, 0.03, 0.005), (3, 0.5, 0.04, None)), 100.0
    )
    assert feed._after == 3
    recent = feed.recent("tiny", 100.0, window_s=3.0, at_least=1)
    assert [s.ttft_s for s in recent] == [0.03, 0.04]  # ended within the last 3 s
    # Fewer than asked for in the window: the last ones of up to 4 windows back.
    assert [s.ttft_s for s in feed.recent("tiny", 100.0, 3.0, at_least=3)] == [0.02, 0.03, 0.04]
    assert feed.recent("other", 100.0, 3.0, 1) == []
    # The gateway restarted (its sequence is behind the cursor): read from 0 next.
    feed.ingest(_answer(1), 101.0)
    assert feed._after == 0
    feed.ingest(_answer(1, (1, 0.1, 0.05, 0.006)), 101.2)
    assert feed._after == 1 and feed.recent("tiny", 101.2, 3.0, 1)[-1].ttft_s == 0.05


def test_gateway_reading_is_the_p99_request_without_the_tail_weight() -> None:
    bounds = SloTarget(ratio=1.5, baseline_latency_ms=680)
    pacer = SloPacer(bounds)
    # vLLM's reading alone would be weighed by TAIL_EXCESS; the gateway's p99
    # request is taken as it is: 30 % over of 50 % allowed is 0.6.
    reading = Reading(0.03, 0.005, busy=True, own=8, gw_latency_p99=0.680 * 1.3)
    assert pacer.pressure(reading) == pytest.approx(0.6)
    pacer.aimd.limit = 8
    pacer.aimd._settling = 0
    assert pacer.observe(reading) == 9  # inside the headroom: one more line
    over = Reading(0.03, 0.005, busy=True, own=9, gw_latency_p99=0.680 * 1.6)
    assert pacer.observe(over) == 4  # over the bound: halved at once
    # Millisecond bounds read the gateway's p99s, not vLLM's histograms.
    ms = SloPacer(SloTarget(ttft_p99_ms=50))
    slow_first = Reading(0.01, 0.005, busy=True, own=2, gw_ttft_p99=0.1, gw_latency_p99=0.7)
    assert ms.pressure(slow_first) == pytest.approx(2.0)


def test_gateway_baseline_learned_in_quiet_windows() -> None:
    pacer = SloPacer(SloTarget(ratio=1.2, min_concurrency=1))
    # No baseline yet: the loop holds its floor.
    assert pacer.observe(Reading(0.03, 0.005, busy=True, own=4, gw_latency_p99=0.7)) == 1
    assert pacer.base_latency is None  # 4 lines of ours: not a quiet window
    pacer.observe(Reading(0.03, 0.005, busy=True, own=1, gw_latency_p99=0.7))
    assert pacer.base_latency == pytest.approx(0.7)


def test_model_pacer_reads_the_feed_streams() -> None:
    from workers.slo_pacer import ModelPacer
    from workers.stream_feed import GatewayFeed

    pool = two_replica_pool()
    a, b = pool.replicas("tiny")
    feed = GatewayFeed("http://gw", None)
    feed.healthy = True
    # 50 streams: 49 at 0.70 s for 128 tokens and one slow one.
    items = [(i + 1, 0.5, 0.03, (0.70 - 0.03) / 128) for i in range(49)]
    items.append((50, 0.4, 0.03, (1.20 - 0.03) / 128))
    feed.ingest(_answer(50, *items), 200.0)
    bounds = SloTarget(ratio=1.5, baseline_latency_ms=700, window_s=3.0)
    pacer = ModelPacer(pool, "tiny", bounds, feed)
    scrape(a, 199.0, running=1, ttft=[0.02], itl=[0.005] * 10)
    scrape(b, 199.0, running=0, ttft=[], itl=[])
    pacer.limit(199.5)
    scrape(a, 200.0, running=1, ttft=[0.02] * 2, itl=[0.005] * 20)
    scrape(b, 200.0, running=0, ttft=[], itl=[])
    pacer.limit(200.0)
    # p99 of 50 by nearest rank is the 50th: the slow stream, 1.2 s of 0.7 allowed 1.05.
    assert pacer.pacer.last_pressure == pytest.approx((1.2 / 0.7 - 1) / 0.5)


def test_model_pacer_judges_each_limit_on_streams_received_under_it() -> None:
    from workers.slo_pacer import MIN_EVIDENCE, ModelPacer
    from workers.stream_feed import GatewayFeed

    pool = two_replica_pool()
    a, b = pool.replicas("tiny")
    feed = GatewayFeed("http://gw", None)
    feed.healthy = True
    bounds = SloTarget(ratio=1.5, baseline_latency_ms=700, window_s=3.0, min_concurrency=1)
    pacer = ModelPacer(pool, "tiny", bounds, feed)
    pacer.pacer.aimd.limit = 8
    pacer.pacer.aimd.settle_ticks = 0
    seq = 0

    def streams(now: float, n: int, latency: float) -> None:
        nonlocal seq
        items = []
        for _ in range(n):
            seq += 1
            tpot = (latency - 0.03) / 128
            items.append(
                {
                    "seq": seq,
                    "age_s": 0.0,
                    "model": "tiny",
                    "ttft_s": 0.03,
                    "tpot_s": tpot,
                    "tokens": 128,
                    "duration_s": latency,
                }
            )
        feed.ingest({"last_seq": seq, "data": items}, now)

    def tick(now: float, own: int) -> int:
        scrape(a, now, running=own, ttft=[0.02] * int(now), itl=[0.005] * int(now))
        scrape(b, now, running=0, ttft=[], itl=[])
        a.outstanding_at_scrape = own  # type: ignore[attr-defined]
        return pacer.limit(now)

    streams(100.0, 40, 0.70 * 1.7)  # over the bound
    assert tick(100.0, own=8) == 4  # cut at once
    # The slow streams are still in the window, but they began before the cut,
    # and lines above the new limit still run: no second cut, a wait instead.
    streams(101.0, MIN_EVIDENCE, 0.70 * 1.7)
    assert tick(101.0, own=6) == 4
    # The lines came down to the limit at 101: only streams received after count.
    streams(102.0, MIN_EVIDENCE - 1, 0.70 * 1.1)
    assert tick(102.0, own=4) == 4
    streams(103.0, 1, 0.70 * 1.1)  # evidence enough: 20 % of 50 % allowed, climb
    assert tick(103.0, own=4) == 5


def test_model_pacer_climbs_near_the_bound_only_on_enough_streams() -> None:
    from workers.slo_pacer import CLIMB_EVIDENCE, MIN_EVIDENCE, ModelPacer
    from workers.stream_feed import GatewayFeed

    pool = two_replica_pool()
    a, b = pool.replicas("tiny")
    feed = GatewayFeed("http://gw", None)
    feed.healthy = True
    bounds = SloTarget(ratio=1.1, baseline_latency_ms=700, window_s=3.0, min_concurrency=1)
    pacer = ModelPacer(pool, "tiny", bounds, feed)
    pacer.pacer.aimd.limit = 2
    pacer.pacer.aimd.settle_ticks = 0
    seq = 0

    def streams(now: float, n: int, ratio: float) -> None:
        nonlocal seq
        items = []
        for _ in range(n):
            seq += 1
            latency = 0.70 * ratio
            items.append(
                {
                    "seq": seq,
                    "age_s": 0.0,
                    "model": "tiny",
                    "ttft_s": 0.03,
                    "tpot_s": (latency - 0.03) / 128,
                    "tokens": 128,
                    "duration_s": latency,
                }
            )
        feed.ingest({"last_seq": seq, "data": items}, now)

    def tick(now: float) -> int:
        scrape(a, now, running=3, ttft=[0.02] * int(now), itl=[0.005] * int(now))
        scrape(b, now, running=0, ttft=[], itl=[])
        a.outstanding_at_scrape = 2  # type: ignore[attr-defined]
        return pacer.limit(now)

    # 7.5 % of the 10 % allowed (pressure 0.75, headroom 0.85): ten streams
    # are enough for a cut, not for a climb this close to the bound.
    streams(100.0, MIN_EVIDENCE, 1.075)
    assert tick(100.0) == 2
    streams(104.0, CLIMB_EVIDENCE - MIN_EVIDENCE - 1, 1.075)
    assert tick(104.0) == 2
    streams(105.0, 1, 1.075)  # the streams received under this limit now suffice
    assert tick(105.0) == 3
    # Over the bound: a cut on the first ten streams under the new limit.
    streams(106.0, MIN_EVIDENCE, 1.15)
    assert tick(106.0) == 1
    # Far inside (pressure 0.2): ten streams are enough to climb.
    streams(107.0, MIN_EVIDENCE, 1.02)
    assert tick(107.0) == 2


def test_model_pacer_cuts_on_the_limits_whole_record_when_the_window_looks_fine() -> None:
    from workers.slo_pacer import ModelPacer
    from workers.stream_feed import GatewayFeed

    pool = two_replica_pool()
    a, b = pool.replicas("tiny")
    feed = GatewayFeed("http://gw", None)
    feed.healthy = True
    bounds = SloTarget(ratio=1.1, baseline_latency_ms=700, window_s=3.0, min_concurrency=1)
    pacer = ModelPacer(pool, "tiny", bounds, feed)
    pacer.pacer.aimd.limit = 4
    pacer.pacer.aimd.settle_ticks = 0

    def item(seq: int, ratio: float) -> dict:
        latency = 0.70 * ratio
        return {
            "seq": seq,
            "age_s": 0.0,
            "model": "tiny",
            "ttft_s": 0.03,
            "tpot_s": (latency - 0.03) / 128,
            "tokens": 128,
            "duration_s": latency,
        }

    # 3 in 100 streams under this limit met a stall (12 % over where
    # 1.1x allows 10 %); the last window's 40 streams hold none of them.
    early = [item(i + 1, 1.12 if i % 20 == 0 else 1.0) for i in range(60)]
    feed.ingest({"last_seq": 60, "data": early}, 100.0)
    late = [item(61 + i, 1.0) for i in range(40)]
    feed.ingest({"last_seq": 100, "data": late}, 110.0)
    scrape(a, 110.0, running=5, ttft=[0.02] * 110, itl=[0.005] * 110)
    scrape(b, 110.0, running=0, ttft=[], itl=[])
    a.outstanding_at_scrape = 4  # type: ignore[attr-defined]
    assert pacer.limit(110.0) == 2
    assert pacer.pacer.last_pressure == pytest.approx(1.2)
