"""Replay labelled pairs through the wrong-hit bound: ``bearpaw cache simulate``.

Each pair is one lookup: ``a`` is the cached entry, ``b`` the new query, and
``same`` stands in for "the fresh answer matches the cached one" (the verdict
an explored or missed lookup would produce). Only the online mechanism of
``cache/bound.py`` decides; nothing is fitted to the file being replayed. The
fixed thresholds printed beside it are chosen *in hindsight*, with the labels
of the whole replay, which no live cache can do: they are the yardstick, not
a competitor that could be deployed. So is the cost of proof printed last
(``proof_ceiling``): how many verdicts a 95 % bound needs before it may serve
a region, at that region's own wrong rate, and about how many hits that
leaves: a rough yardstick for the online rule (which re-checks its bound
after every verdict, so a lucky order proves a region sooner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import beta

from cache.bound import CONFIDENCE, COSINE_GRID, VERIFIER_GRID, Calibration
from cache.config import CacheSettings
from cache.embedder import Embedder
from cache.features import feature_matrix
from cache.pairs import embed_pairs, load_pairs, split_mask
from cache.verifier import Verifier


@dataclass
class Stream:
    cosine: np.ndarray
    score: np.ndarray  # what the bound decides on: verifier probability, else cosine
    same: np.ndarray
    scorer: str  # "verifier" | "cosine"
    prob: np.ndarray | None  # the verifier probability, for the hindsight baseline
    min_similarity: float


@dataclass
class Checkpoint:
    lookups: int
    served: int
    wrong: int
    explored: int
    verdicts: int
    threshold: float | None
    upper: float

    @property
    def wrong_rate(self) -> float:
        return self.wrong / self.served if self.served else 0.0

    @property
    def hit_rate(self) -> float:
        return self.served / self.lookups if self.lookups else 0.0

    @property
    def explore_share(self) -> float:
        """Of the lookups the cache could have answered, the share sent to the backend."""
        would = self.served + self.explored
        return self.explored / would if would else 0.0


@dataclass
class Fixed:
    name: str
    threshold: float | None
    served: int
    wrong: int

    @property
    def precision(self) -> float:
        return 1 - self.wrong / self.served if self.served else 1.0


@dataclass
class ProofCeiling:
    """What proving a region costs, measured on the replay's own labels.

    Before a rule that keeps a 95 % bound may serve the region of scores ≥
    ``threshold``, it must hold about ``needed`` verdicts from it (judged, not
    served) for the bound at the region's wrong rate to come down to δ;
    ``hits`` = ``lookups - needed`` is about what is left to serve.
    """

    name: str
    threshold: float | None
    lookups: int
    rate: float
    needed: int | None  # None: the region's own rate is not below δ
    hits: int


@dataclass
class SimReport:
    max_error: float
    pairs: int
    candidates: int
    positives: int
    checkpoints: list[Checkpoint] = field(default_factory=list)
    fixed: list[Fixed] = field(default_factory=list)
    ceilings: list[ProofCeiling] = field(default_factory=list)

    @property
    def final(self) -> Checkpoint:
        return self.checkpoints[-1]


def load_stream(
    path: str,
    settings: CacheSettings | None = None,
    start: int = 0,
    limit: int | None = None,
    use_verifier: bool = True,
    split: str = "all",
) -> Stream:
    """Scores for pairs ``start .. start+limit`` of the file (embeddings memoised
    on disk), keeping only the lines of ``split``: ``heldout`` (every 5th line,
    never seen by the shipped verifier's training when the file is the one it
    was trained on), ``train`` or ``all``."""
    settings = settings or CacheSettings()
    pairs = load_pairs(path)
    u, v = embed_pairs(
        pairs, Embedder(settings.embedder, settings.device, settings.embedder_runtime)
    )
    stop = len(pairs) if limit is None else min(len(pairs), start + limit)
    keep = np.zeros(len(pairs), dtype=bool)
    keep[start:stop] = True
    rows = np.nonzero(keep & split_mask(pairs, split))[0]
    u, v, same = u[rows], v[rows], pairs.same[rows]
    cosine = np.einsum("ij,ij->i", u, v)
    prob = None
    if use_verifier:
        try:
            verifier = Verifier.load(settings.verifier_path)
        except FileNotFoundError:
            verifier = None
        if verifier is not None:
            a = [pairs.a[i] for i in rows]
            b = [pairs.b[i] for i in rows]
            prob = verifier.predict_features(feature_matrix(u, v, a, b))
    score = prob if prob is not None else cosine
    return Stream(
        cosine,
        np.asarray(score, dtype=np.float64),
        np.asarray(same, dtype=bool),
        "verifier" if prob is not None else "cosine",
        prob,
        settings.min_similarity,
    )


def simulate(
    stream: Stream,
    max_error: float,
    seed: int | None = None,
    every: int = 500,
    method: str = "pooled",
) -> SimReport:
    """Replay the stream (shuffled with ``seed``, file order when None)."""
    order = np.arange(len(stream.same))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(order)
    grid = VERIFIER_GRID if stream.scorer == "verifier" else COSINE_GRID
    cal = Calibration(grid, method=method)
    gate = stream.cosine >= stream.min_similarity
    report = SimReport(max_error, len(order), int(gate.sum()), int(stream.same.sum()))
    served = wrong = explored = verdicts = 0
    for step, i in enumerate(order, start=1):
        if gate[i]:
            decision = cal.decide(float(stream.score[i]), max_error)
            same = bool(stream.same[i])
            if decision.action == "serve":
                served += 1
                wrong += 0 if same else 1
            else:
                # An explored lookup and a miss both get the backend's answer,
                # which is compared with the candidate's: a verdict.
                explored += decision.action == "explore"
                verdicts += 1
                cal.add(float(stream.score[i]), same, explored=decision.action == "explore")
        if step % every == 0 or step == len(order):
            state = cal.summary(max_error)
            report.checkpoints.append(
                Checkpoint(step, served, wrong, explored, verdicts, state.threshold, state.upper)
            )
    report.fixed = hindsight(stream, max_error)
    report.ceilings = proof_ceilings(stream, max_error)
    return report


def _best_cut(score: np.ndarray, same: np.ndarray, target: float) -> tuple[float | None, int, int]:
    """The threshold serving the most pairs with precision ≥ target (hindsight)."""
    order = np.argsort(-score, kind="stable")
    s, ok = score[order], same[order]
    served = np.arange(1, len(s) + 1)
    wrong = np.cumsum(~ok)
    # Only cut between distinct scores: ties are served together or not at all.
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    good = np.nonzero(last_of_tie & ((served - wrong) >= target * served))[0]
    if len(good) == 0:
        return None, 0, 0
    k = int(good[-1])
    return float(s[k]), int(served[k]), int(wrong[k])


def hindsight(stream: Stream, max_error: float) -> list[Fixed]:
    target = 1.0 - max_error
    out = []
    t, n, w = _best_cut(stream.cosine, stream.same, target)
    out.append(Fixed("best fixed cosine", t, n, w))
    if stream.prob is not None:
        gate = stream.cosine >= stream.min_similarity
        t, n, w = _best_cut(stream.prob[gate], stream.same[gate], target)
        out.append(Fixed("best fixed verifier", t, n, w))
    return out


def verdicts_needed(
    rate: float, max_error: float, alpha: float = 1.0 - CONFIDENCE, cap: int = 10_000_000
) -> int | None:
    """The fewest verdicts at wrong rate ``rate`` whose exact one-sided bound at
    level ``alpha`` is ≤ ``max_error``; None when no number of them is.

    The wrong count is taken as ``rate * n``, not rounded (the Clopper–Pearson
    bound's beta quantile accepts a fractional count), which makes the bound
    fall steadily with n: an expectation, so a lucky replay order can get
    there sooner and an unlucky one later.
    """

    def passes(n: int) -> bool:
        k = rate * n
        return float(beta.ppf(1.0 - alpha, k + 1, n - k)) <= max_error

    if not rate < max_error:
        return None
    lo, hi = 0, 1
    while not passes(hi):
        lo, hi = hi, hi * 2
        if hi > cap:
            return None
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi


def proof_ceiling(
    name: str, score: np.ndarray, same: np.ndarray, grid: tuple[float, ...], max_error: float
) -> ProofCeiling:
    """Over the grid's thresholds, the most hits left once the region is proven
    (see ProofCeiling). Where no region can be proven,
    the one closest to it (fewest missing verdicts, else lowest wrong rate)."""

    def key(c: ProofCeiling) -> tuple[int, float, float]:
        missing = math.inf if c.needed is None else max(0, c.needed - c.lookups)
        return c.hits, -missing, -c.rate

    best: ProofCeiling | None = None
    for t in grid:
        region = score >= t
        lookups = int(region.sum())
        if lookups == 0:
            continue
        rate = float((~same[region]).mean())
        needed = verdicts_needed(rate, max_error)
        hits = 0 if needed is None else max(0, lookups - needed)
        c = ProofCeiling(name, float(t), lookups, rate, needed, hits)
        if best is None or key(c) > key(best):
            best = c
    return best or ProofCeiling(name, None, 0, 0.0, None, 0)


def proof_ceilings(stream: Stream, max_error: float) -> list[ProofCeiling]:
    gate = stream.cosine >= stream.min_similarity
    out = [proof_ceiling("cosine", stream.cosine[gate], stream.same[gate], COSINE_GRID, max_error)]
    if stream.prob is not None:
        out.append(
            proof_ceiling(
                "verifier", stream.prob[gate], stream.same[gate], VERIFIER_GRID, max_error
            )
        )
    return out


def format_report(r: SimReport, seed: int | None) -> str:
    lines = [
        f"max error δ = {r.max_error:g}   pairs: {r.pairs} ({r.positives} same)   "
        f"with a candidate (cosine gate): {r.candidates}   order: "
        + ("file" if seed is None else f"shuffled, seed {seed}"),
        "",
        f"{'lookups':>8}{'hits':>7}{'wrong':>7}{'wrong %':>9}{'hit %':>8}{'explored':>10}"
        f"{'explore %':>11}{'verdicts':>10}{'threshold':>11}{'bound %':>9}",
    ]
    for c in r.checkpoints:
        threshold = "-" if c.threshold is None else f"{c.threshold:.3f}"
        lines.append(
            f"{c.lookups:>8}{c.served:>7}{c.wrong:>7}{100 * c.wrong_rate:>9.2f}"
            f"{100 * c.hit_rate:>8.2f}{c.explored:>10}{100 * c.explore_share:>11.1f}"
            f"{c.verdicts:>10}{threshold:>11}{100 * c.upper:>9.2f}"
        )
    lines += ["", f"in hindsight (precision ≥ {1 - r.max_error:.2f} on this replay's labels):"]
    for f in r.fixed:
        threshold = "none" if f.threshold is None else f"{f.threshold:.4f}"
        lines.append(
            f"  {f.name:<22} threshold {threshold:>7}   hits {f.served:>6}   wrong {f.wrong:>5}"
            f"   precision {f.precision:.3f}"
        )
    final = r.final
    lines.append(
        f"  {'online bound':<22} {'':>17}   hits {final.served:>6}   wrong {final.wrong:>5}"
        f"   precision {1 - final.wrong_rate:.3f}   explored {final.explored}"
    )
    if r.ceilings:
        lines += [
            "",
            f"cost of proof (a {100 * CONFIDENCE:.0f} % bound ≤ δ at the region's own wrong rate, "
            "hindsight labels):",
        ]
        for c in r.ceilings:
            if c.threshold is None:
                lines.append(f"  {c.name:<9} no candidates")
                continue
            needed = (
                "no number of verdicts proves it"
                if c.needed is None
                else f"proof needs {c.needed} verdicts"
            )
            lines.append(
                f"  {c.name:<9} region ≥ {c.threshold:<6g} {c.lookups:>5} lookups, "
                f"{100 * c.rate:5.2f} % wrong: {needed}; about {c.hits} hits left"
            )
    return "\n".join(lines)


def format_summary(reports: list[tuple[int | None, SimReport]]) -> str:
    """One line per replay order and the worst realised wrong-hit rate among them."""
    lines = [
        f"{'order':>10}{'hits':>7}{'wrong':>7}{'wrong %':>9}{'explored':>10}{'verdicts':>10}"
        f"{'threshold':>11}"
    ]
    for seed, r in reports:
        c = r.final
        threshold = "-" if c.threshold is None else f"{c.threshold:.3f}"
        lines.append(
            f"{'file' if seed is None else f'seed {seed}':>10}{c.served:>7}{c.wrong:>7}"
            f"{100 * c.wrong_rate:>9.2f}{c.explored:>10}{c.verdicts:>10}{threshold:>11}"
        )
    worst = max(reports, key=lambda item: item[1].final.wrong_rate)[1].final
    hits = [r.final.served for _, r in reports]
    lines.append(
        f"worst realised wrong-hit rate {100 * worst.wrong_rate:.2f} % "
        f"({worst.wrong} of {worst.served}); hits min {min(hits)}, max {max(hits)}"
    )
    return "\n".join(lines)
