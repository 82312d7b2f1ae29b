"""Precision / recall bookkeeping shared by training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Score:
    precision: float
    recall: float
    f1: float
    predicted: int
    positives: int


def score(predicted: np.ndarray, truth: np.ndarray) -> Score:
    predicted = np.asarray(predicted, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    tp = int(np.sum(predicted & truth))
    n_pred = int(predicted.sum())
    n_pos = int(truth.sum())
    # No predictions at all is a vacuously precise but useless operating point.
    precision = tp / n_pred if n_pred else 1.0
    recall = tp / n_pos if n_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Score(precision, recall, f1, n_pred, n_pos)


def cache_predictions(
    cosine: np.ndarray, prob: np.ndarray | None, min_similarity: float, threshold: float
) -> np.ndarray:
    """What the cache would serve: the vector gate and, if given, the verifier."""
    gate = cosine >= min_similarity
    return gate if prob is None else gate & (prob >= threshold)


def threshold_for_precision(
    cosine: np.ndarray,
    prob: np.ndarray,
    truth: np.ndarray,
    min_similarity: float,
    target: float,
) -> float:
    """Lowest verifier threshold whose end-to-end precision stays ≥ ``target``.

    Candidates are ranked by verifier probability; the answer is the cut with
    the most accepted pairs whose precision meets the target, ignoring cuts
    too small (< 50 pairs) for their precision to mean anything.
    """
    gated = cosine >= min_similarity
    p = prob[gated]
    t = truth[gated].astype(bool)
    order = np.argsort(-p, kind="stable")
    p, t = p[order], t[order]
    precision = np.cumsum(t) / np.arange(1, len(t) + 1)
    min_support = 50
    passing = np.nonzero(precision[min_support - 1 :] >= target)[0]
    if len(passing) == 0:
        return 1.0
    k = int(passing[-1]) + min_support
    return float(p[k - 1])
