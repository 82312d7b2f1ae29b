"""The one pipeline every request goes through: HTTP routes, async jobs and
batch lines alike. Order: resolve model → admit → cache lookup → backend →
meter → cache store. Every request, whatever its fate, leaves exactly one
usage record (keyed by its request id, so a replay cannot count it twice).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
from sqlalchemy.orm import configure_mappers

from backends.errors import BackendError, UpstreamError
from backends.pool import ReplicaPool
from cache.bound import Decision, parse_max_error
from cache.keys import canonical_hash, namespace_for
from cache.policy import cache_decision
from cache.semantic_cache import Candidate, SemanticCache
from cache.singleflight import SingleFlight
from gateway.caller import TIER_PRIORITY, Caller
from gateway.capabilities import missing_route, require
from gateway.db import UsageRecord
from gateway.errors import APIError, error_body, from_backend
from gateway.limits import Limiter, estimate_tokens
from gateway.pricing import PriceBook
from gateway.protocol import ENDPOINTS, Upload
from gateway.sse import DONE, StreamAssembler, event, parse_event, replay
from gateway.stream_latency import StreamLatencies
from gateway.usage_writer import UsageWriter

log = logging.getLogger("bearpaw.pipeline")

CACHEABLE = ("chat.completions", "completions")


@dataclass
class Call:
    endpoint: str  # a key of protocol.ENDPOINTS
    body: dict[str, Any]  # validated request body
    caller: Caller
    request_id: str
    source: str = "interactive"  # interactive | async | batch
    cache_control: str = ""
    # The x-bearpaw-cache-max-error header as sent: overrides the tenant's δ.
    cache_max_error: str = ""
    # The API the client spoke when a dialect translated it into `endpoint`
    # (e.g. "responses", "messages"): usage is reported under that name.
    api: str | None = None


@dataclass
class Outcome:
    status: int
    body: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None


@dataclass
class _Meter:
    """What the usage record of one call is built from."""

    call: Call
    model: str
    started: float = field(default_factory=time.perf_counter)
    backend: str | None = None
    cache: str = "bypass"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    status: int = 200
    error: str | None = None
    stream: bool = False
    # Tokens counted against TPM at admission, settled with actual usage later.
    admitted_tokens: int | None = None
    # The client left and the backend call runs on: it writes the record.
    finishing: bool = False


# A hook the budget guard implements: raises APIError or returns headers.
BudgetCheck = Callable[[Caller], Awaitable[dict[str, str]]]


class Pipeline:
    def __init__(
        self,
        pool: ReplicaPool,
        cache: SemanticCache | None,
        usage: UsageWriter,
        limiter: Limiter,
        prices: PriceBook,
        budget_check: BudgetCheck | None = None,
        observe: Callable[[UsageRecord], None] | None = None,
        finish_abandoned: bool = True,
        stream_latencies: StreamLatencies | None = None,
    ) -> None:
        self.pool = pool
        # Finished interactive streams' TTFT and per-token time, for the batch
        # workers' SLO loop (gateway/stream_latency.py).
        self.stream_latencies = stream_latencies
        # on_client_disconnect: `finish` lets the backend complete a request
        # whose client left and bills its final usage; `abort` cancels it.
        self.finish_abandoned = finish_abandoned
        self.cache = cache
        self.usage = usage
        self.limiter = limiter
        self.prices = prices
        self.budget_check = budget_check
        self.observe = observe
        self.flights = SingleFlight()
        self._background: set[asyncio.Task[Any]] = set()
        # Records are built with model_construct, which skips what a validated
        # construction does on first use: mapper configuration. Until some query
        # has configured the mappers, reading a field of such a record fails.
        configure_mappers()

    # ------------------------------------------------------------------ entry
    async def run(self, call: Call) -> Outcome:
        model = str(call.body.get("model", ""))
        meter = _Meter(call=call, model=model, stream=bool(call.body.get("stream")))
        headers: dict[str, str] = {"x-request-id": call.request_id}
        try:
            canonical = await self.pool.resolve_or_discover(model)
            if canonical is None:
                raise APIError(
                    404,
                    f"The model `{model}` does not exist or you do not have access to it.",
                    code="model_not_found",
                    param="model",
                )
            meter.model = canonical
            require(model, call.endpoint, call.api, self.pool.capabilities(canonical))
            estimate = estimate_tokens(call.body)
            headers.update(await self.limiter.admit(call.caller, estimate))
            meter.admitted_tokens = estimate
            if self.budget_check is not None:
                headers.update(await self.budget_check(call.caller))
            outcome = await self._serve(call, meter, headers)
        except APIError as exc:
            outcome = self._fail(meter, exc, headers)
        except BackendError as exc:
            outcome = self._fail(meter, from_backend(exc), headers)
        except asyncio.CancelledError:
            # The client went away before an answer: metered as abandoned
            # (by _finish_abandoned once the backend is done, when it runs on).
            if not meter.finishing:
                meter.status, meter.error = 499, "client closed request"
                self._spawn(self._record(meter))
            raise
        if outcome.stream is None:
            await self._record(meter)
        return outcome

    async def reject(self, call: Call, exc: APIError) -> None:
        """Meters a request refused before the pipeline ran (malformed body)."""
        meter = _Meter(call=call, model=str(call.body.get("model", "")))
        meter.status, meter.error = exc.status, exc.message
        await self._record(meter)

    def _fail(self, meter: _Meter, exc: APIError, headers: dict[str, str]) -> Outcome:
        meter.status, meter.error = exc.status, exc.message
        return Outcome(exc.status, exc.body(), {**headers, **exc.headers})

    # ------------------------------------------------------------- cache + route
    async def _serve(self, call: Call, meter: _Meter, headers: dict[str, str]) -> Outcome:
        body = call.body
        stream = bool(body.get("stream"))
        namespace = key = None
        lookup = store = False
        candidate: Candidate | None = None
        max_error = _max_error(call)
        if call.endpoint in CACHEABLE and self.cache is not None:
            reason = cache_decision(body, call.caller.cache_policy)
            cc = call.cache_control.lower()
            if "no-store" in cc:
                reason = reason or "no-store"
            if reason is None:
                namespace = namespace_for(call.caller.tenant_id, meter.model, body)
                key = canonical_hash(namespace, body)
                store = True
                lookup = "no-cache" not in cc
            headers["x-bearpaw-cache"] = "miss" if store else "bypass"
            if reason:
                headers["x-bearpaw-cache-bypass"] = reason
        if lookup:
            found = await self.cache.consult(
                namespace,
                body,
                tenant=call.caller.tenant_id,
                model=meter.model,
                operating_point=call.caller.cache_policy.operating_point,
                max_error=max_error,
            )
            if found.bound is not None and max_error is not None:
                headers["x-bearpaw-cache-bound"] = _bound_header(max_error, found.bound)
            if found.hit is not None:
                return self._replay_hit(call, meter, headers, found.hit)
            # Not served: the backend's answer will be judged against this
            # candidate's, a verdict for the bound (free on a miss, the point
            # of an exploration).
            candidate = found.candidate
            if found.action == "explore":
                meter.cache = headers["x-bearpaw-cache"] = "verify"
        if meter.cache != "verify":
            meter.cache = "miss" if store else "bypass"
        path = ENDPOINTS[call.endpoint].path
        upstream_body = {**body, "model": meter.model}
        if stream:
            try:
                return await self._stream(
                    call, meter, headers, path, upstream_body, namespace, candidate
                )
            except UpstreamError as exc:
                refusal = self._no_route(call, meter, exc)
                if refusal is None:
                    raise
                raise refusal from exc
        if store:
            # Identical concurrent misses share one backend call, and the
            # answer is in the exact layer before the flight lets go: a
            # duplicate arriving just after finds it there, not a second call.
            async def call_and_store() -> tuple[int, dict[str, Any], str]:
                answer = await self._call_backend(call, meter, path, upstream_body)
                if answer[0] < 400:
                    stored = self.cache.begin_store(
                        namespace, body, answer[1], call.caller.tenant_id
                    )
                    if stored is not None:
                        self._spawn(stored)
                return answer

            work = self.flights.do(key, call_and_store)
        else:
            work = self._call_backend(call, meter, path, upstream_body)

        resp = await self._outlive_client(work, meter)
        status, rbody, backend = resp
        meter.backend = backend
        headers["x-bearpaw-backend"] = backend
        if status >= 400:
            meter.status, meter.error = status, _error_message(rbody)
            return Outcome(status, rbody, headers)
        self._take_usage(meter, rbody.get("usage"))
        if candidate is not None:
            self._spawn(self.cache.verdict(candidate, body, rbody, meter.cache == "verify"))
        return Outcome(200, rbody, headers)

    def _sample_latency(self, meter: _Meter, first_at: float, last_at: float) -> None:
        """One finished interactive stream's latency, for the SLO loop."""
        if self.stream_latencies is None:
            return
        tokens = meter.completion_tokens
        tpot = (last_at - first_at) / (tokens - 1) if tokens > 1 else None
        duration = time.perf_counter() - meter.started
        self.stream_latencies.add(meter.model, first_at - meter.started, tpot, tokens, duration)

    async def _outlive_client(
        self,
        work: Awaitable[tuple[int, dict[str, Any], str]],
        meter: _Meter,
    ) -> tuple[int, dict[str, Any], str]:
        """Awaits the backend call; if the client goes away first (the request
        is cancelled) and on_client_disconnect is `finish`, the call runs on in
        the background and its final usage is billed to the request (499)."""
        if not self.finish_abandoned:
            return await work
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            meter.finishing = True  # the record is written when the call ends
            self._spawn(self._finish_abandoned(task, meter))
            raise

    async def _finish_abandoned(
        self,
        task: asyncio.Future[tuple[int, dict[str, Any], str]],
        meter: _Meter,
    ) -> None:
        try:
            status, rbody, backend = await task
        except (Exception, asyncio.CancelledError) as exc:  # failed: nothing generated
            meter.error = str(exc)
        else:
            meter.backend = backend
            if status < 400:
                # Its answer was cached inside the flight (call_and_store),
                # so a retry of the same request is a cache hit.
                self._take_usage(meter, rbody.get("usage"))
        meter.status, meter.error = 499, "client closed request"
        await self._record(meter)

    async def _call_backend(
        self, call: Call, meter: _Meter, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any], str]:
        # A multipart upload goes as the client sent it; everything else as JSON.
        upload = call.body if isinstance(call.body, Upload) else None
        try:
            resp = await self.pool.request(
                meter.model,
                path,
                body,
                priority=_priority(call, meter),
                affinity_key=affinity_key(body),
                at_root=ENDPOINTS[call.endpoint].at_root,
                content=upload.content if upload is not None else None,
                content_type=upload.content_type if upload is not None else None,
            )
        except UpstreamError as exc:
            refusal = self._no_route(call, meter, exc)
            if refusal is None:
                raise
            raise refusal from exc
        return resp.status, resp.body, resp.replica

    def _no_route(self, call: Call, meter: _Meter, exc: UpstreamError) -> APIError | None:
        # The backend has no such path: the model cannot serve this endpoint,
        # said as clearly as when its capabilities were known up front.
        model = str(call.body.get("model") or meter.model)
        served = self.pool.capabilities(meter.model)
        return missing_route(exc, model, call.api or call.endpoint, served)

    def _replay_hit(self, call: Call, meter: _Meter, headers: dict[str, str], hit: Any) -> Outcome:
        response = dict(hit.response)
        response["id"] = _fresh_id(response.get("id"), call.request_id)
        response["created"] = int(time.time())
        usage = response.get("usage") or {}
        meter.cache = "hit"
        meter.backend = "cache"
        meter.cached_tokens = int(usage.get("prompt_tokens", 0)) + int(
            usage.get("completion_tokens", 0)
        )
        meter.prompt_tokens = int(usage.get("prompt_tokens", 0))
        meter.completion_tokens = int(usage.get("completion_tokens", 0))
        headers["x-bearpaw-cache"] = "hit"
        headers["x-bearpaw-cache-similarity"] = f"{hit.similarity:.4f}"
        headers["x-bearpaw-cache-layer"] = hit.layer
        if not call.body.get("stream"):
            return Outcome(200, response, headers)
        include = bool((call.body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            chunks = replay(response, include)
            last = None
            for chunk in chunks:
                if chunk == DONE:
                    last = chunk
                    break
                yield chunk
            # The record is committed before the stream says it is done.
            await self._record(meter)
            if last:
                yield last

        return Outcome(200, None, headers, stream=events())

    # ---------------------------------------------------------------- streaming
    async def _stream(
        self,
        call: Call,
        meter: _Meter,
        headers: dict[str, str],
        path: str,
        body: dict[str, Any],
        namespace: str | None,
        candidate: Candidate | None = None,
    ) -> Outcome:
        client_opts = call.body.get("stream_options") or {}
        want_usage = bool(client_opts.get("include_usage"))
        want_continuous = bool(client_opts.get("continuous_usage_stats"))
        # Always ask for usage on every chunk, so even an abandoned stream is
        # metered for exactly the tokens generated so far.
        body["stream_options"] = {
            **client_opts,
            "include_usage": True,
            "continuous_usage_stats": True,
        }
        upstream = await self.pool.stream(
            meter.model,
            path,
            body,
            priority=_priority(call, meter),
            affinity_key=affinity_key(body),
        )
        meter.backend = upstream.replica
        headers["x-bearpaw-backend"] = upstream.replica
        assembler = StreamAssembler()
        # The upstream is read by a task of its own, not by the response: when
        # the client hangs up, that task can read on to the backend's final
        # usage (on_client_disconnect: finish), so the record bills exactly
        # what was generated, and the finished answer still reaches the cache.
        out: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the end
        gone = False

        def emit(chunk: bytes) -> None:
            if not gone:
                out.put_nowait(chunk)

        # Times of the first and last chunk that carried a token (latency samples).
        first_at = last_at = 0.0

        async def pump() -> None:
            nonlocal first_at, last_at
            completed = recorded = False
            try:
                try:
                    async for raw in upstream:
                        data = parse_event(raw)
                        if data is None:
                            if b"[DONE]" in raw:
                                completed = True
                                break
                            continue
                        if "error" in data and not data.get("choices"):
                            meter.status, meter.error = 500, _error_message(data)
                            emit(raw)
                            continue
                        assembler.add(data)
                        if _carries_token(data):
                            last_at = time.perf_counter()
                            first_at = first_at or last_at
                        usage = data.get("usage")
                        if usage:
                            self._take_usage(meter, usage)
                        if not data.get("choices"):
                            # The final usage-only chunk goes out only when asked for.
                            if want_usage:
                                emit(raw)
                            continue
                        if usage and not want_continuous:
                            data.pop("usage", None)
                            emit(event(data))
                        else:
                            emit(raw)
                except BackendError as exc:
                    meter.status, meter.error = 502, exc.message
                if not completed and meter.status < 400:
                    meter.status, meter.error = 502, "the backend stream ended early"
                if meter.status >= 400:
                    emit(
                        event(
                            error_body(meter.error or "backend error", "server_error", None, None)
                        )
                    )
                answered = completed and meter.status < 400
                if answered and first_at and call.source == "interactive":
                    self._sample_latency(meter, first_at, last_at)
                if gone:
                    meter.status, meter.error = 499, "client closed the stream"
                # Usage is committed before the client is told the stream is done.
                await self._record(meter)
                recorded = True
                if answered:
                    if namespace is not None:
                        self._spawn(
                            self.cache.store(
                                namespace, call.body, assembler.response(), call.caller.tenant_id
                            )
                        )
                    if candidate is not None:
                        explored = meter.cache == "verify"
                        self._spawn(
                            self.cache.verdict(candidate, call.body, assembler.response(), explored)
                        )
                    emit(DONE)
            finally:
                with anyio.CancelScope(shield=True):
                    await upstream.aclose()
                if not recorded:
                    # Cancelled (on_client_disconnect: abort, or shutdown):
                    # metered for the tokens reported so far.
                    meter.status, meter.error = 499, "client closed the stream"
                    self._spawn(self._record(meter))
                out.put_nowait(None)

        async def events() -> AsyncIterator[bytes]:
            nonlocal gone
            reader = self._spawn(pump())
            try:
                while (chunk := await out.get()) is not None:
                    yield chunk
            finally:
                if not reader.done():
                    gone = True
                    if not self.finish_abandoned:
                        reader.cancel()

        return Outcome(200, None, headers, stream=events())

    # ------------------------------------------------------------------ metering
    def _take_usage(self, meter: _Meter, usage: dict[str, Any] | None) -> None:
        if usage:
            meter.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            meter.completion_tokens = int(usage.get("completion_tokens") or 0)

    async def _record(self, meter: _Meter) -> None:
        call = meter.call
        if meter.cache == "hit":
            cost = self.prices.cached_cost(meter.model, meter.prompt_tokens)
            avoided = (
                self.prices.list_cost(meter.model, meter.prompt_tokens, meter.completion_tokens)
                - cost
            )
            discount = 0.0
        else:
            priced = self.prices.cost(
                meter.model, meter.prompt_tokens, meter.completion_tokens, call.source
            )
            cost, avoided, discount = priced.cost_usd, 0.0, priced.batch_discount_usd
        # model_construct: every value below is built here with its column's
        # type, and validating them again cost ~180 us a request (a tenth of
        # the gateway's CPU per proxied request in the profile).
        record = UsageRecord.model_construct(
            request_id=call.request_id,
            tenant_id=call.caller.tenant_id,
            key_id=call.caller.key_id,
            model=meter.model or str(call.body.get("model", "")),
            backend=meter.backend,
            endpoint=call.api or call.endpoint,
            source=call.source,
            stream=meter.stream,
            prompt_tokens=meter.prompt_tokens,
            completion_tokens=meter.completion_tokens,
            cached_tokens=meter.cached_tokens,
            latency_ms=(time.perf_counter() - meter.started) * 1000.0,
            cache=meter.cache,
            status_code=meter.status,
            error=meter.error,
            tier=call.caller.tier,
            cost_usd=cost,
            cost_avoided_usd=avoided,
            batch_discount_usd=discount,
        )
        await self.usage.write(record)
        if meter.admitted_tokens is not None:
            # Answers from the cache used no backend tokens, so they do not count to TPM.
            used = 0 if meter.cache == "hit" else meter.prompt_tokens + meter.completion_tokens
            await self.limiter.settle(call.caller, meter.admitted_tokens, used)
        if self.observe is not None:
            self.observe(record)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        # Work that must outlive a cancelled request (its usage record, a
        # cache store) runs as its own task, outside the request's cancel scope.
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def request_priority(call: Call) -> int:
    """vLLM priority of a call: its tenant's tier, but never more urgent than
    batch for work that can wait (batch lines, async jobs), so that work parked
    by an interactive tenant does not compete with interactive requests."""
    priority = call.caller.priority
    if call.source in ("batch", "async"):
        return max(priority, TIER_PRIORITY["batch"])
    return priority


def _priority(call: Call, meter: _Meter) -> int:
    # Verifying a would-be cache hit is the gateway's own bookkeeping: it runs
    # at batch priority so that it never delays anyone's interactive work.
    priority = request_priority(call)
    if meter.cache == "verify":
        return max(priority, TIER_PRIORITY["batch"])
    return priority


def _max_error(call: Call) -> float | None:
    """δ for this call: the request's header, else the tenant's setting."""
    if call.cache_max_error.strip():
        try:
            return parse_max_error(call.cache_max_error)
        except ValueError as exc:
            raise APIError(
                400,
                f"Invalid x-bearpaw-cache-max-error header: {exc}.",
                code="invalid_header",
                param="x-bearpaw-cache-max-error",
            ) from None
    return call.caller.cache_max_error


def _bound_header(max_error: float, bound: Decision) -> str:
    threshold = "none" if bound.threshold is None else f"{bound.threshold:g}"
    return (
        f"max-error={max_error:g}; threshold={threshold}; upper={bound.upper:.4f}; "
        f"verdicts={bound.verdicts}"
    )


def affinity_key(body: dict[str, Any], chars: int = 256) -> str | None:
    """A hash of the long shared prompt prefix, so requests that share it land on
    the replica whose prefix cache already holds it."""
    messages = body.get("messages")
    if messages:
        head = orjson.dumps(messages[:-1] or messages[:1])[:chars]
    elif isinstance(body.get("prompt"), str):
        head = body["prompt"][:chars].encode()
    else:
        return None
    if len(head) < 64:
        return None
    return hashlib.blake2b(head, digest_size=8).hexdigest()


def _fresh_id(old: Any, request_id: str) -> str:
    prefix = str(old).split("-", 1)[0] if old else "chatcmpl"
    return f"{prefix}-{request_id.removeprefix('req_')}"


def _carries_token(data: dict[str, Any]) -> bool:
    """Whether a chat or completions chunk carries generated output (the
    first chunk of a chat stream carries only the role)."""
    for choice in data.get("choices") or ():
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if delta and (
            delta.get("content")
            or delta.get("tool_calls")
            or delta.get("reasoning")
            or delta.get("reasoning_content")
        ):
            return True
    return False


def _error_message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", "upstream error"))
    return "upstream error"
