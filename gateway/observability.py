"""Prometheus metrics and structured JSON logs."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from gateway.db import UsageRecord

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self, pool: Any = None, queue_depth: Any = None) -> None:
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
        if pool is not None:
            r.register(_PoolCollector(pool, queue_depth))

    def observe(self, rec: UsageRecord) -> None:
        self.requests.labels(
            rec.endpoint, rec.model, str(rec.status_code), rec.cache, rec.source
        ).inc()
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

    def __init__(self, pool: Any, queue_depth: Any) -> None:
        self.pool = pool
        self.queue_depth = queue_depth

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
        if self.queue_depth is not None:
            jobs = GaugeMetricFamily(
                "bearpaw_async_queue_depth", "Async jobs and batch lines not yet run"
            )
            jobs.add_metric([], float(self.queue_depth()))
            yield jobs


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
