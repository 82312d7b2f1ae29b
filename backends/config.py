"""Plain configuration objects for the backend layer (no gateway imports)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ReplicaConfig(BaseModel):
    """One OpenAI-compatible server that serves a model."""

    url: str  # base URL including /v1, e.g. http://127.0.0.1:8000/v1
    api_key: str | None = None
    # Name the upstream knows the model by, when it differs from the public name.
    upstream_model: str | None = None
    weight: float = 1.0
    # Whether the server runs vLLM (its /metrics drive routing and backfill).
    vllm: bool = True
    # Send vLLM's `priority` request field (tenant tier; batch and async work
    # run at batch priority). Set false for vLLM servers started without
    # `--scheduling-policy priority` if they reject non-zero priorities.
    priority: bool = True


class ModelConfig(BaseModel):
    """A public model name, its aliases and the replicas that serve it."""

    name: str
    aliases: list[str] = Field(default_factory=list)
    replicas: list[ReplicaConfig] = Field(default_factory=list)
    # Hosted fallback/overflow through litellm, e.g. "openai/gpt-4o-mini".
    hosted: str | None = None
    hosted_api_key: str | None = None
    # Base URL for the hosted provider (litellm's api_base), e.g. another
    # OpenAI-compatible server reached as "openai/<name>".
    hosted_api_base: str | None = None
    # Send to `hosted` when every replica is down or saturated.
    overflow: bool = False
    # Held-request bound (seconds) when no replica is ready (scale-to-zero).
    hold_seconds: float = 0.0
    # Overflow when the least loaded replica has more than this many requests
    # waiting in vLLM's queue; None uses BackendSettings.overflow_waiting.
    overflow_waiting: float | None = None


class BackendSettings(BaseModel):
    models: list[ModelConfig] = Field(default_factory=list)
    # Base URLs whose /v1/models are read to add replicas automatically.
    discover: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])
    # Models found by discovery hold a request this long for a replica that is
    # (re)starting or was marked down by a probe that timed out on a busy host,
    # instead of failing at once with 503.
    discovered_hold_seconds: float = 10.0
    connect_timeout: float = 5.0
    read_timeout: float = 300.0
    # Retries on another replica: after an error status (5xx, 429), or when the
    # connection could not be made (refused, connect timeout). Never after a
    # failure that may follow a written request (reset, closed, timed out,
    # stream broken): the replica may be generating, and a second one would
    # run the same request twice.
    max_retries: int = 2
    health_interval: float = 5.0
    breaker_failures: int = 3
    breaker_reset_seconds: float = 15.0
    metrics_interval: float = 1.0
    # Metrics older than this are ignored and routing falls back to least-outstanding.
    metrics_stale_seconds: float = 5.0
    prefix_affinity_chars: int = 256
    # A prefix stays on its affinity replica unless that replica's load exceeds
    # best_load * affinity_load_ratio + affinity_load_slack.
    affinity_load_ratio: float = 1.5
    affinity_load_slack: float = 4.0
    # vLLM queue length above which a model with overflow=True goes hosted.
    overflow_waiting: float = 32.0
    # Connection pool size of the shared client (streams hold a connection each).
    max_connections: int = 4096
    # What carries requests to replicas: aiohttp's connection pool, used
    # directly (the default: about 3x httpcore's requests/s on a small CPU,
    # where httpcore's per-request pool scan dominated the profile), or httpx
    # on httpcore. Probes, metrics and discovery use httpx either way. Both
    # engines retry on another replica only when the connection was never
    # made (refused, connect timeout); see backends/upstream.py.
    # `native` (backends/native_http.py) is the project's own HTTP/1.1 client
    # for exactly this kind of request, the fastest of the three, opt-in.
    http_engine: Literal["aiohttp", "httpcore", "native"] = "aiohttp"
    # Idle connections are dropped after this long: below the 5 s keep-alive of
    # uvicorn-based servers (vLLM's included), so the client never reuses a
    # connection at the moment the server closes it.
    keepalive_expiry: float = 4.0
    # How often a held request's model is re-probed while it waits for a replica.
    hold_poll_interval: float = 0.5
    discover_api_key: str | None = None
