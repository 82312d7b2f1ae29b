"""Measuring a self-hosted model's throughput, to price it from its GPU's cost.

Two loads are run straight against the model's replicas (not through the
gateway, so neither cache nor limits get in the way): a decode load, many
requests that each generate exactly `max_tokens` (vLLM's `ignore_eos`), which
gives output tokens per second; and a prefill load, long prompts with one
output token each, which gives prompt tokens per second. Throughput is per
replica, because the price book prices one GPU's hour.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from backends.config import BackendSettings
from gateway.pricing import per_million


@dataclass(frozen=True)
class Target:
    url: str  # base URL ending in /v1
    model: str  # the name the server knows the model by
    api_key: str | None = None


@dataclass
class LoadResult:
    requests: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


@dataclass
class Calibration:
    model: str
    replicas: int
    concurrency: int
    decode: LoadResult
    prefill: LoadResult

    @property
    def tokens_per_second(self) -> float:
        """Output tokens per second per replica."""
        return self.decode.completion_tokens / self.decode.seconds / self.replicas

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prefill.prompt_tokens / self.prefill.seconds / self.replicas

    def prices(self, gpu_hourly_usd: float) -> dict[str, float]:
        return {
            "output": per_million(gpu_hourly_usd, self.tokens_per_second),
            "input": per_million(gpu_hourly_usd, self.prompt_tokens_per_second),
        }

    def yaml_snippet(self, gpu_hourly_usd: float) -> str:
        return (
            "prices:\n"
            "  models:\n"
            f"    {self.model}:\n"
            f"      gpu_hourly_usd: {gpu_hourly_usd:g}\n"
            f"      tokens_per_second: {self.tokens_per_second:.2f}\n"
            f"      prompt_tokens_per_second: {self.prompt_tokens_per_second:.2f}\n"
        )


async def discover_targets(settings: BackendSettings, model: str) -> list[Target]:
    """The model's configured replicas, else the discovery URLs that serve it."""
    for m in settings.models:
        if model == m.name or model in m.aliases:
            return [
                Target(r.url.rstrip("/"), r.upstream_model or m.name, r.api_key) for r in m.replicas
            ]
    found: list[Target] = []
    async with httpx.AsyncClient(timeout=settings.connect_timeout) as client:
        for url in settings.discover:
            headers = _auth(settings.discover_api_key)
            try:
                resp = await client.get(f"{url.rstrip('/')}/models", headers=headers)
                ids = [m.get("id") for m in resp.json().get("data", [])]
            except (httpx.HTTPError, ValueError):
                continue
            if model in ids:
                found.append(Target(url.rstrip("/"), model, settings.discover_api_key))
    return found


def _auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


async def run_load(
    targets: list[Target],
    requests: int,
    concurrency: int,
    prompt: str,
    max_tokens: int,
    timeout: float = 300.0,
) -> LoadResult:
    result = LoadResult()
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency * len(targets) + 4)

    async def one(i: int, client: httpx.AsyncClient) -> None:
        target = targets[i % len(targets)]  # round robin: every replica gets load
        body: dict[str, Any] = {
            "model": target.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "ignore_eos": True,  # vLLM: generate exactly max_tokens
        }
        async with gate:
            try:
                resp = await client.post(
                    f"{target.url}/completions", json=body, headers=_auth(target.api_key)
                )
                resp.raise_for_status()
                usage = resp.json().get("usage") or {}
            except (httpx.HTTPError, ValueError) as exc:
                result.failures += 1
                result.errors.append(f"{target.url}: {exc}")
                return
        result.requests += 1
        result.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        result.completion_tokens += int(usage.get("completion_tokens") or 0)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(i, client) for i in range(requests)))
        result.seconds = time.perf_counter() - started
    return result


async def calibrate(
    settings: BackendSettings,
    model: str,
    requests: int = 32,
    concurrency: int = 8,
    max_tokens: int = 128,
    prefill_words: int = 200,
) -> Calibration:
    targets = await discover_targets(settings, model)
    if not targets:
        raise LookupError(f"no replica serves {model!r}: configure it under backends.models")
    per_target = concurrency  # the load each replica sees at once
    decode = await run_load(targets, requests, per_target * len(targets), "Hello", max_tokens)
    long_prompt = " ".join(["token"] * prefill_words)
    prefill = await run_load(targets, requests, per_target * len(targets), long_prompt, 1)
    for load in (decode, prefill):
        if load.requests == 0:
            raise RuntimeError("every calibration request failed: " + "; ".join(load.errors[:3]))
    return Calibration(model, len(targets), concurrency, decode, prefill)
