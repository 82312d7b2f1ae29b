"""The verification stage: is this cached question really the same question?

Vector search proposes candidates; the verifier, a small classifier trained by
``python -m cache.train_verifier``, gives each candidate a probability of being
a true paraphrase. An operating point is a threshold on that probability,
chosen on the training split (strict, balanced, aggressive).

The model is plain arrays (standardisation, optional ReLU hidden layer,
logistic output) stored in ``cache/data/verifier.npz``: loading is a few
milliseconds, inference is two small matrix products and fully deterministic,
and serving needs no scikit-learn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.features import TextInfo, pair_feature_matrix, pair_features

DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "verifier.npz"


@dataclass
class Verifier:
    mean: np.ndarray
    scale: np.ndarray
    # Hidden layers as (weights, bias) pairs with ReLU; empty for logistic regression.
    hidden: list[tuple[np.ndarray, np.ndarray]]
    out_w: np.ndarray
    out_b: float
    thresholds: dict[str, float]
    meta: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Verifier:
        with np.load(Path(path) if path else DEFAULT_PATH, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            hidden = [
                (data[f"hidden{i}_w"].astype(np.float32), data[f"hidden{i}_b"].astype(np.float32))
                for i in range(int(meta["n_hidden"]))
            ]
            return cls(
                mean=data["mean"].astype(np.float32),
                scale=data["scale"].astype(np.float32),
                hidden=hidden,
                out_w=data["out_w"].astype(np.float32).reshape(-1),
                out_b=float(data["out_b"]),
                thresholds={k: float(v) for k, v in meta["thresholds"].items()},
                meta=meta,
            )

    def save(self, path: str | Path) -> None:
        meta = dict(self.meta)
        meta["n_hidden"] = len(self.hidden)
        meta["thresholds"] = self.thresholds
        arrays: dict[str, np.ndarray] = {
            "mean": self.mean.astype(np.float32),
            "scale": self.scale.astype(np.float32),
            "out_w": self.out_w.astype(np.float32),
            "out_b": np.asarray(self.out_b, dtype=np.float32),
            "meta": np.asarray(json.dumps(meta, sort_keys=True)),
        }
        for i, (w, b) in enumerate(self.hidden):
            arrays[f"hidden{i}_w"] = w.astype(np.float32)
            arrays[f"hidden{i}_b"] = b.astype(np.float32)
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """Probability of "same question" for each feature row."""
        return self._predict_owned(np.atleast_2d(features).astype(np.float32))

    def _predict_owned(self, x: np.ndarray) -> np.ndarray:
        """``predict_features`` of a float32 matrix the caller gives up: it is
        standardised in place. The same operations as written out with
        temporaries, so the same bits, without allocating a copy of the
        (rows x features) matrix per step."""
        x -= self.mean
        x /= self.scale
        for w, b in self.hidden:
            x = x @ w
            x += b
            np.maximum(x, 0.0, out=x)
        logits = x @ self.out_w + self.out_b
        # Clipped: far-out logits would overflow exp() for no change in the result.
        return 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -50.0, 50.0)))

    def score(
        self, query_vec: np.ndarray, query: str, cand_vecs: np.ndarray, cand_texts: list[str]
    ) -> np.ndarray:
        """Probabilities for one query against several candidates."""
        if not cand_texts:
            return np.zeros(0)
        qinfo = TextInfo(query)
        rows = [
            pair_features(query_vec, cand_vecs[i], qinfo, TextInfo(cand_texts[i]))
            for i in range(len(cand_texts))
        ]
        return self.predict_features(np.vstack(rows))

    def score_pairs(
        self,
        query_vecs: np.ndarray,
        query_infos: list[TextInfo],
        cand_vecs: np.ndarray,
        cand_infos: list[TextInfo],
    ) -> np.ndarray:
        """Probabilities for many (query, candidate) pairs at once, row ``i``
        pairing ``query_vecs[i]`` with ``cand_vecs[i]``: what ``score`` gives
        one pair at a time, in one feature build and one MLP call."""
        if not cand_infos:
            return np.zeros(0)
        # The feature matrix is built here for this call alone: scored in place.
        return self._predict_owned(
            pair_feature_matrix(query_vecs, cand_vecs, query_infos, cand_infos)
        )

    def threshold(self, operating_point: str) -> float:
        try:
            return self.thresholds[operating_point]
        except KeyError:
            raise ValueError(
                f"unknown operating point {operating_point!r}; known: {sorted(self.thresholds)}"
            ) from None
