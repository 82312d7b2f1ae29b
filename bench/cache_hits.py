"""Cache hit latency and throughput: ``python bench/cache_hits.py [--entries N]``.

Fills a cache (SQLite in a temporary directory, real embedder and verifier)
with distinct questions, then measures, in one run:

* exact hits — the same request again (no embedding),
* semantic hits — a reworded request (embedding + FAISS + verifier),
* misses — an unrelated question (embedding + FAISS, nothing found),

sequentially for per-lookup latency and with many concurrent lookups for
throughput (where micro-batching of embeddings shows). Ratios are against the
exact-hit path measured in the same run.

The semantic throughput run also reports where the embedder thread's time goes
per batch (model, vector search, tokenising the candidates, pair features,
verifier) and CPU per lookup. ``--precomputed`` embeds that run's questions
beforehand and has the model answer them from a table while it is measured:
what remains is the cache's own cost (search, features, verifier, event
loop), the part that decides the rate when the model runs on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache.verifier as verifier_module  # noqa: E402
from cache.config import CacheSettings  # noqa: E402
from cache.embedder import Embedder  # noqa: E402
from cache.keys import namespace_for, query_text  # noqa: E402
from cache.semantic_cache import SemanticCache  # noqa: E402

QQP = Path("/work/shared/data/qqp-pairs-dev.jsonl")
TOPICS = [
    "Rome",
    "photosynthesis",
    "tax law",
    "jazz",
    "volcanoes",
    "chess",
    "Python",
    "the stock market",
    "black holes",
    "bread baking",
    "marathons",
    "bees",
]
ASPECTS = [
    "history",
    "basics",
    "best books",
    "common mistakes",
    "future",
    "cost",
    "health effects",
    "main arguments",
    "origin",
    "key people",
]


def questions(n: int) -> list[str]:
    """Distinct, realistic questions: QQP's when available, generated otherwise."""
    found: list[str] = []
    seen: set[str] = set()
    if QQP.exists():
        with QQP.open() as fh:
            for line in fh:
                q = json.loads(line)["a"].strip()
                if q.endswith("?") and 20 < len(q) < 120 and q not in seen:
                    seen.add(q)
                    found.append(q)
                    if len(found) == n:
                        return found
    i = 0
    while len(found) < n:
        t, a = TOPICS[i % len(TOPICS)], ASPECTS[(i // len(TOPICS)) % len(ASPECTS)]
        found.append(f"What should I know about the {a} of {t} (part {i})?")
        i += 1
    return found


def reworded(q: str, k: int) -> str:
    # Casing and punctuation changes: a different exact key and a different
    # embedding, but the same question, so the verifier should accept it.
    base = q.rstrip("?")
    return [base.lower() + "?", base + "??", base.lower(), base + " ?", base.upper() + "?"][k % 5]


def chat(q: str) -> dict:
    return {
        "model": "llama",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}],
        "temperature": 0,
    }


def response(q: str) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "model": "llama",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": f"About {q}: ..." * 5},
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 40, "total_tokens": 60},
    }


async def timed(cache: SemanticCache, reqs: list[dict], point: str) -> tuple[list[float], int]:
    latencies, hits = [], 0
    for req in reqs:
        started = time.perf_counter()
        hit = await cache.lookup(namespace_for("bench", "llama", req), req, point)
        latencies.append((time.perf_counter() - started) * 1000)
        hits += hit is not None
    return latencies, hits


async def throughput(
    cache: SemanticCache, reqs: list[dict], point: str, concurrency: int
) -> tuple[float, int]:
    queue = list(reqs)
    hits = 0

    async def worker() -> None:
        nonlocal hits
        while queue:
            req = queue.pop()
            hit = await cache.lookup(namespace_for("bench", "llama", req), req, point)
            # Not "hits += await ...": that reads hits before the await and loses updates.
            hits += hit is not None

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(reqs) / (time.perf_counter() - started), hits


class Breakdown:
    """Wall time per stage of the embedder thread's batches, from wrappers
    around the cache's parts (a few hundred nanoseconds a call)."""

    STAGES = ("model", "search", "features", "verifier MLP", "rest of after-batch")

    def __init__(self, cache: SemanticCache) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.thread_cpu = 0.0
        self.batches = 0
        self.items = 0
        self.on = False
        batcher = cache._embedder
        assert batcher is not None and cache._index is not None
        model = batcher._embedder
        model.encode = self._timed("model", model.encode)  # type: ignore[method-assign]
        index = cache._index
        index.search_flat = self._timed("search", index.search_flat)  # type: ignore[method-assign]
        self._features = verifier_module.pair_feature_matrix
        verifier_module.pair_feature_matrix = self._timed("features", self._features)
        if cache._verifier is not None:
            score = cache._verifier.score_pairs
            cache._verifier.score_pairs = self._timed("verifier", score)  # type: ignore[method-assign]
        assert batcher._after is not None
        batcher._after = self._timed("after", batcher._after)
        process = batcher._process

        def processed(batch: list) -> Any:
            cpu = time.thread_time()
            try:
                return self._timed("batch", process)(batch)
            finally:
                if self.on:
                    self.thread_cpu += time.thread_time() - cpu
                    self.batches += 1
                    self.items += len(batch)

        batcher._process = processed  # type: ignore[method-assign]

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    self.seconds[name] += time.perf_counter() - started

        return timed

    def undo(self) -> None:
        verifier_module.pair_feature_matrix = self._features

    def report(self, wall: float, lookups: int) -> list[str]:
        n = max(1, self.batches)
        sec = self.seconds
        stages = {
            "model": sec["model"],
            "search": sec["search"],
            "features": sec["features"],
            "verifier MLP": sec["verifier"] - sec["features"],
            "rest of after-batch": sec["after"] - sec["search"] - sec["verifier"],
        }
        other = sec["batch"] - sec["model"] - sec["after"]
        lines = [
            f"  embedder thread: {self.batches} batches, {self.items / n:.0f} lookups a batch, "
            f"{1000 * sec['batch'] / n:.2f} ms a batch, busy {sec['batch'] / wall:.0%} of the run, "
            f"{1e6 * self.thread_cpu / max(1, lookups):.0f} us of its CPU per lookup"
        ]
        for name, value in [*stages.items(), ("batch bookkeeping", other)]:
            lines.append(
                f"    {name:<20}{1000 * value / n:>8.2f} ms a batch"
                f"{1e6 * value / max(1, lookups):>8.1f} us a lookup"
            )
        return lines


def ns_of(req: dict) -> str:
    return namespace_for("bench", "llama", req)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def run(
    entries: int,
    lookups: int,
    concurrency: int,
    point: str,
    latency_lookups: int | None = None,
    precomputed: bool = False,
) -> None:
    latency_lookups = lookups if latency_lookups is None else min(lookups, latency_lookups)
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite:///{tmp}/bench.db")
        cache = SemanticCache(CacheSettings(sweep_interval_s=3600), engine)
        await cache.start()
        qs = questions(entries + lookups)
        stored, unrelated = qs[:entries], qs[entries:]
        # Stored in concurrent chunks so the fill itself uses micro-batching.
        for start in range(0, len(stored), 32):
            await asyncio.gather(
                *(
                    cache.store(ns_of(chat(q)), chat(q), response(q), tenant="bench")
                    for q in stored[start : start + 32]
                )
            )
        # Warm-up: first calls pay for lazy initialisation in torch and FAISS.
        await timed(cache, [chat(reworded(q, 3)) for q in stored[:20]], point)

        rng = np.random.default_rng(0)
        picks = rng.integers(0, entries, size=lookups)
        exact = [chat(stored[i]) for i in picks]
        semantic = [chat(reworded(stored[i], k)) for k, i in enumerate(picks)]
        misses = [chat(q) for q in unrelated[:lookups]]
        rows = []
        for name, reqs in (("exact hit", exact), ("semantic hit", semantic), ("miss", misses)):
            lat, hits = await timed(cache, reqs[:latency_lookups], point)
            rows.append((name, lat, hits))
        # Throughput runs use fresh rewordings so no embedding comes from the memo.
        more = [chat(reworded(stored[i], k).replace(" ", "  ", 1)) for k, i in enumerate(picks)]
        assert cache._embedder is not None
        model = cache._embedder._embedder
        if precomputed:
            # The text the cache embeds, as it derives it (stripped of outer spaces).
            texts = [query_text(m).strip() for m in more]
            table = dict(zip(texts, model.encode(texts, 32), strict=True))
            encode = model.encode

            def from_table(texts: list[str], batch_size: int = 64) -> np.ndarray:
                if texts and all(t in table for t in texts):
                    return np.vstack([table[t] for t in texts])
                return encode(texts, batch_size)

            model.encode = from_table  # type: ignore[method-assign]
        breakdown = Breakdown(cache)
        exact_rps, _ = await throughput(cache, exact, point, concurrency)
        breakdown.on = True
        started, loop_cpu, proc_cpu = time.perf_counter(), time.thread_time(), time.process_time()
        sem_rps, sem_hits = await throughput(cache, more, point, concurrency)
        wall = time.perf_counter() - started
        loop_cpu, proc_cpu = time.thread_time() - loop_cpu, time.process_time() - proc_cpu
        breakdown.on = False
        breakdown.undo()
        stats = cache.stats()
        await cache.close()
    # The ceiling under both: every semantic lookup embeds its question once, so
    # the embedder alone, fed full batches, bounds semantic lookups/s here.
    texts = [reworded(stored[i], k) + "?" for k, i in enumerate(picks)]
    embedder = Embedder(
        cache.settings.embedder, cache.settings.device, cache.settings.embedder_runtime
    )
    embedder.encode(texts[:32], 32)
    started = time.perf_counter()
    embedder.encode(texts, 32)
    embed_rps = len(texts) / (time.perf_counter() - started)

    base = statistics.median(rows[0][1])
    print(f"bench: {entries} entries, {lookups} lookups per path, operating point {point}")
    print(f"{'path':<14}{'hit rate':>9}{'p50 ms':>9}{'p99 ms':>9}{'p50 vs exact':>14}")
    for name, lat, hits in rows:
        p50 = statistics.median(lat)
        print(
            f"{name:<14}{hits / len(lat):>9.2f}{p50:>9.3f}{pct(lat, 99):>9.3f}{p50 / base:>13.1f}x"
        )
    print()
    print(f"throughput with {concurrency} concurrent lookups:")
    print(f"  exact hits    {exact_rps:>9.0f} lookups/s")
    print(
        f"  semantic path {sem_rps:>9.0f} lookups/s  (hit rate {sem_hits / len(more):.2f}, "
        f"{sem_rps * sem_hits / len(more):.0f} hits/s"
        + (", model answered from a precomputed table)" if precomputed else ")")
    )
    print(
        f"  semantic path CPU per lookup: event loop {1e6 * loop_cpu / len(more):.0f} us, "
        f"process {1e6 * proc_cpu / len(more):.0f} us"
    )
    print("\n".join(breakdown.report(wall, len(more))))
    print(f"  embedding batches so far: {stats['embed_batches']}")
    print(
        f"  embedder alone ({embedder.runtime}, batches of 32): {embed_rps:.0f} texts/s, "
        f"the ceiling of semantic lookups/s on this CPU"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=300)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--operating-point", default="balanced")
    parser.add_argument(
        "--latency-lookups",
        type=int,
        default=None,
        help="lookups per path in the sequential latency runs (default: --lookups)",
    )
    parser.add_argument(
        "--precomputed",
        action="store_true",
        help="embed the semantic throughput run's questions beforehand: the cache's own cost",
    )
    args = parser.parse_args()
    asyncio.run(
        run(
            args.entries,
            args.lookups,
            args.concurrency,
            args.operating_point,
            args.latency_lookups,
            args.precomputed,
        )
    )


if __name__ == "__main__":
    main()
