"""Prometheus metrics and structured JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from gateway.db import UsageRecord

log = logging.getLogger("bearpaw.metrics")

# A queue-depth source returns one number, or one number per kind of work.
QueueDepth = Callable[[], "float | dict[str, float]"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    """The gateway's Prometheus registry.

    ``pool`` adds per-replica health and load read at scrape time;
    ``queue_depth`` (or ``set_queue_depth`` later) adds the async/batch
    backlog; ``cache`` (anything with ``stats()``) adds the semantic cache's
    own counters. Scrape-time sources must be cheap and non-blocking: they run
    on the event loop inside /metrics."""

    def __init__(
        self, pool: Any = None, queue_depth: QueueDepth | None = None, cache: Any = None
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "bearpaw_requests_total",
            "Requests by endpoint, model, status and cache outcome",
            ["endpoint", "model", "status", "cache", "source"],
            registry=r,
        )
        self.latency = Histogram(
            "bearpaw_request_latency_seconds",
            "End-to-end request latency",
            ["endpoint", "cache"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "bearpaw_tokens_total", "Tokens by model and kind", ["model", "kind"], registry=r
        )
        self.cost = Counter("bearpaw_cost_usd_total", "Cost billed", ["model"], registry=r)
        self.avoided = Counter(
            "bearpaw_cost_avoided_usd_total", "Cost avoided by the cache", ["model"], registry=r
        )
        self.http = Histogram(
            "bearpaw_http_request_duration_seconds",
            "HTTP handling time by path group",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_outcomes = Counter(
            "bearpaw_cache_requests_total",
            "Cacheable-endpoint requests by cache outcome (hit, miss, bypass)",
            ["model", "outcome"],
            registry=r,
        )
        self.queue_depth: QueueDepth | None = queue_depth
        if pool is not None:
            r.register(_PoolCollector(pool))
        r.register(_QueueCollector(self))
        if cache is not None:
            r.register(_CacheCollector(cache))

    def set_queue_depth(self, source: QueueDepth | None) -> None:
        """Installs the async-queue depth source (the workers' side provides it)."""
        self.queue_depth = source

    def set_dependencies(self, dependencies: Any, spool: Any = None, outbox: Any = None) -> None:
        """Exports each dependency's state, the usage spool and the task outbox."""
        self.registry.register(_DependencyCollector(dependencies, spool, outbox))

    def observe(self, rec: UsageRecord) -> None:
        self.requests.labels(
            rec.endpoint, rec.model, str(rec.status_code), rec.cache, rec.source
        ).inc()
        if rec.endpoint != "embeddings":
            self.cache_outcomes.labels(rec.model, rec.cache).inc()
        self.latency.labels(rec.endpoint, rec.cache).observe(rec.latency_ms / 1000.0)
        if rec.cache == "hit":
            self.tokens.labels(rec.model, "cached").inc(rec.cached_tokens)
        else:
            self.tokens.labels(rec.model, "prompt").inc(rec.prompt_tokens)
            self.tokens.labels(rec.model, "completion").inc(rec.completion_tokens)
        if rec.cost_usd:
            self.cost.labels(rec.model).inc(rec.cost_usd)
        if rec.cost_avoided_usd:
            self.avoided.labels(rec.model).inc(rec.cost_avoided_usd)


class _PoolCollector:
    """Per-replica health and load, read from the pool at scrape time: the
    signals an autoscaler needs."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["model", "replica"])

        healthy = gauge("bearpaw_backend_healthy", "1 if the replica is healthy")
        outstanding = gauge("bearpaw_backend_outstanding_requests", "In flight from this gateway")
        running = gauge("bearpaw_backend_requests_running", "vLLM requests running")
        waiting = gauge("bearpaw_backend_requests_waiting", "vLLM requests waiting")
        kv = gauge("bearpaw_backend_kv_cache_usage", "vLLM KV cache usage, 0-1")
        per_model: dict[str, float] = {}
        for snap in self.pool.snapshot():
            lv = [str(snap.get("model")), str(snap.get("url"))]
            healthy.add_metric(lv, 1.0 if snap.get("healthy") else 0.0)
            outstanding.add_metric(lv, float(snap.get("outstanding") or 0))
            running.add_metric(lv, float(snap.get("running") or 0))
            waiting.add_metric(lv, float(snap.get("waiting") or 0))
            kv.add_metric(lv, float(snap.get("kv_usage") or 0))
            per_model[str(snap.get("model"))] = per_model.get(str(snap.get("model")), 0.0) + float(
                (snap.get("waiting") or 0) + (snap.get("outstanding") or 0)
            )
        depth = GaugeMetricFamily(
            "bearpaw_model_queue_depth", "Requests waiting or in flight per model", labels=["model"]
        )
        for model, value in per_model.items():
            depth.add_metric([model], value)
        yield from (healthy, outstanding, running, waiting, kv, depth)
        held_by_model = getattr(self.pool, "held", None)
        if held_by_model is not None:
            held = GaugeMetricFamily(
                "bearpaw_requests_held",
                "Requests held until a replica of their model is ready (scale-to-zero)",
                labels=["model"],
            )
            for model, value in held_by_model().items():
                held.add_metric([model], float(value))
            yield held


class _QueueCollector:
    """The async backlog (jobs and batch lines not yet run), from whatever
    source was installed; absent until one is."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        source = self.metrics.queue_depth
        if source is None:
            return
        try:
            value = source()
        except Exception:  # a broken source must not break the whole scrape
            log.exception("queue depth source failed")
            return
        family = GaugeMetricFamily(
            "bearpaw_async_queue_depth", "Async jobs and batch lines not yet run", labels=["kind"]
        )
        items = value.items() if isinstance(value, dict) else [("all", value)]
        for kind, n in items:
            family.add_metric([str(kind)], float(n))
        yield family


class _DependencyCollector:
    """Up (1), degraded (0.5) or down (0) per dependency, and what waits for
    one: usage records in the spool (and the age of the oldest), task
    messages kept for the broker. An alert on the age catches a spool that
    does not drain."""

    def __init__(self, dependencies: Any, spool: Any, outbox: Any) -> None:
        self.dependencies = dependencies
        self.spool = spool
        self.outbox = outbox

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from gateway.resilience.dependencies import GAUGE

        up = GaugeMetricFamily(
            "bearpaw_dependency_up",
            "Dependency state: 1 up, 0.5 degraded, 0 down",
            labels=["dependency"],
        )
        for name, status in self.dependencies.snapshot().items():
            up.add_metric([name], GAUGE[status["state"]])
        yield up
        if self.spool is not None:
            yield GaugeMetricFamily(
                "bearpaw_usage_spool_records",
                "Usage records waiting in the local spool for the database",
                value=float(self.spool.depth),
            )
            yield GaugeMetricFamily(
                "bearpaw_usage_spool_oldest_age_seconds",
                "Age of the oldest spooled usage record (0 when the spool is empty)",
                value=float(self.spool.oldest_age_s() or 0.0),
            )
        if self.outbox is not None:
            yield GaugeMetricFamily(
                "bearpaw_task_outbox_messages",
                "Async job and batch messages waiting for the broker",
                value=float(self.outbox.depth),
            )


class _CacheCollector:
    """The semantic cache's own counters (layers, verifier, evictions), which
    the per-request outcome counter cannot see."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.cache.stats()
        entries = GaugeMetricFamily("bearpaw_cache_entries", "Entries in the semantic cache")
        entries.add_metric([], float(stats.get("entries", 0)))
        yield entries
        events = CounterMetricFamily(
            "bearpaw_cache_events", "Semantic cache events by kind", labels=["event"]
        )
        for name in (
            "hits_exact",
            "hits_semantic",
            "misses",
            "stores",
            "verifier_rejections",
            "evictions",
            "expirations",
        ):
            if name in stats:
                events.add_metric([name], float(stats[name]))
        yield events
        bound_stats = getattr(self.cache, "bound_stats", None)
        if bound_stats is not None:
            yield from _bound_families(bound_stats())


def _bound_families(rows: list[dict]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The wrong-hit bound per tenant and model (docs/cache-bound.md)."""
    labels = ["tenant", "model"]

    def counter(name: str, doc: str, field: str) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=labels)
        for row in rows:
            family.add_metric([row["tenant"], row["model"]], float(row[field]))
        return family

    def gauge(name: str, doc: str, field: str) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=labels)
        for row in rows:
            if row.get(field) is not None:
                family.add_metric([row["tenant"], row["model"]], float(row[field]))
        return family

    yield counter("bearpaw_cache_bound_hits", "Semantic hits served under the bound", "served")
    yield counter(
        "bearpaw_cache_bound_verified_hits",
        "Would-be hits answered by the backend and compared (explorations)",
        "explored_verdicts",
    )
    yield counter(
        "bearpaw_cache_bound_verified_wrong",
        "Verified would-be hits whose cached answer did not match",
        "explored_wrong",
    )
    yield gauge(
        "bearpaw_cache_bound_verdicts", "Verdicts the bound rests on (all processes)", "verdicts"
    )
    yield gauge("bearpaw_cache_bound_max_error", "δ of the latest lookup", "max_error")
    yield gauge("bearpaw_cache_bound_threshold", "Score threshold in force at that δ", "threshold")
    yield gauge(
        "bearpaw_cache_wrong_hit_rate",
        "Measured wrong rate among verdicts above the threshold",
        "region_wrong_rate",
    )
    yield gauge(
        "bearpaw_cache_wrong_hit_rate_upper",
        "95 % upper bound on the wrong-hit rate at the threshold",
        "upper",
    )
    yield gauge(
        "bearpaw_cache_verified_wrong_rate_low",
        "95 % interval of the verified hits' wrong rate: low end",
        "explored_wrong_low",
    )
    yield gauge(
        "bearpaw_cache_verified_wrong_rate_high",
        "95 % interval of the verified hits' wrong rate: high end",
        "explored_wrong_high",
    )


class QueueDepthPoller:
    """Counts the async backlog in the database every few seconds, off the
    event loop, so /metrics reads a number instead of running a query."""

    def __init__(self, engine: Engine, interval: float = 5.0) -> None:
        self.engine = engine
        self.interval = interval
        self.value: dict[str, float] = {"job": 0.0, "batch_line": 0.0}
        self._task: asyncio.Task[None] | None = None

    def __call__(self) -> dict[str, float]:
        return self.value

    def count(self) -> dict[str, float]:
        # Imported here: the tables belong to the jobs/batches side.
        from gateway.db.batches import BatchLine
        from gateway.db.jobs import Job

        with Session(self.engine) as s:
            jobs = s.exec(
                select(func.count())
                .select_from(Job)
                .where(col(Job.status).in_(("queued", "in_progress")))
            ).one()
            lines = s.exec(
                select(func.count())
                .select_from(BatchLine)
                .where(col(BatchLine.status) == "pending")
            ).one()
        return {"job": float(jobs), "batch_line": float(lines)}

    async def refresh(self) -> None:
        self.value = await asyncio.to_thread(self.count)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="queue-depth")

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # keep polling; the gauge keeps its last value
                # One line, no traceback: while the database is down this
                # repeats every poll, and /ready already says why.
                log.warning("queue depth poll failed: %s", type(exc).__name__)
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "method", "path", "status", "duration_ms", "tenant"):
            value = getattr(record, key, None)
            if value is not None:
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def configure_logging(level: str = "info", as_json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger("bearpaw")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
