"""Evaluate cache matching on labeled pairs: ``python -m cache.eval FILE.jsonl``.

Each line is ``{"a": ..., "b": ..., "same": bool}``. A pair counts as "served
from cache" when the cosine passes ``min_similarity`` and the verifier accepts
it at the operating point — exactly the decision a lookup makes. Plain cosine
thresholds are reported alongside as the baseline.

By default only the held-out split (every 5th line) is scored: the verifier
was trained and its thresholds chosen on the other lines, so scoring those
would flatter it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np

from cache.config import CacheSettings
from cache.embedder import Embedder
from cache.features import feature_matrix
from cache.metrics import Score, cache_predictions, score
from cache.pairs import SPLIT_MODULUS, embed_pairs, load_pairs, split_mask
from cache.verifier import Verifier

COSINE_BASELINES = (0.85, 0.90, 0.95)
VERIFIER_POINTS = ("strict", "balanced", "aggressive")
# The precision a cache answer must reach before we recommend serving it.
RECOMMEND_PRECISION = 0.95
# Below this recall an operating point serves too few semantic hits to matter.
USEFUL_RECALL = 0.05

_SPLIT_LABELS = {
    "heldout": f"held-out split (every {SPLIT_MODULUS}th line; never seen by the verifier)",
    "train": "TRAINING split (the verifier was fitted here: optimistic)",
    "all": "whole file (includes the verifier's training lines: optimistic)",
}


@dataclass
class OperatingPointResult:
    name: str
    kind: str  # "cosine" | "verifier"
    threshold: float
    score: Score


@dataclass
class EvalReport:
    path: str
    split: str
    pairs: int
    positives: int
    min_similarity: float
    results: list[OperatingPointResult] = field(default_factory=list)
    verifier_ms_per_lookup: float | None = None
    recommendation: str = ""


def _time_verifier(
    verifier: Verifier,
    u: np.ndarray,
    v: np.ndarray,
    a: list[str],
    b: list[str],
    k: int,
    samples: int = 300,
) -> float:
    """Milliseconds the verifier adds to one lookup scoring ``k`` candidates."""
    n = min(samples, len(a))
    if n == 0:
        return 0.0
    started = time.perf_counter()
    for i in range(n):
        rows = [(i + j) % len(a) for j in range(k)]
        # Like a live lookup: tokenise the query and candidates, build features, score.
        verifier.score(u[i], a[i], v[rows], [b[r] for r in rows])
    return (time.perf_counter() - started) * 1000 / n


def evaluate(
    path: str, settings: CacheSettings | None = None, split: str = "heldout"
) -> EvalReport:
    settings = settings or CacheSettings()
    pairs = load_pairs(path)
    rows = split_mask(pairs, split)
    u, v = embed_pairs(
        pairs, Embedder(settings.embedder, settings.device, settings.embedder_runtime)
    )
    u, v = u[rows], v[rows]
    a = [t for t, keep in zip(pairs.a, rows, strict=True) if keep]
    b = [t for t, keep in zip(pairs.b, rows, strict=True) if keep]
    truth = pairs.same[rows]
    x = feature_matrix(u, v, a, b)
    cosine = x[:, 0]
    report = EvalReport(path, split, len(a), int(truth.sum()), settings.min_similarity)
    for t in COSINE_BASELINES:
        report.results.append(
            OperatingPointResult(f"cosine>={t:.2f}", "cosine", t, score(cosine >= t, truth))
        )
    try:
        verifier = Verifier.load(settings.verifier_path)
    except FileNotFoundError:
        report.recommendation = "no verifier file: run `python -m cache.train_verifier`"
        return report
    prob = verifier.predict_features(x)
    for name in VERIFIER_POINTS:
        t = verifier.threshold(name)
        predicted = cache_predictions(cosine, prob, settings.min_similarity, t)
        report.results.append(OperatingPointResult(name, "verifier", t, score(predicted, truth)))
    report.verifier_ms_per_lookup = _time_verifier(verifier, u, v, a, b, settings.search_k)
    report.recommendation = _recommend(report)
    return report


def _recommend(report: EvalReport) -> str:
    verified = [r for r in report.results if r.kind == "verifier"]
    safe = [
        r
        for r in verified
        if r.score.precision >= RECOMMEND_PRECISION and r.score.recall >= USEFUL_RECALL
    ]
    if safe:
        best = max(safe, key=lambda r: r.score.recall)
        return (
            f"recommend '{best.name}': highest recall ({best.score.recall:.3f}) with precision "
            f">= {RECOMMEND_PRECISION:.2f} on this split"
        )
    # Nothing is both safe and useful: say so rather than pretend.
    precise = max(verified, key=lambda r: (r.score.precision, r.score.recall))
    useful = max(verified, key=lambda r: r.score.f1)
    return (
        f"recommend 'strict' where a wrong answer is unacceptable: no operating point reaches "
        f"precision {RECOMMEND_PRECISION:.2f} at recall >= {USEFUL_RECALL:.2f} on this split "
        f"(most precise: '{precise.name}' {precise.score.precision:.3f} at recall "
        f"{precise.score.recall:.3f}); '{useful.name}' has the best F1 "
        f"({useful.score.precision:.3f} precision, {useful.score.recall:.3f} recall)"
    )


def format_report(r: EvalReport) -> str:
    lines = [
        f"cache eval: {r.path}",
        f"scored on: {_SPLIT_LABELS.get(r.split, r.split)}",
        f"pairs: {r.pairs} ({r.positives} same)   vector gate for verifier rows: "
        f"cosine >= {r.min_similarity:.2f}",
        "",
        f"{'operating point':<18}{'kind':<10}{'threshold':>10}{'precision':>11}{'recall':>8}"
        f"{'F1':>7}{'served':>8}",
    ]
    for res in r.results:
        s = res.score
        lines.append(
            f"{res.name:<18}{res.kind:<10}{res.threshold:>10.3f}{s.precision:>11.3f}"
            f"{s.recall:>8.3f}{s.f1:>7.3f}{s.predicted:>8d}"
        )
    if r.verifier_ms_per_lookup is not None:
        lines.append("")
        lines.append(f"verifier cost: {r.verifier_ms_per_lookup:.3f} ms per lookup")
    lines.append("")
    lines.append(r.recommendation)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--split", choices=("heldout", "train", "all"), default="heldout")
    args = parser.parse_args(argv)
    print(format_report(evaluate(args.path, split=args.split)))


if __name__ == "__main__":
    main()
