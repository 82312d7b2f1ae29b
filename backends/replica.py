"""Runtime state of one upstream server serving one model."""

from __future__ import annotations

import hashlib
import time

from backends.breaker import BreakerState, CircuitBreaker
from backends.config import ReplicaConfig
from backends.vllm_metrics import VllmMetrics


def root_url(url: str) -> str:
    """The server root of an OpenAI base URL: where vLLM serves /health and /metrics."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class Replica:
    """A (model, server) pair with the live state routing reads on every request.

    Attributes are plain slots, read and written from the event loop only, so no
    locking is needed and routing costs attribute loads, not method calls.
    """

    __slots__ = (
        "model",
        "config",
        "url",
        "root",
        "upstream_model",
        "vllm",
        "weight",
        "headers",
        "breaker",
        "discovered",
        "seed",
        "healthy",
        "health_checked_at",
        "outstanding",
        "metrics",
        "metrics_at",
        "outstanding_at_scrape",
        "requests_total",
        "failures_total",
    )

    def __init__(
        self,
        model: str,
        config: ReplicaConfig,
        breaker: CircuitBreaker,
        *,
        discovered: bool = False,
    ) -> None:
        self.model = model
        self.config = config
        self.url = config.url.rstrip("/")
        self.root = root_url(self.url)
        self.upstream_model = config.upstream_model or model
        self.vllm = config.vllm
        self.weight = config.weight if config.weight > 0 else 1.0
        # Built once: every request to this replica sends the same headers.
        self.headers: dict[str, str] = {"content-type": "application/json"}
        if config.api_key:
            self.headers["authorization"] = f"Bearer {config.api_key}"
        self.breaker = breaker
        self.discovered = discovered
        # Stable per-replica seed for rendezvous hashing (same across gateway
        # processes, so they agree on a prefix's home replica).
        self.seed = int.from_bytes(hashlib.blake2b(self.url.encode(), digest_size=8).digest())
        # Optimistic until the first health check says otherwise, so a gateway
        # that starts before its first check can still route.
        self.healthy = True
        self.health_checked_at = 0.0
        self.outstanding = 0
        self.metrics: VllmMetrics | None = None
        self.metrics_at = 0.0
        self.outstanding_at_scrape = 0
        self.requests_total = 0
        self.failures_total = 0

    @property
    def id(self) -> str:
        return self.url

    def ready(self) -> bool:
        return self.healthy and self.breaker.available()

    def fresh_metrics(self, now: float, stale_after: float) -> VllmMetrics | None:
        metrics = self.metrics
        if metrics is None or now - self.metrics_at > stale_after:
            return None
        return metrics

    def set_metrics(self, metrics: VllmMetrics, now: float) -> None:
        self.metrics = metrics
        self.metrics_at = now
        self.outstanding_at_scrape = self.outstanding

    def snapshot(self, now: float | None = None) -> dict[str, object]:
        now = time.monotonic() if now is None else now
        metrics = self.metrics
        return {
            "model": self.model,
            "url": self.url,
            "upstream_model": self.upstream_model,
            "vllm": self.vllm,
            "discovered": self.discovered,
            "healthy": self.healthy,
            "breaker": str(self.breaker.state),
            "ready": self.healthy and self.breaker.state is not BreakerState.OPEN,
            "outstanding": self.outstanding,
            "running": metrics.running if metrics else None,
            "waiting": metrics.waiting if metrics else None,
            "kv_usage": metrics.kv_usage if metrics else None,
            "prefix_cache_hit_rate": metrics.prefix_cache_hit_rate if metrics else None,
            "metrics_age": (now - self.metrics_at) if metrics else None,
            "requests_total": self.requests_total,
            "failures_total": self.failures_total,
        }
