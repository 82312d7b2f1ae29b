"""FAISS vector index, one per namespace.

A separate index per namespace is what makes a cross-namespace answer
structurally impossible: a search only ever sees vectors of the namespace it
was asked about. Namespaces are usually small (one tenant × model × system
prompt × parameter set), so exact inner-product search (``IndexFlatIP``) is
both the fastest and the simplest choice.

A namespace that grows past ``_GPU_MIN_ROWS`` moves to the GPU when there is
one: FAISS's GPU index where FAISS was built with it, otherwise the same exact
inner product as a matrix product on the GPU through torch (the embedder's own
runtime there), since an exact search of 100,000 rows costs milliseconds of
CPU per lookup and microseconds on a GPU.

Removal (TTL, eviction, purge) is rare compared with search and would cost a
full copy in a flat index, so removed rows become tombstones that searches
skip, and a namespace is compacted once a quarter of it is dead.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

_GPU_MIN_ROWS = 50_000  # below this a GPU round trip costs more than it saves
# FAISS spreads a search of several queries over OpenMP threads. For the small
# searches a batch of lookups makes (a few queries against a namespace of a
# few thousand rows), starting and joining the threads cost several times the
# search itself (measured: 195 vs 570-840 us of CPU per lookup, 100
# namespaces); only searches above this many query x row products fan out.
_PARALLEL_WORK = 2_000_000
_OMP_THREADS = faiss.omp_get_max_threads()
# FAISS (1.9 and later) computes a flat search with its own SIMD loop, one
# query at a time, below queries x dim = 128,000 (333 queries of 384), and
# with a BLAS matrix product above. For a batch of lookups the product is far
# faster; measured on the dev box's CPU, one thread, 2,000 rows: 1 query 0.13
# vs 0.31 ms, 4 queries 0.50 vs 0.28, 16 2.0 vs 0.51, 256 31 vs 5.2 ms (20,000
# rows, 256 queries: 627 vs 53 ms). So from this many queries on, BLAS. The
# threshold is FAISS's one global setting; the cache is its only user here.
_BLAS_MIN_QUERIES = 4


def gpu_available() -> bool:
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(get_num_gpus and hasattr(faiss, "StandardGpuResources") and get_num_gpus() > 0)


def torch_gpu_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch comes with sentence-transformers
        return False
    return bool(torch.cuda.is_available())


class TorchFlatIP:
    """Exact inner-product search as one matrix product on a torch device: the
    part of FAISS's flat index the cache uses (``add``, ``search``, ``ntotal``)."""

    def __init__(self, dim: int, device: str = "cuda", capacity: int = 1024) -> None:
        import torch

        self._torch = torch
        self.dim = dim
        self.device = device
        self._matrix = torch.empty((capacity, dim), dtype=torch.float32, device=device)
        self.ntotal = 0

    def add(self, rows: np.ndarray) -> None:
        torch = self._torch
        block = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(self.device)
        need = self.ntotal + block.shape[0]
        if need > self._matrix.shape[0]:
            grown = torch.empty(
                (max(need, 2 * self._matrix.shape[0]), self.dim),
                dtype=torch.float32,
                device=self.device,
            )
            grown[: self.ntotal] = self._matrix[: self.ntotal]
            self._matrix = grown
        self._matrix[self.ntotal : need] = block
        self.ntotal = need

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        k = min(k, self.ntotal)
        if k <= 0:
            n = queries.shape[0]
            return np.zeros((n, 0), dtype=np.float32), np.zeros((n, 0), dtype=np.int64)
        with torch.inference_mode():
            q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
            scores = q @ self._matrix[: self.ntotal].T
            top = torch.topk(scores, k, dim=1)
            return top.values.cpu().numpy(), top.indices.cpu().numpy()


@dataclass
class _NamespaceIndex:
    index: Any
    ids: list[str | None] = field(default_factory=list)  # faiss row → entry id (None = dead)
    vectors: list[np.ndarray] = field(default_factory=list)
    dead: int = 0
    on_gpu: bool = False

    @property
    def live(self) -> int:
        return len(self.ids) - self.dead


class SemanticIndex:
    def __init__(
        self,
        dim: int,
        use_gpu: bool = False,
        gpu_backend: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.dim = dim
        # The most OpenMP threads a large CPU search fans out to (None: all).
        self._threads = _OMP_THREADS if threads is None else max(1, min(threads, _OMP_THREADS))
        faiss.cvar.distance_compute_blas_threshold = _BLAS_MIN_QUERIES * dim
        # "faiss" (FAISS built with GPU support), "torch" (a CUDA device, CPU
        # FAISS), or None; `gpu_backend` forces one (tests run "torch" on CPU).
        if gpu_backend is None and use_gpu:
            if gpu_available():
                gpu_backend = "faiss"
            elif torch_gpu_available():
                gpu_backend = "torch"
        self._backend = gpu_backend
        self._use_gpu = gpu_backend is not None
        self._torch_device = "cuda" if torch_gpu_available() else "cpu"
        self._gpu_resources: Any = faiss.StandardGpuResources() if gpu_backend == "faiss" else None
        self._spaces: dict[str, _NamespaceIndex] = {}
        self._where: dict[str, tuple[str, int]] = {}  # entry id → (namespace, row)
        # Batched searches run in the embedder's worker thread while stores and
        # evictions change the index on the event loop; FAISS and the torch
        # matrix must not be grown while a search reads them. Re-entrant
        # because add() removes a replaced entry first.
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._where)

    @property
    def namespaces(self) -> int:
        return len(self._spaces)

    def _new_space(self, rows: int) -> _NamespaceIndex:
        index = faiss.IndexFlatIP(self.dim)
        if self._use_gpu and rows >= _GPU_MIN_ROWS:
            if self._backend == "torch":
                return _NamespaceIndex(TorchFlatIP(self.dim, self._torch_device), on_gpu=True)
            return _NamespaceIndex(
                faiss.index_cpu_to_gpu(self._gpu_resources, 0, index), on_gpu=True
            )
        return _NamespaceIndex(index)

    def add(self, namespace: str, entry_id: str, vector: np.ndarray) -> None:
        with self._lock:
            self._add(namespace, entry_id, vector)

    def _add(self, namespace: str, entry_id: str, vector: np.ndarray) -> None:
        if entry_id in self._where:
            self._remove(entry_id)
        space = self._spaces.get(namespace)
        if space is None:
            space = self._spaces[namespace] = self._new_space(0)
        row = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, self.dim)
        space.index.add(row)
        space.ids.append(entry_id)
        space.vectors.append(row[0])
        self._where[entry_id] = (namespace, len(space.ids) - 1)
        if self._use_gpu and not space.on_gpu and space.live >= _GPU_MIN_ROWS:
            self._compact(namespace, space)  # rebuilds the namespace on the GPU

    def remove(self, entry_id: str) -> None:
        with self._lock:
            self._remove(entry_id)

    def _remove(self, entry_id: str) -> None:
        located = self._where.pop(entry_id, None)
        if located is None:
            return
        namespace, row = located
        space = self._spaces[namespace]
        space.ids[row] = None
        space.dead += 1
        if space.live == 0:
            del self._spaces[namespace]
        elif space.dead > max(32, space.live // 3):
            self._compact(namespace, space)

    def _compact(self, namespace: str, space: _NamespaceIndex) -> None:
        keep = [i for i, entry_id in enumerate(space.ids) if entry_id is not None]
        fresh = self._new_space(len(keep))
        if keep:
            matrix = np.vstack([space.vectors[i] for i in keep])
            fresh.index.add(matrix)
            fresh.vectors = list(matrix)
        fresh.ids = [space.ids[i] for i in keep]
        self._spaces[namespace] = fresh
        for row, entry_id in enumerate(fresh.ids):
            assert entry_id is not None
            self._where[entry_id] = (namespace, row)

    def vector(self, entry_id: str) -> np.ndarray | None:
        with self._lock:
            located = self._where.get(entry_id)
            if located is None:
                return None
            namespace, row = located
            return self._spaces[namespace].vectors[row]

    def search(
        self, namespace: str, query: np.ndarray, k: int, min_similarity: float
    ) -> list[tuple[str, float]]:
        """Up to ``k`` live entries of ``namespace`` with cosine ≥ ``min_similarity``."""
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        found = self.search_many([namespace], q, k, min_similarity)[0]
        return [(entry_id, score) for entry_id, score, _ in found]

    def search_many(
        self,
        namespaces: Sequence[str],
        queries: np.ndarray,
        k: int,
        min_similarity: float,
    ) -> list[list[tuple[str, float, np.ndarray]]]:
        """``search`` for a batch: query ``i`` (row ``i`` of ``queries``) in
        ``namespaces[i]``, with each hit's stored vector.

        One index search per namespace present in the batch, so a burst of
        lookups costs one matrix product (one host/device round trip on a GPU)
        per namespace instead of one per lookup. Thread-safe against add and
        remove: it is meant to run off the event loop.
        """
        results: list[list[tuple[str, float, np.ndarray]]] = [[] for _ in namespaces]
        found = self.search_flat(namespaces, queries, k, min_similarity)
        for slot, entry_id, score, vector in zip(*found, strict=True):
            results[slot].append((entry_id, score, vector))
        return results

    def search_flat(
        self,
        namespaces: Sequence[str],
        queries: np.ndarray,
        k: int,
        min_similarity: float,
    ) -> tuple[list[int], list[str], list[float], list[np.ndarray]]:
        """``search_many``'s hits as four parallel lists: the query's row,
        the entry id, the cosine and the stored vector, query by query and
        each query's hits in search order. No tuple or list per lookup: the
        batched lookup path takes the columns as they are."""
        slots: list[int] = []
        found_ids: list[str] = []
        found_scores: list[float] = []
        found_vectors: list[np.ndarray] = []
        groups: dict[str, list[int]] = {}
        for i, namespace in enumerate(namespaces):
            groups.setdefault(namespace, []).append(i)
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        with self._lock:
            for namespace, members in groups.items():
                space = self._spaces.get(namespace)
                if space is None:
                    continue
                # Ask for extra rows so tombstones cannot crowd out live neighbours.
                want = min(len(space.ids), k + space.dead)
                block = queries[members] if len(members) < len(namespaces) else queries
                if not space.on_gpu:
                    # Per calling thread (an OpenMP setting of the thread), so
                    # this touches no other thread's FAISS work.
                    small = len(members) * len(space.ids) < _PARALLEL_WORK
                    faiss.omp_set_num_threads(1 if small else self._threads)
                scores, rows = space.index.search(block, want)
                ids, vectors = space.ids, space.vectors
                if space.dead == 0:
                    # No tombstones: at most k rows a query, every one live, so
                    # the hits are the rows at or above the floor, in order.
                    # The floor compared in float64, as a Python float is.
                    keep = (rows >= 0) & (scores.astype(np.float64) >= min_similarity)
                    which, col = np.nonzero(keep)
                    hit_rows = rows[which, col].tolist()
                    slots.extend(map(members.__getitem__, which.tolist()))
                    found_ids.extend(map(ids.__getitem__, hit_rows))
                    found_scores.extend(scores[which, col].tolist())
                    found_vectors.extend(map(vectors.__getitem__, hit_rows))
                    continue
                for slot, row_scores, row_ids in zip(members, scores, rows, strict=True):
                    taken = 0
                    for score, row in zip(row_scores.tolist(), row_ids.tolist(), strict=True):
                        if row < 0 or score < min_similarity:
                            continue
                        entry_id = ids[row]
                        if entry_id is not None:
                            slots.append(slot)
                            found_ids.append(entry_id)
                            found_scores.append(score)
                            found_vectors.append(vectors[row])
                            taken += 1
                            if taken == k:
                                break
        return slots, found_ids, found_scores, found_vectors
