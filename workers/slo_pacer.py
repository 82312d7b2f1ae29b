"""SLO-driven backfill: how many batch/async lines a worker keeps in flight.

A closed loop, one decision per /metrics scrape of the model's vLLM servers:

* the reading is the interactive latency of the last ``window_s`` seconds.
  First choice: the streams the gateway itself served (workers/stream_feed.py),
  each with its own time to first token and per-token time, so the loop reads
  the p99 *request* (TTFT + ratio_tokens x its per-token time) directly.
  Without that feed (no gateway URL or admin key, gateway unreachable, or no
  stream ended lately), from the difference of two scrapes of vLLM's
  histograms: TTFT p99 from ``time_to_first_token_seconds``, per-token time as
  the mean of ``inter_token_latency_seconds`` (vLLM's inter-token buckets,
  10, 25, 50 ms ..., are too coarse to read a p99 of a few ms), the excess
  weighed by ``TAIL_EXCESS`` to stand for the p99 request;
* pressure = the worst of measured / bound over the stated bounds (for a
  ratio: the used share of the allowed excess over the unloaded latency);
* additive increase while pressure is below ``headroom`` (faster when far
  below it), multiplicative decrease as soon as it passes 1, then a short
  settling time, since lines already running keep loading the server until
  they end. With nobody else at the servers the limit doubles (a valley).

Several worker processes each run this loop on the same signal; like TCP
flows sharing a link, their AIMD limits converge to shares of what the SLO
allows, so no coordination between them is needed.

The loop counts decisions, never the clock: ``AimdLimit`` is a pure function
of the readings it is fed, which is what the unit tests drive.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from backends.vllm_metrics import Histogram
from workers.stream_feed import GatewayFeed

log = logging.getLogger("bearpaw.workers.slo")

# Pressure above which one decrease is not enough: cut to a quarter.
SEVERE = 1.5
# Pressure below which the limit climbs by a quarter rather than one line.
FAR_INSIDE = 0.5
# Weight of a new quiet window in the learned unloaded latency: fast downwards,
# slow upwards, so that windows loaded by other workers' lines (which this
# process cannot tell from interactive load) do not loosen the ratio quickly.
BASELINE_DOWN = 0.5
BASELINE_UP = 0.05
# The ratio's reading (TTFT p99 + tokens x mean inter-token time) is the latency
# of a typical request, but the SLO is on the p99 request, which meets more of
# the batch prefills that stall decode steps. On the H200 (bench/gpu_stack.py)
# the p99 request's excess over the unloaded latency was 1.5-2x the reading's,
# so the loop weighs the reading's excess by this much.
TAIL_EXCESS = 1.7


class SloBounds(Protocol):
    """What the pacer needs of gateway.settings.SloTarget (duck-typed, since
    workers' modules below the runner do not depend on gateway settings)."""

    ttft_p99_ms: float | None
    tpot_p99_ms: float | None
    ratio: float | None
    baseline_ttft_ms: float | None
    baseline_tpot_ms: float | None
    baseline_latency_ms: float | None
    ratio_tokens: int
    min_concurrency: int
    max_concurrency: int
    window_s: float
    headroom: float
    admit_burst: int


class AimdLimit:
    """Additive increase, multiplicative decrease of an in-flight limit."""

    def __init__(
        self,
        lo: int,
        hi: int,
        start: int | None = None,
        headroom: float = 0.85,
        decrease: float = 0.5,
        settle_ticks: int = 2,
    ) -> None:
        self.lo, self.hi = lo, hi
        self.limit = lo if start is None else max(lo, min(hi, start))
        self.headroom = headroom
        self.decrease = decrease
        self.settle_ticks = settle_ticks
        self._settling = 0

    def step(self, pressure: float | None, in_use: int | None = None) -> int:
        """One decision. ``pressure`` is measured latency / bound (None: no
        interactive traffic to protect); ``in_use`` the lines actually in
        flight, so that a limit nobody fills neither grows nor shields a cut."""
        used = self.limit if in_use is None else max(self.lo, min(self.limit, in_use))
        if pressure is not None and pressure > 1.0:
            if self._settling > 0 and pressure < SEVERE:
                self._settling -= 1  # the last cut has not taken effect yet
                return self.limit
            factor = self.decrease if pressure < SEVERE else self.decrease / 2
            self.limit = max(self.lo, min(self.limit, math.floor(used * factor)))
            self._settling = self.settle_ticks
            return self.limit
        if self._settling > 0:
            self._settling -= 1
            return self.limit
        if pressure is None:
            grown = 2 * used  # nobody to protect: slow start
        elif pressure < FAR_INSIDE * self.headroom:
            grown = used + max(1, used // 4)
        elif pressure < self.headroom:
            grown = used + 1
        else:
            return self.limit  # close to the bound: hold
        self.limit = max(self.limit, min(self.hi, grown))
        return self.limit


# Streams a gateway-measured p99 is read from at least (widening the window).
MIN_STREAMS = 40
# Streams received since the limit last changed (and the lines in flight came
# down to it) that one decision needs: evidence of the load as it is now.
# Without this, one slow stream read again and again in the widened window
# cut the limit from 13 to 1 in three decisions (CPU rehearsal).
MIN_EVIDENCE = 10
# A climb needs more: the closer a reading sits to ``headroom``, the more
# streams must agree, up to this many. Near the bound the excess is carried by
# a few streams in a hundred (those that met a batch prefill), which ten
# streams mostly miss: on the H200 at 1.1x the loop climbed 2 -> 3 on readings
# of 0.35-0.81 from ten streams, then had to cut 3 -> 1 at 1.3 (run 4).
# A cut stays quick: one bad reading of ten streams is evidence enough.
CLIMB_EVIDENCE = 60
# The most streams received under one limit that a reading keeps (a p99 of
# 100 is its 99th value, not its maximum).
LONG_STREAMS = 100


@dataclass(slots=True)
class Reading:
    """Interactive latency over one window, in seconds."""

    ttft_p99: float | None  # None: no request started in the window
    tpot: float | None  # mean inter-token latency; None: no token in the window
    busy: bool  # someone other than this process used the servers in the window
    own: int  # this process's requests at the servers at the last scrape
    # From the gateway's own streams (None without them): p99 over requests of
    # TTFT, of per-token time, and of TTFT + ratio_tokens x per-token time.
    gw_ttft_p99: float | None = None
    gw_tpot_p99: float | None = None
    gw_latency_p99: float | None = None
    # Interactive streams run, but too few began under the current limit.
    pending: bool = False
    # Gateway streams received under the current limit (None: no feed).
    evidence: int | None = None


class SloPacer:
    """Turns readings into a limit for one model under one SLO."""

    def __init__(self, bounds: SloBounds) -> None:
        self.bounds = bounds
        self.aimd = AimdLimit(
            bounds.min_concurrency, bounds.max_concurrency, headroom=bounds.headroom
        )
        self.base_ttft = _seconds(bounds.baseline_ttft_ms)
        self.base_tpot = _seconds(bounds.baseline_tpot_ms)
        # The unloaded p99 request (TTFT + ratio_tokens x per-token time) as the
        # gateway measures it: stated through both baselines, or learned.
        self.base_latency = _seconds(getattr(bounds, "baseline_latency_ms", None))
        if self.base_latency is None and self.base_ttft is not None and self.base_tpot is not None:
            self.base_latency = self.base_ttft + bounds.ratio_tokens * self.base_tpot
        self.last_pressure: float | None = None

    @property
    def limit(self) -> int:
        return self.aimd.limit

    def observe(self, reading: Reading) -> int:
        """Feed one window's reading; returns the new limit."""
        if not reading.busy:
            self.last_pressure = None
            return self.aimd.step(None, reading.own)
        self._learn_baseline(reading)
        pressure = self.pressure(reading)
        self.last_pressure = pressure
        if pressure is None and self.bounds.ratio is not None and not self._has_baseline(reading):
            # A ratio needs the unloaded latency: stay at the floor until a
            # window with only that many lines of ours has measured it.
            self.aimd.limit = self.aimd.lo
            return self.aimd.limit
        if pressure is None:
            return self.aimd.limit  # traffic, but no latency sample yet: hold
        return self.aimd.step(pressure, reading.own)

    def pressure(self, reading: Reading) -> float | None:
        """Worst measured / bound over the stated bounds; None if none applies."""
        b = self.bounds
        worst: float | None = None

        def worse(value: float | None) -> None:
            nonlocal worst
            if value is not None:
                worst = value if worst is None else max(worst, value)

        gateway = reading.gw_latency_p99 is not None
        if gateway:
            worse(_over(reading.gw_ttft_p99, _seconds(b.ttft_p99_ms)))
            worse(_over(reading.gw_tpot_p99, _seconds(b.tpot_p99_ms)))
        else:
            worse(_over(reading.ttft_p99, _seconds(b.ttft_p99_ms)))
            worse(_over(reading.tpot, _seconds(b.tpot_p99_ms)))
        if b.ratio is None:
            return worst
        # Pressure on the allowed excess, not on the whole latency: at 1.1x a
        # bound-relative headroom of 85% would sit inside the unloaded latency
        # itself and never let a line in.
        if gateway and self.base_latency:
            # Already the p99 request: no tail weight.
            loaded = reading.gw_latency_p99 or 0.0
            worse(max(0.0, loaded / self.base_latency - 1.0) / (b.ratio - 1.0))
        elif not gateway and self.base_tpot is not None:
            base_ttft = self.base_ttft or 0.0
            base_tpot = self.base_tpot
            ttft = reading.ttft_p99 if reading.ttft_p99 is not None else base_ttft
            tpot = reading.tpot if reading.tpot is not None else base_tpot
            # The latency users wait for: first token, then ratio_tokens more.
            unloaded = base_ttft + b.ratio_tokens * base_tpot
            loaded = ttft + b.ratio_tokens * tpot
            if unloaded > 0:
                worse(TAIL_EXCESS * max(0.0, loaded / unloaded - 1.0) / (b.ratio - 1.0))
        return worst

    def _has_baseline(self, reading: Reading) -> bool:
        if reading.gw_latency_p99 is not None:
            return self.base_latency is not None
        return self.base_tpot is not None

    def _learn_baseline(self, reading: Reading) -> None:
        """Quiet windows (no more of our lines than the floor) refresh the
        unloaded latency, unless the operator stated it."""
        if reading.own > self.aimd.lo:
            return
        if self.bounds.baseline_tpot_ms is None and reading.tpot is not None:
            self.base_tpot = _ewma(self.base_tpot, reading.tpot)
        if self.bounds.baseline_ttft_ms is None and reading.ttft_p99 is not None:
            self.base_ttft = _ewma(self.base_ttft, reading.ttft_p99)
        b = self.bounds
        stated = getattr(b, "baseline_latency_ms", None) is not None or (
            b.baseline_ttft_ms is not None and b.baseline_tpot_ms is not None
        )
        if not stated and reading.gw_latency_p99 is not None:
            self.base_latency = _ewma(self.base_latency, reading.gw_latency_p99)


class ServerView(Protocol):
    """A replica as the pacer reads it (backends.replica.Replica)."""

    root: str
    metrics_at: float
    outstanding_at_scrape: int

    def fresh_metrics(self, now: float, stale_after: float) -> object | None: ...


class PoolWindow:
    """Windowed readings from the replicas' scraped metrics.

    Keeps each server's scrapes for ``window_s`` and answers a reading when a
    scrape newer than the last one it used has arrived.
    """

    def __init__(self, window_s: float, stale_after: float) -> None:
        self.window_s = window_s
        self.stale_after = stale_after
        self._history: dict[str, deque[tuple[float, Histogram | None, Histogram | None]]] = {}
        self._busy: dict[str, deque[tuple[float, bool]]] = {}
        self._last_seen = 0.0

    def read(self, servers: list[ServerView], now: float) -> Reading | None:
        newest = 0.0
        ttft = Histogram()
        tpot = Histogram()
        busy = False
        own = 0
        seen: set[str] = set()
        for server in servers:
            metrics = server.fresh_metrics(now, self.stale_after)
            if metrics is None or server.root in seen:
                continue
            seen.add(server.root)
            newest = max(newest, server.metrics_at)
            at = server.metrics_at
            running = getattr(metrics, "running", 0.0) + getattr(metrics, "waiting", 0.0)
            mine = sum(s.outstanding_at_scrape for s in servers if s.root == server.root)
            own += mine
            history = self._history.setdefault(server.root, deque())
            flags = self._busy.setdefault(server.root, deque())
            if not history or history[-1][0] != at:
                history.append((at, getattr(metrics, "ttft", None), getattr(metrics, "itl", None)))
                flags.append((at, running - mine >= 1))
            while len(history) > 1 and history[1][0] <= at - self.window_s:
                history.popleft()
            while flags and flags[0][0] < at - self.window_s:
                flags.popleft()
            busy = busy or any(flag for _, flag in flags)
            first, last = history[0], history[-1]
            if len(history) > 1:
                ttft = _add(ttft, last[1], first[1])
                tpot = _add(tpot, last[2], first[2])
        if newest <= self._last_seen:
            return None
        self._last_seen = newest
        return Reading(ttft.quantile(0.99), tpot.mean, busy, own)


class PoolLike(Protocol):
    settings: object

    def replicas(self, model: str | None = None) -> list: ...  # type: ignore[type-arg]


class ModelPacer:
    """A pacer bound to a pool and model: the BatchRunner's one call."""

    def __init__(
        self, pool: PoolLike, model: str, bounds: SloBounds, feed: GatewayFeed | None = None
    ) -> None:
        self.pool = pool
        self.model = model
        self.bounds = bounds
        self.pacer = SloPacer(bounds)
        stale = float(getattr(pool.settings, "metrics_stale_seconds", 5.0))
        self.window = PoolWindow(bounds.window_s, stale)
        self.feed = feed
        # Only streams the gateway received after this saw the current limit.
        self._since = float("-inf")

    def limit(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        reading = self.window.read(self.pool.replicas(self.model), now)
        if reading is not None:
            if self.feed is not None and self.feed.healthy:
                self._add_streams(reading, now)
            if reading.pending and not self._far_inside(reading):
                return self.pacer.limit  # wait for evidence under this limit
            if self._climb_unproven(reading):
                return self.pacer.limit  # inside the bound, but not surely yet
            before = self.pacer.limit
            after = self.pacer.observe(reading)
            if after != before or reading.own > after:
                # A new limit, or lines above it still running: the load
                # the next decision judges begins now.
                self._since = now
            if after != before:
                pressure = self.pacer.last_pressure
                log.info(
                    "slo %s: limit %d -> %d (pressure %s, from %s)",
                    self.model,
                    before,
                    after,
                    "none" if pressure is None else f"{pressure:.2f}",
                    "gateway" if reading.gw_latency_p99 is not None else "vllm",
                )
        return self.pacer.limit

    def _far_inside(self, reading: Reading) -> bool:
        """Far below the bound even on streams from before the last change
        (which saw fewer lines if it was a climb): climbing on them is safe,
        and waiting for fresh ones at every step would take the loop tens of
        seconds to reach its level."""
        pressure = self.pacer.pressure(reading)
        return pressure is not None and pressure < FAR_INSIDE * self.pacer.aimd.headroom

    def _climb_unproven(self, reading: Reading) -> bool:
        """A climb on fewer streams than its margin needs: ``MIN_EVIDENCE``
        divided by the share of headroom left, up to ``CLIMB_EVIDENCE``
        (far inside, the usual quick climb)."""
        if reading.evidence is None or reading.pending:
            return False
        pressure = self.pacer.pressure(reading)
        headroom = self.pacer.aimd.headroom
        if pressure is None or pressure >= headroom or pressure < FAR_INSIDE * headroom:
            return False  # a cut, a hold, or far inside
        needed = min(CLIMB_EVIDENCE, math.ceil(MIN_EVIDENCE / (1.0 - pressure / headroom)))
        return reading.evidence < needed

    def _add_streams(self, reading: Reading, now: float) -> None:
        """The gateway's streams of the window, as p99s over requests."""
        assert self.feed is not None
        window = self.bounds.window_s
        if not self.feed.active(self.model, now, window):
            return  # no interactive stream lately: vLLM's view decides
        reading.busy = True
        streams = self.feed.recent(self.model, now, window, MIN_STREAMS, self._since)
        # Everything received under this limit (the feed keeps a minute): more
        # than one window holds, for the climb's evidence and for a p99 that is
        # one (of 40 streams, the nearest-rank p99 is their maximum, about a
        # p97.5: a limit whose p99 sits just over the bound would read inside).
        under = self.feed.since(self.model, self._since, max(LONG_STREAMS, CLIMB_EVIDENCE))
        reading.evidence = len(under)
        under = under[len(under) - LONG_STREAMS :] if LONG_STREAMS > 0 else []
        if len(streams) < MIN_EVIDENCE:
            # Too few under this limit: the window as a whole, which only
            # a clear "far inside" may act on (see limit()).
            reading.pending = True
            streams = self.feed.recent(self.model, now, window, MIN_STREAMS)
            under = []
        k = self.bounds.ratio_tokens
        # The worse of the window (a sudden rise) and the limit's whole record
        # (a steady small excess the window's few streams do not resolve).
        reading.gw_ttft_p99 = _p99_worst([s.ttft_s for s in x] for x in (streams, under))
        reading.gw_tpot_p99 = _p99_worst(
            [s.tpot_s for s in x if s.tpot_s is not None] for x in (streams, under)
        )
        reading.gw_latency_p99 = _p99_worst(
            [s.ttft_s + k * (s.tpot_s or 0.0) for s in x] for x in (streams, under)
        )


# One pacer per (pool, model) per process: a batch runs as a chain of short
# tasks, and the loop's state must outlive each of them.
_PACERS: weakref.WeakKeyDictionary[object, dict[str, ModelPacer]] = weakref.WeakKeyDictionary()


def pacer_for(
    pool: PoolLike, model: str, bounds: SloBounds, feed: GatewayFeed | None = None
) -> ModelPacer:
    pacers = _PACERS.setdefault(pool, {})
    pacer = pacers.get(model)
    if pacer is None or pacer.bounds is not bounds:
        pacer = pacers[model] = ModelPacer(pool, model, bounds, feed)
    return pacer


def _p99(values: list[float]) -> float | None:
    """Nearest-rank 99th percentile (of 40 values: the largest)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def _p99_worst(samples: Iterable[list[float]]) -> float | None:
    """The largest p99 of several samples (those with values)."""
    p99s = [p for p in map(_p99, samples) if p is not None]
    return max(p99s) if p99s else None


def _add(total: Histogram, newer: Histogram | None, older: Histogram | None) -> Histogram:
    if newer is None:
        return total
    return total.plus(newer.minus(older))


def _over(measured: float | None, bound: float | None) -> float | None:
    if measured is None or bound is None or bound <= 0:
        return None
    return measured / bound


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


def _ewma(old: float | None, new: float) -> float:
    if old is None:
        return new
    alpha = BASELINE_DOWN if new < old else BASELINE_UP
    return (1 - alpha) * old + alpha * new
