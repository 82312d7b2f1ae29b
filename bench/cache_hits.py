"""Cache hit latency and throughput: ``python bench/cache_hits.py [--entries N]``.

Fills a cache (SQLite in a temporary directory, real embedder and verifier)
with distinct questions, then measures, in one run:

* exact hits — the same request again (no embedding),
* semantic hits — a reworded request (embedding + FAISS + verifier),
* misses — an unrelated question (embedding + FAISS, nothing found),

sequentially for per-lookup latency and with many concurrent lookups for
throughput (where micro-batching of embeddings shows). Ratios are against the
exact-hit path measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.config import CacheSettings  # noqa: E402
from cache.embedder import Embedder  # noqa: E402
from cache.keys import namespace_for  # noqa: E402
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


def ns_of(req: dict) -> str:
    return namespace_for("bench", "llama", req)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def run(entries: int, lookups: int, concurrency: int, point: str) -> None:
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
            lat, hits = await timed(cache, reqs, point)
            rows.append((name, lat, hits))
        # Throughput runs use fresh rewordings so no embedding comes from the memo.
        more = [chat(reworded(stored[i], k).replace(" ", "  ", 1)) for k, i in enumerate(picks)]
        exact_rps, _ = await throughput(cache, exact, point, concurrency)
        sem_rps, sem_hits = await throughput(cache, more, point, concurrency)
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
        f"{sem_rps * sem_hits / len(more):.0f} hits/s)"
    )
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
    args = parser.parse_args()
    asyncio.run(run(args.entries, args.lookups, args.concurrency, args.operating_point))


if __name__ == "__main__":
    main()
