"""Labeled question pairs for training and evaluating the verifier.

The split is fixed by line position so that training and evaluation always
agree on which pairs the verifier has seen: of every ``SPLIT_MODULUS`` lines the
last one is held out (20 % of the file), the rest is for training.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache.embedder import Embedder

SPLIT_MODULUS = 5
Split = str  # "train" | "heldout" | "all"


@dataclass
class PairSet:
    a: list[str]
    b: list[str]
    same: np.ndarray  # bool
    heldout: np.ndarray  # bool, the fixed evaluation split

    def __len__(self) -> int:
        return len(self.a)


def split_mask(pairs: PairSet, split: Split) -> np.ndarray:
    """Boolean row mask for ``split`` ("train", "heldout" or "all")."""
    if split == "train":
        return ~pairs.heldout
    if split == "heldout":
        return pairs.heldout.copy()
    if split == "all":
        return np.ones(len(pairs), dtype=bool)
    raise ValueError(f"unknown split {split!r}")


def load_pairs(path: str | os.PathLike[str]) -> PairSet:
    """Read every ``{"a", "b", "same"}`` line; rows carry their split membership.

    The whole file is always loaded (and embedded) so that the on-disk
    embedding memo is shared by training and evaluation; callers slice with
    :func:`split_mask`.
    """
    a: list[str] = []
    b: list[str] = []
    same: list[bool] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            a.append(str(row["a"]))
            b.append(str(row["b"]))
            same.append(bool(row["same"]))
    index = np.arange(len(a))
    heldout = index % SPLIT_MODULUS == SPLIT_MODULUS - 1
    return PairSet(a, b, np.asarray(same, dtype=bool), heldout)


def _embedding_cache_path(pairs: PairSet, model: str) -> Path:
    digest = hashlib.sha256(model.encode())
    for a, b in zip(pairs.a, pairs.b, strict=True):
        digest.update(a.encode())
        digest.update(b"\0")
        digest.update(b.encode())
        digest.update(b"\1")
    root = Path(os.environ.get("BEARPAW_EMBED_CACHE", Path.home() / ".cache" / "bearpaw"))
    return root / f"pairs-{digest.hexdigest()[:20]}.npz"


def embed_pairs(
    pairs: PairSet, embedder: Embedder, use_disk_cache: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Embed both sides of every pair.

    Encoding 40k questions takes minutes on two cores; the vectors depend only on
    the model and the texts, so they are memoised on disk for re-runs.
    """
    cache_file = _embedding_cache_path(pairs, embedder.name)
    if use_disk_cache and cache_file.exists():
        data = np.load(cache_file)
        return data["u"], data["v"]
    # Many questions repeat across pairs; encode each distinct text once.
    unique = sorted(set(pairs.a) | set(pairs.b))
    position = {text: i for i, text in enumerate(unique)}
    vectors = embedder.encode(unique, batch_size=128)
    u = vectors[[position[t] for t in pairs.a]]
    v = vectors[[position[t] for t in pairs.b]]
    if use_disk_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, u=u, v=v)
        os.replace(tmp, cache_file)
    return u, v
