"""The replica pool: every upstream the gateway may send a model's requests to.

It owns the shared HTTP clients (httpx for probes, the configured engine of
backends/upstream.py or backends/native_http.py for requests), keeps replica
health and vLLM load fresh in background loops, and turns a request into at
most ``max_retries + 1`` attempts on different replicas, falling back to a
hosted provider when the model's configuration allows it.

A failed attempt is retried elsewhere only when the replica said it did not do
the work (an error status), never got the request (the connection could not
be made), or is gone (it refuses connections right after dropping one). A
reset, a close, a timeout or a broken stream after the request was written is
otherwise answered to the client (502/504): the replica may be generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from backends.breaker import CircuitBreaker
from backends.capabilities import HOSTED, fetch_capabilities
from backends.config import BackendSettings, ModelConfig, ReplicaConfig
from backends.discovery import DiscoveredModel, fetch_models, replica_for
from backends.errors import (
    BackendError,
    ModelNotFound,
    NoReplicaAvailable,
    UpstreamError,
    UpstreamTimeout,
    error_from_upstream,
)
from backends.hosted import HOSTED_PREFIX, HostedProvider, Target, choose_target
from backends.native_http import NativeEngine
from backends.replica import Replica, root_url
from backends.routing import affinity_hash, pick_replica
from backends.upstream import (
    AiohttpEngine,
    HttpxEngine,
    PoolExhausted,
    RequestBroken,
    RequestNotSent,
    SseReader,
    UpstreamResponse,
    UpstreamStream,
)
from backends.vllm_metrics import parse_vllm_metrics

__all__ = ["ReplicaPool", "UpstreamResponse", "UpstreamStream"]

log = logging.getLogger(__name__)

# Upstream statuses that say "this replica could not do it" rather than "the
# request is wrong": worth another replica while no byte reached the client.
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
# After retries run out these still mean something to the client; others become 502.
_KEPT_STATUSES = frozenset({503, 504})


class _Retryable(Exception):
    """An attempt failed in a way another replica may not; carries what to raise if none can."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(slots=True)
class _ModelEntry:
    config: ModelConfig
    replicas: list[Replica] = field(default_factory=list)
    # Replaced (and the old one set) on every readiness change, so a held
    # request that grabbed the current event before checking cannot miss one.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    holders: int = 0
    hold_probe: asyncio.Task[None] | None = None

    def any_ready(self) -> bool:
        return any(replica.ready() for replica in self.replicas)

    def notify(self) -> None:
        event, self.changed = self.changed, asyncio.Event()
        event.set()


class ReplicaPool:
    def __init__(self, settings: BackendSettings, client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self._timeout = httpx.Timeout(
            settings.read_timeout,
            connect=settings.connect_timeout,
        )
        # Health, metrics and discovery must answer quickly or count as down.
        self._probe_timeout = httpx.Timeout(
            max(settings.connect_timeout, min(settings.health_interval, 10.0)),
            connect=settings.connect_timeout,
        )
        self._owns_client = client is None
        # Probes, metrics and discovery always go through httpx; requests go
        # through the engine (a given client, e.g. a test's mock, carries both).
        self._client = client if client is not None else self._make_client()
        self._engine: HttpxEngine | AiohttpEngine | NativeEngine
        if client is None and settings.http_engine == "aiohttp":
            self._engine = AiohttpEngine(settings.max_connections, settings.keepalive_expiry)
        elif client is None and settings.http_engine == "native":
            self._engine = NativeEngine(settings.max_connections, settings.keepalive_expiry)
        else:
            self._engine = HttpxEngine(self._client)
        self.hosted = HostedProvider()
        self._entries: dict[str, _ModelEntry] = {}
        self._names: dict[str, str] = {}  # public name or alias -> canonical name
        # Server root -> what its /openapi.json lists (None: no readable document).
        # Learnt once per server; forgotten when it goes down, since what comes
        # back at that address may serve another model.
        self._capabilities: dict[str, frozenset[str] | None] = {}
        self._pending_discovery: list[str] = list(dict.fromkeys(settings.discover))
        self._discovery_lock = asyncio.Lock()
        self._last_discovery = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._rotation = 0
        for model in settings.models:
            entry = self._add_model(model)
            for replica in model.replicas:
                self._add_replica(entry, replica, discovered=False)

    def _make_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(
            max_connections=self.settings.max_connections,
            max_keepalive_connections=self.settings.max_connections,
            keepalive_expiry=self.settings.keepalive_expiry,
        )
        return httpx.AsyncClient(timeout=self._timeout, limits=limits, trust_env=False)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        # One bounded round first so the gateway starts with discovered models
        # and known health; whatever does not answer in time is retried later.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.connect_timeout + 1.0):
                await self._discover_pending()
                await self.check_health()
                await self.scrape_metrics()
        self._tasks = [
            asyncio.create_task(self._every(self.settings.health_interval, self._health_round)),
            asyncio.create_task(self._every(self.settings.metrics_interval, self.scrape_metrics)),
        ]

    async def close(self) -> None:
        tasks = self._tasks + [
            entry.hold_probe for entry in self._entries.values() if entry.hold_probe is not None
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        if self._owns_client:
            if not isinstance(self._engine, HttpxEngine):
                await self._engine.aclose()
            await self._client.aclose()
        self._started = False

    async def __aenter__(self) -> ReplicaPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @staticmethod
    async def _every(interval: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except Exception:  # a background loop must survive any one bad round
                log.exception("backend background job failed")

    # ----------------------------------------------------------------- registry

    def _add_model(self, config: ModelConfig) -> _ModelEntry:
        entry = _ModelEntry(config=config)
        self._entries[config.name] = entry
        self._names[config.name] = config.name
        for alias in config.aliases:
            self._names.setdefault(alias, config.name)
        return entry

    def _add_replica(self, entry: _ModelEntry, config: ReplicaConfig, *, discovered: bool) -> None:
        breaker = CircuitBreaker(
            self.settings.breaker_failures, self.settings.breaker_reset_seconds
        )
        entry.replicas.append(Replica(entry.config.name, config, breaker, discovered=discovered))
        entry.notify()

    def add_replica(self, model: str, config: ReplicaConfig) -> None:
        """Add a replica at run time (e.g. one the launcher just started)."""
        canonical = self._names.get(model)
        entry = self._entries[canonical] if canonical else self._add_model(ModelConfig(name=model))
        if not any(replica.url == config.url.rstrip("/") for replica in entry.replicas):
            self._add_replica(entry, config, discovered=False)

    def model_names(self) -> list[str]:
        return [
            name
            for name, canonical in self._names.items()
            if self._entries[canonical].replicas or self._entries[canonical].config.hosted
        ]

    def resolve(self, model: str) -> str | None:
        return self._names.get(model)

    async def resolve_or_discover(self, model: str) -> str | None:
        """Like `resolve`, but an unknown name first triggers one more round of
        discovery while some discovery URL has not answered yet, so requests
        that arrive while the backends are still starting are not refused as
        unknown models."""
        name = self._names.get(model)
        if name is not None or not self._pending_discovery:
            return name
        await self.ensure_discovered()
        return self._names.get(model)

    async def ensure_discovered(self) -> None:
        """One discovery round if some URL has not answered yet; rounds are
        shared by concurrent callers and spaced half a second apart."""
        if not self._pending_discovery:
            return
        async with self._discovery_lock:
            if self._pending_discovery and time.monotonic() - self._last_discovery >= 0.5:
                await self._discover_pending()

    def replicas(self, model: str | None = None) -> list[Replica]:
        if model is None:
            return [replica for entry in self._entries.values() for replica in entry.replicas]
        canonical = self._names.get(model)
        return list(self._entries[canonical].replicas) if canonical else []

    def capabilities(self, model: str) -> set[str] | None:
        """What `model` can serve (names of backends.capabilities.ROUTES), or
        None while any of its replicas' servers has not told (not yet asked, or
        no readable OpenAPI document): unknown means refuse nothing."""
        canonical = self._names.get(model)
        if canonical is None:
            return None
        entry = self._entries[canonical]
        served: set[str] = set(HOSTED) if entry.config.hosted else set()
        if not entry.replicas and not served:
            return None
        for replica in entry.replicas:
            known = self._capabilities.get(replica.root)
            if known is None:
                return None
            served |= known
        return served

    def _entry(self, model: str) -> _ModelEntry:
        canonical = self._names.get(model)
        if canonical is None:
            raise ModelNotFound(model)
        return self._entries[canonical]

    # ---------------------------------------------------------------- discovery

    async def _discover_pending(self) -> None:
        if not self._pending_discovery:
            return
        self._last_discovery = time.monotonic()
        urls = list(self._pending_discovery)
        key = self.settings.discover_api_key
        # Capabilities are read alongside, so no model is listed without them.
        results, _ = await asyncio.gather(
            asyncio.gather(
                *(
                    fetch_models(self._client, url, api_key=key, timeout=self._probe_timeout)
                    for url in urls
                ),
                return_exceptions=True,
            ),
            self._learn_capabilities(
                {root_url(url): f"Bearer {key}" if key else None for url in urls}
            ),
        )
        for url, result in zip(urls, results, strict=True):
            if isinstance(result, BaseException):
                log.debug("discovery of %s failed: %r", url, result)
                continue
            self._merge_discovered(url, result)
            if url in self._pending_discovery:  # a concurrent round may have done it
                self._pending_discovery.remove(url)

    def _merge_discovered(self, url: str, models: list[DiscoveredModel]) -> None:
        url = url.rstrip("/")
        for model in models:
            canonical = self._names.get(model.id)
            if canonical is None:
                entry = self._add_model(
                    ModelConfig(name=model.id, hold_seconds=self.settings.discovered_hold_seconds)
                )
            else:
                entry = self._entries[canonical]
            if any(replica.url == url for replica in entry.replicas):
                continue
            config = replica_for(url, model, self.settings.discover_api_key)
            self._add_replica(entry, config, discovered=True)
            log.info("discovered replica %s for model %s", url, entry.config.name)

    # ------------------------------------------------------------------- health

    async def _health_round(self) -> None:
        await self._discover_pending()
        await self.check_health()

    async def check_health(self, replicas: list[Replica] | None = None) -> None:
        """Probe replicas (all by default); a server shared by replicas is probed once."""
        targets: dict[tuple[str, str | None], list[Replica]] = {}
        for replica in replicas if replicas is not None else self.replicas():
            if replica.vllm:
                key = (replica.root + "/health", None)
            else:
                key = (replica.url + "/models", replica.headers.get("authorization"))
            targets.setdefault(key, []).append(replica)
        if not targets:
            return
        results = await asyncio.gather(*(self._probe(url, auth) for url, auth in targets))
        now = time.monotonic()
        unknown: dict[str, str | None] = {}
        for group, ok in zip(targets.values(), results, strict=True):
            for replica in group:
                replica.health_checked_at = now
                self._set_health(replica, ok)
                if not ok:
                    self._capabilities.pop(replica.root, None)
                elif replica.root not in self._capabilities:
                    unknown[replica.root] = replica.headers.get("authorization")
        await self._learn_capabilities(unknown)

    async def _learn_capabilities(self, servers: dict[str, str | None]) -> None:
        """Read the OpenAPI document of each server root not asked yet (root ->
        authorization header); one that does not answer is asked next round."""
        servers = {root: auth for root, auth in servers.items() if root not in self._capabilities}
        if not servers:
            return
        results = await asyncio.gather(
            *(
                fetch_capabilities(
                    self._client, root, authorization=auth, timeout=self._probe_timeout
                )
                for root, auth in servers.items()
            ),
            return_exceptions=True,
        )
        for root, result in zip(servers, results, strict=True):
            if isinstance(result, BaseException):
                log.debug("capabilities of %s unknown: %r", root, result)
            else:
                self._capabilities[root] = result

    async def _probe(self, url: str, authorization: str | None) -> bool:
        headers = {"authorization": authorization} if authorization else None
        for attempt in (1, 2):
            try:
                response = await self._client.get(url, headers=headers, timeout=self._probe_timeout)
            except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
                return False  # it took the connection and did not answer in time
            except httpx.HTTPError:
                # A reused keep-alive connection the server closed meanwhile is
                # not a down server (the aiohttp engine reports that as a
                # ConnectTimeout): one fresh try before calling it unhealthy.
                if attempt == 2:
                    return False
                continue
            return response.status_code == 200
        return False

    def _set_health(self, replica: Replica, ok: bool) -> None:
        was = replica.healthy
        replica.healthy = ok
        if ok and not was:
            # The server answered its health check after being unreachable: the
            # failures that opened its breaker are history, so it rejoins at once
            # (this is what lets a held request go as soon as a replica is up).
            replica.breaker.record_success()
            log.info("replica %s for %s is healthy again", replica.url, replica.model)
            self._entries[replica.model].notify()
        elif was and not ok:
            log.warning("replica %s for %s is unhealthy", replica.url, replica.model)

    # ------------------------------------------------------------------ metrics

    async def scrape_metrics(self) -> None:
        """Read /metrics of every healthy vLLM server once."""
        groups: dict[str, list[Replica]] = {}
        for replica in self.replicas():
            if replica.vllm and replica.healthy:
                groups.setdefault(replica.root, []).append(replica)
        if groups:
            await asyncio.gather(*(self._scrape(root, group) for root, group in groups.items()))

    async def _scrape(self, root: str, group: list[Replica]) -> None:
        try:
            response = await self._client.get(root + "/metrics", timeout=self._probe_timeout)
        except httpx.HTTPError:
            return  # the metrics go stale and routing falls back to outstanding counts
        if response.status_code != 200:
            return
        text = response.text
        now = time.monotonic()
        parsed: dict[str, Any] = {}
        for replica in group:
            metrics = parsed.get(replica.upstream_model)
            if metrics is None:
                metrics = parse_vllm_metrics(text, replica.upstream_model)
                parsed[replica.upstream_model] = metrics
            if metrics.has_load_metrics:
                replica.set_metrics(metrics, now)

    # ------------------------------------------------------------------ routing

    def _pick(
        self, entry: _ModelEntry, tried: list[Replica], key_hash: int | None
    ) -> Replica | None:
        settings = self.settings
        self._rotation += 1
        return pick_replica(
            entry.replicas,
            now=time.monotonic(),
            stale_after=settings.metrics_stale_seconds,
            exclude=tried,
            key_hash=key_hash,
            affinity_ratio=settings.affinity_load_ratio,
            affinity_slack=settings.affinity_load_slack,
            rotation=self._rotation,
        )

    async def _hold(self, entry: _ModelEntry) -> bool:
        """Wait up to the model's hold_seconds for a ready replica (scale-to-zero)."""
        deadline = time.monotonic() + entry.config.hold_seconds
        entry.holders += 1
        if entry.hold_probe is None or entry.hold_probe.done():
            entry.hold_probe = asyncio.create_task(self._probe_while_held(entry))
        try:
            while True:
                event = entry.changed
                if entry.any_ready():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Bounded wait: an open breaker turns half-open by time alone,
                # which raises no event.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, self.settings.hold_poll_interval)):
                        await event.wait()
        finally:
            entry.holders -= 1

    async def _probe_while_held(self, entry: _ModelEntry) -> None:
        # Requests are waiting: probe this model's down replicas far more often
        # than the regular health round so they go as soon as one is up.
        while entry.holders > 0:
            down = [replica for replica in entry.replicas if not replica.healthy]
            if down:
                await self.check_health(down)
            await asyncio.sleep(self.settings.hold_poll_interval)

    # ---------------------------------------------------------------- requests

    async def request(
        self,
        model: str,
        path: str,
        body: dict[str, Any],
        *,
        priority: int | None = None,
        affinity_key: str | None = None,
        timeout: float | None = None,
        at_root: bool = False,
        content: bytes | None = None,
        content_type: str | None = None,
    ) -> UpstreamResponse:
        """One JSON request to a replica of `model`. `path` is relative to the
        replica's OpenAI base URL (`.../v1`), or to its server root with
        `at_root` (vLLM's /tokenize, /rerank, ...). With `content` that body is
        sent as it is, under `content_type` (a multipart upload), instead of
        `body` as JSON: nothing in it is rewritten (not the model name, not the
        priority), and every retry sends the same bytes."""
        result = await self._dispatch(
            self._entry(model),
            path,
            body,
            priority,
            affinity_key,
            timeout,
            streaming=False,
            at_root=at_root,
            raw=(content, content_type or "application/octet-stream")
            if content is not None
            else None,
        )
        assert isinstance(result, UpstreamResponse)
        return result

    async def stream(
        self,
        model: str,
        path: str,
        body: dict[str, Any],
        *,
        priority: int | None = None,
        affinity_key: str | None = None,
        timeout: float | None = None,
    ) -> UpstreamStream:
        result = await self._dispatch(
            self._entry(model), path, body, priority, affinity_key, timeout, streaming=True
        )
        assert isinstance(result, UpstreamStream)
        return result

    async def _dispatch(
        self,
        entry: _ModelEntry,
        path: str,
        body: dict[str, Any],
        priority: int | None,
        affinity_key: str | None,
        timeout: float | None,
        *,
        streaming: bool,
        at_root: bool = False,
        raw: tuple[bytes, str] | None = None,
    ) -> UpstreamResponse | UpstreamStream:
        config = entry.config
        key_hash = affinity_hash(affinity_key) if affinity_key else None
        http_timeout = self._request_timeout(timeout)
        attempts_left = self.settings.max_retries + 1
        tried: list[Replica] = []
        last_error: BackendError | None = None
        held = False
        while attempts_left > 0:
            replica = self._pick(entry, tried, key_hash)
            if replica is None and tried:
                break  # every ready replica had its try
            target = choose_target(
                config,
                has_replicas=bool(entry.replicas),
                any_ready=replica is not None,
                best_waiting=self._waiting(replica) if replica is not None and not tried else None,
                overflow_waiting=self.settings.overflow_waiting,
                held=held,
            )
            if target is Target.HOSTED:
                return await self._hosted(config, path, body, timeout, streaming)
            if target is Target.HOLD:
                held = True
                await self._hold(entry)
                continue
            if target is Target.FAIL or replica is None:
                raise NoReplicaAvailable(config.name)
            tried.append(replica)
            if not replica.breaker.acquire():
                continue  # another request holds the half-open probe; not an attempt
            attempts_left -= 1
            try:
                if streaming:
                    return await self._send_stream(replica, path, body, priority, http_timeout)
                return await self._send(
                    replica, path, body, priority, http_timeout, at_root=at_root, raw=raw
                )
            except _Retryable as failure:
                last_error = failure.error
                log.info("retrying %s elsewhere after %s", path, failure.error.message)
        if config.hosted:
            return await self._hosted(config, path, body, timeout, streaming)
        if last_error is not None:
            raise last_error
        raise NoReplicaAvailable(config.name)

    def _waiting(self, replica: Replica) -> float | None:
        metrics = replica.fresh_metrics(time.monotonic(), self.settings.metrics_stale_seconds)
        return metrics.waiting if metrics is not None else None

    def _request_timeout(self, timeout: float | None) -> tuple[float, float]:
        """(connect, read) seconds for one upstream request."""
        if timeout is None:
            return self.settings.connect_timeout, self.settings.read_timeout
        return min(self.settings.connect_timeout, timeout), timeout

    async def _hosted(
        self,
        config: ModelConfig,
        path: str,
        body: dict[str, Any],
        timeout: float | None,
        streaming: bool,
    ) -> UpstreamResponse | UpstreamStream:
        if streaming:
            return await self.hosted.stream(config, path, body, timeout)
        return await self.hosted.request(config, path, body, timeout)

    @staticmethod
    def _payload(replica: Replica, body: dict[str, Any], priority: int | None) -> bytes:
        # A copy: the caller's body is reused for retries, caching and metering.
        payload = dict(body)
        payload["model"] = replica.upstream_model
        if priority is not None and replica.vllm and replica.config.priority:
            payload["priority"] = priority
        return orjson.dumps(payload)

    @staticmethod
    def _decode(content: bytes) -> dict[str, Any] | None:
        try:
            decoded = orjson.loads(content)
        except orjson.JSONDecodeError:
            return None
        return decoded if isinstance(decoded, dict) else None

    def _not_sent(self, replica: Replica, exc: RequestNotSent) -> _Retryable:
        """No connection was made: another replica may answer instead."""
        if exc.refused:
            # Refused or unroutable: the server is gone, so stop routing to it
            # now instead of after breaker_failures more lost attempts.
            self._set_health(replica, False)
            message = f"Could not connect to {replica.url}."
        else:
            message = exc.message
        return _Retryable(UpstreamError(message, status=502, replica=replica.id))

    async def _broken(self, replica: Replica, exc: Exception) -> Exception:
        """A request that may have reached the replica failed without an answer.

        It may be generating there, so another replica would run it twice: the
        client gets the 502. Unless nothing listens at the replica's address
        any more (a connection to it is refused right now): then the process
        that had the request is gone, and so is its generation (a killed or
        crashed server; a graceful stop finishes its requests before it closes
        them), and another replica may run it instead."""
        message = getattr(exc, "message", None) or str(exc)
        if await self._refuses_connections(replica):
            self._set_health(replica, False)
            log.warning("replica %s went away during a request: retrying it", replica.url)
            return _Retryable(
                UpstreamError(
                    f"{replica.url} went away during the request.", status=502, replica=replica.id
                )
            )
        return UpstreamError(message, status=502, replica=replica.id)

    async def _refuses_connections(self, replica: Replica, window: float = 1.5) -> bool:
        """True only when a TCP connect to the replica's address is refused
        within `window` seconds, before anything there answers HTTP.

        A killed server's listening socket can outlive its connections for a
        moment (a forked child that inherited it is still exiting), so one
        accepted connect proves nothing: the probe asks `GET /health` and
        looks again until something answers (alive: False), a connect is
        refused (gone: True) or the window ends (unknown: False)."""
        parts = urlsplit(replica.root)
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + window
        while True:
            try:
                async with asyncio.timeout(0.25):
                    reader, writer = await asyncio.open_connection(parts.hostname, port)
            except ConnectionRefusedError:
                return True
            except (OSError, TimeoutError):
                return False  # unreachable or slow to accept: nothing proven
            try:
                if tls:
                    return False  # a plain probe means nothing to a TLS server
                writer.write(b"GET /health HTTP/1.1\r\nhost: probe\r\nconnection: close\r\n\r\n")
                async with asyncio.timeout(0.25):
                    if await reader.read(1):
                        return False  # something answered: the server is alive
            except (OSError, TimeoutError):
                pass
            finally:
                writer.close()
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.1)

    def _error_for_status(
        self, replica: Replica, status: int, content: bytes
    ) -> tuple[BackendError, bool, bool]:
        """(error, retry elsewhere?, counts as replica failure?) for a non-2xx answer."""
        error = error_from_upstream(status, self._decode(content), replica.id)
        if status in _RETRY_STATUSES:
            if status not in _KEPT_STATUSES:
                error.status = 502
            return error, True, True
        if status == 429:
            return error, True, False  # busy, not broken: another replica may have room
        return error, False, False

    def _settle(self, replica: Replica, verdict: bool | None) -> None:
        if verdict is True:
            replica.breaker.record_success()
        elif verdict is False:
            replica.failures_total += 1
            replica.breaker.record_failure()
        else:
            replica.breaker.release()

    async def _send(
        self,
        replica: Replica,
        path: str,
        body: dict[str, Any],
        priority: int | None,
        timeout: tuple[float, float],
        *,
        at_root: bool = False,
        raw: tuple[bytes, str] | None = None,
    ) -> UpstreamResponse:
        if raw is None:
            content, headers = self._payload(replica, body, priority), replica.headers
        else:
            content, headers = raw[0], {**replica.headers, "content-type": raw[1]}
        base = replica.root if at_root else replica.url
        replica.outstanding += 1
        replica.requests_total += 1
        verdict: bool | None = None  # None: no verdict (cancelled), frees a half-open probe
        try:
            try:
                response = await self._engine.post(base + path, content, headers, *timeout)
            except RequestNotSent as exc:
                verdict = False
                raise self._not_sent(replica, exc) from exc
            except PoolExhausted as exc:
                raise UpstreamTimeout(str(exc)) from exc
            except UpstreamTimeout:
                # The generation may still be running: another replica would
                # double the work and the wait, so this is the client's answer.
                verdict = False
                raise
            except RequestBroken as exc:
                verdict = False
                raise await self._broken(replica, exc) from exc
            status = response.status
            if status < 400:
                decoded = self._decode(response.content)
                if decoded is None:
                    verdict = False
                    raise UpstreamError(
                        "Upstream answered with invalid JSON.", status=502, replica=replica.id
                    )
                verdict = True
                return UpstreamResponse(status, decoded, replica.url, response.headers)
            error, retry, failed = self._error_for_status(replica, status, response.content)
            verdict = not failed
            if retry:
                raise _Retryable(error)
            raise error
        finally:
            replica.outstanding -= 1
            self._settle(replica, verdict)

    async def _send_stream(
        self,
        replica: Replica,
        path: str,
        body: dict[str, Any],
        priority: int | None,
        timeout: tuple[float, float],
    ) -> UpstreamStream:
        content = self._payload(replica, body, priority)
        replica.outstanding += 1
        replica.requests_total += 1
        verdict: bool | None = None
        handed_over = False
        response = None
        try:
            try:
                response = await self._engine.open(
                    replica.url + path, content, replica.headers, *timeout
                )
                status = response.status
                if status != 200:
                    error_content = await response.read()
                    error, retry, failed = self._error_for_status(replica, status, error_content)
                    verdict = not failed
                    if retry:
                        raise _Retryable(error)
                    raise error
                reader = SseReader(response.chunks(), replica.url)
                # Wait for the first event before answering, so a replica that
                # fails now still gets a plain error status, not a broken stream.
                # It is not retried: a 200 means the generation has started.
                first = await reader.next_event()
                if first is None:
                    raise UpstreamError(
                        "Upstream closed the stream before any event.",
                        status=502,
                        replica=replica.id,
                    )
            except RequestNotSent as exc:
                verdict = False
                raise self._not_sent(replica, exc) from exc
            except PoolExhausted as exc:
                raise UpstreamTimeout(str(exc)) from exc
            except UpstreamTimeout:
                verdict = False
                raise
            except UpstreamError as exc:
                if verdict is not None:  # an error status, already judged
                    raise
                verdict = False  # the stream broke before its first event
                raise await self._broken(replica, exc) from exc
            except RequestBroken as exc:
                verdict = False
                raise await self._broken(replica, exc) from exc
            verdict = True
            opened = response

            async def close(ok: bool) -> None:
                try:
                    # A stream received whole keeps its connection (engines
                    # check); any other is dropped, which makes vLLM abort.
                    await opened.close(finished=ok)
                finally:
                    replica.outstanding -= 1
                    if not ok:
                        replica.failures_total += 1
                        replica.breaker.record_failure()

            stream = UpstreamStream(
                replica.url, reader.next_event, close, first=first, headers=response.headers
            )
            handed_over = True
            return stream
        finally:
            if not handed_over:
                replica.outstanding -= 1
                if response is not None:
                    await response.close()
            self._settle(replica, verdict)

    # -------------------------------------------------------------- reporting

    def snapshot(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        rows: list[dict[str, Any]] = []
        for entry in self._entries.values():
            rows.extend(replica.snapshot(now) for replica in entry.replicas)
            if entry.config.hosted:
                rows.append(
                    {
                        "model": entry.config.name,
                        "url": HOSTED_PREFIX + entry.config.hosted,
                        "upstream_model": entry.config.hosted,
                        "vllm": False,
                        "discovered": False,
                        "healthy": True,
                        "breaker": "closed",
                        "ready": True,
                        "outstanding": None,
                        "running": None,
                        "waiting": None,
                        "kv_usage": None,
                        "prefix_cache_hit_rate": None,
                        "metrics_age": None,
                        "requests_total": None,
                        "failures_total": None,
                    }
                )
        return rows

    def held(self) -> dict[str, int]:
        """Requests waiting for a ready replica (scale-to-zero), per model: the
        signal that tells an autoscaler a model at zero replicas is wanted."""
        return {name: entry.holders for name, entry in self._entries.items()}

    def foreign_load(self, model: str | None = None) -> float:
        """Requests at the model's vLLM servers that this process did not send.

        In a worker that is the interactive traffic (and other workers' lines)
        its batch lines compete with: vLLM's running + waiting at the last
        scrape, less what this process had in flight then. Stale or missing
        metrics count as no load, since they cannot tell.
        """
        now = time.monotonic()
        stale_after = self.settings.metrics_stale_seconds
        mine: dict[str, int] = {}
        theirs: dict[str, float] = {}
        for replica in self.replicas(model):
            metrics = replica.fresh_metrics(now, stale_after)
            if metrics is None:
                continue
            theirs[replica.root] = metrics.running + metrics.waiting
            mine[replica.root] = mine.get(replica.root, 0) + replica.outstanding_at_scrape
        return sum(max(0.0, load - mine[root]) for root, load in theirs.items())

    def queue_depth(self, model: str | None = None) -> float:
        """Requests queued upstream: vLLM's waiting count, or our outstanding when stale.

        A server that serves several model names is counted once.
        """
        now = time.monotonic()
        stale_after = self.settings.metrics_stale_seconds
        seen: set[str] = set()
        depth = 0.0
        for replica in self.replicas(model):
            if replica.root in seen:
                continue
            seen.add(replica.root)
            metrics = replica.fresh_metrics(now, stale_after)
            depth += metrics.waiting if metrics is not None else replica.outstanding
        return depth
