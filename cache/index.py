"""FAISS vector index, one per namespace.

A separate index per namespace is what makes a cross-namespace answer
structurally impossible: a search only ever sees vectors of the namespace it
was asked about. Namespaces are usually small (one tenant × model × system
prompt × parameter set), so exact inner-product search (``IndexFlatIP``) is
both the fastest and the simplest choice.

Removal (TTL, eviction, purge) is rare compared with search and would cost a
full copy in a flat index, so removed rows become tombstones that searches
skip, and a namespace is compacted once a quarter of it is dead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

_GPU_MIN_ROWS = 50_000  # below this a GPU round trip costs more than it saves


def gpu_available() -> bool:
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(get_num_gpus and hasattr(faiss, "StandardGpuResources") and get_num_gpus() > 0)


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
    def __init__(self, dim: int, use_gpu: bool = False) -> None:
        self.dim = dim
        self._use_gpu = use_gpu and gpu_available()
        self._gpu_resources: Any = faiss.StandardGpuResources() if self._use_gpu else None
        self._spaces: dict[str, _NamespaceIndex] = {}
        self._where: dict[str, tuple[str, int]] = {}  # entry id → (namespace, row)

    def __len__(self) -> int:
        return len(self._where)

    @property
    def namespaces(self) -> int:
        return len(self._spaces)

    def _new_space(self, rows: int) -> _NamespaceIndex:
        index = faiss.IndexFlatIP(self.dim)
        if self._use_gpu and rows >= _GPU_MIN_ROWS:
            return _NamespaceIndex(
                faiss.index_cpu_to_gpu(self._gpu_resources, 0, index), on_gpu=True
            )
        return _NamespaceIndex(index)

    def add(self, namespace: str, entry_id: str, vector: np.ndarray) -> None:
        if entry_id in self._where:
            self.remove(entry_id)
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
        located = self._where.get(entry_id)
        if located is None:
            return None
        namespace, row = located
        return self._spaces[namespace].vectors[row]

    def search(
        self, namespace: str, query: np.ndarray, k: int, min_similarity: float
    ) -> list[tuple[str, float]]:
        """Up to ``k`` live entries of ``namespace`` with cosine ≥ ``min_similarity``."""
        space = self._spaces.get(namespace)
        if space is None:
            return []
        # Ask for extra rows so tombstones cannot crowd out live neighbours.
        want = min(len(space.ids), k + space.dead)
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        scores, rows = space.index.search(q, want)
        found: list[tuple[str, float]] = []
        for score, row in zip(scores[0], rows[0], strict=True):
            if row < 0 or score < min_similarity:
                continue
            entry_id = space.ids[row]
            if entry_id is not None:
                found.append((entry_id, float(score)))
                if len(found) == k:
                    break
        return found
