"""The wrong-hit bound: serve a semantic hit only where the data say it is safe.

A tenant sets δ, the largest fraction of semantic hits it accepts being wrong.
Every lookup with a semantic candidate ends in one of three ways:

* ``miss``    — the candidate's score is below the current threshold: the
  backend answers, and since that answer is computed anyway, comparing it with
  the candidate's cached answer yields a verdict for free.
* ``serve``   — the score is at or above the threshold: the cached answer goes out.
* ``explore`` — a sampled would-be hit: the backend answers instead (at batch
  priority) and the comparison yields a verdict about exactly the hits being
  served. This is what keeps the bound true as traffic drifts.

Lookups and verdicts are counted per score bin (the cells between consecutive
points of a fixed grid); serving at grid point t means serving every candidate
scoring ≥ t. Two bounds on the wrong-hit rate of that region are available:

``pooled`` (the default): the exact one-sided Clopper–Pearson upper bound
over all verdicts of candidates scoring ≥ t. Verdicts are not a uniform
sample of the region: a bin is judged on every lookup while it lies below the
threshold and only when explored once it is served, and the threshold only
ever serves a bin together with every bin above it, so the share of a bin's
lookups that were judged can only fall as the score rises. The lower scores of
the region are therefore over-represented among its verdicts. Under the one
assumption this bound makes — a higher score is never *more* likely to be
wrong (the verifier and the cosine are scores of "same question") — lower
scores carry the higher wrong rates, so the over-representation can only raise
the pooled rate: the bound errs on the safe side. Pooling every verdict of the
region makes it far tighter than bin-by-bin bounds.

``stratified``: each bin's own Clopper–Pearson bound weighted by the bin's
share of the lookups, a bin with lookups and no verdicts counting as entirely
wrong. It needs no monotonicity, but served bins are judged only when
explored, so their bounds stay wide and it serves little; it is kept for
comparison (``bearpaw cache simulate --method stratified``).

The threshold is the lowest grid point whose bound is ≤ δ. With
``correction="bonferroni"`` every bound is taken at level
``(1 - confidence) / len(grid)`` so that all thresholds' bounds hold together;
the default (``"none"``) takes each at ``1 - confidence``: choosing the lowest
passing threshold, and re-checking after every verdict, make the true
confidence somewhat lower than stated, which ``bearpaw cache simulate``
measures (realised wrong-hit rates over shuffled replays; see
docs/cache-bound.md).

Exploration adapts: a would-be hit is explored with probability
``max(floor, min(1, scale / sqrt(n)))`` where n is the number of verdicts
behind the current threshold, so it is frequent while little is known and
settles to the floor once the bound rests on thousands of verdicts. Sampling
is systematic (a credit accumulates the probability and a lookup is explored
each time it reaches 1), which is independent of whether the candidate is
right, so verdicts stay an unbiased sample, with less variance and
reproducibly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.stats import beta

# Thresholds on the verifier's probability, and on the cosine when the cache
# runs without a verifier. Fixed, not learnt. The pooled bound pays nothing
# for a finer grid (a region's verdicts are pooled whatever the bins), so the
# grid is fine enough for the threshold to land near where the bound reaches
# δ. Changing it changes the meaning of the stored bins: see
# cache/calibration.py's GRID_VERSION.
VERIFIER_GRID: tuple[float, ...] = (
    0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.875, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99,
)  # fmt: skip
COSINE_GRID: tuple[float, ...] = (0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99)
CONFIDENCE = 0.95
# Chosen on lines 0-15,000 of qqp-pairs-dev.jsonl (scale 1 served about a
# third more than 2 there at the same realised wrong-hit rate).
EXPLORE_SCALE = 1.0
EXPLORE_FLOOR = 0.02
METHODS = ("pooled", "stratified")
CORRECTIONS = ("none", "bonferroni")

# The operating points that predate the bound, as δ presets.
PRESETS: dict[str, float] = {"strict": 0.01, "balanced": 0.02, "aggressive": 0.05}


def parse_max_error(value: str | float) -> float:
    """δ from a number in (0, 1) or a preset name; ValueError otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in PRESETS:
            return PRESETS[text]
        try:
            value = float(text)
        except ValueError:
            raise ValueError(
                f"max error must be a number in (0, 1) or one of {', '.join(PRESETS)}"
            ) from None
    delta = float(value)
    if not (0.0 < delta < 1.0) or math.isnan(delta):
        raise ValueError("max error must be greater than 0 and less than 1")
    return delta


@lru_cache(maxsize=65536)  # every lookup moves the weights, rarely a bin's counts
def clopper_pearson_upper(wrong: int, n: int, alpha: float) -> float:
    """Exact one-sided upper bound on a binomial rate at level ``alpha``.

    The p with P(Binomial(n, p) ≤ wrong) = alpha; 1 when nothing is known.
    """
    if n <= 0 or wrong >= n:
        return 1.0
    return float(beta.ppf(1.0 - alpha, wrong + 1, n - wrong))


def clopper_pearson_interval(
    wrong: int, n: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Two-sided exact interval for a binomial rate (for reports)."""
    if n <= 0:
        return 0.0, 1.0
    alpha = (1.0 - confidence) / 2
    low = 0.0 if wrong == 0 else float(beta.ppf(alpha, wrong, n - wrong + 1))
    high = 1.0 if wrong >= n else float(beta.ppf(1.0 - alpha, wrong + 1, n - wrong))
    return low, high


@dataclass(frozen=True)
class Decision:
    action: str  # "serve" | "explore" | "miss"
    threshold: float | None  # the grid point in force; None when nothing may be served
    upper: float  # bound on the wrong-hit rate of serving at that threshold
    verdicts: int  # verdicts behind that bound


class Calibration:
    """Lookups and verdicts per score bin for one tenant, model and scorer, and
    the serve / explore / miss rule they imply.

    Columns of the count arrays: lookups with a candidate in the bin (all of
    them, whatever happened), verdicts, wrong verdicts. ``base`` holds what the
    shared database knew at the last sync and ``fresh`` what this process has
    not written yet; decisions use both.
    """

    LOOKUPS, VERDICTS, WRONG = 0, 1, 2

    def __init__(
        self,
        grid: tuple[float, ...],
        confidence: float = CONFIDENCE,
        explore_scale: float = EXPLORE_SCALE,
        explore_floor: float = EXPLORE_FLOOR,
        method: str = "pooled",
        correction: str = "none",
    ) -> None:
        if method not in METHODS:
            raise ValueError("method must be pooled or stratified")
        if correction not in CORRECTIONS:
            raise ValueError("correction must be none or bonferroni")
        self.grid = np.asarray(grid, dtype=np.float64)
        self.alpha = (1.0 - confidence) / (len(grid) if correction == "bonferroni" else 1)
        self.explore_scale = explore_scale
        self.explore_floor = explore_floor
        self.method = method
        self.base = np.zeros((len(grid), 3), dtype=np.int64)
        self.fresh = np.zeros((len(grid), 3), dtype=np.int64)
        self._bounds: tuple[np.ndarray, np.ndarray] | None = None
        # The first would-be hit after serving becomes possible is explored.
        self._credit = 1.0
        # Process-local outcome counters, for /metrics.
        self.served = 0
        self.explored = 0
        self.explored_wrong = 0
        self.explored_verdicts = 0
        # The δ of the latest decision, so that /metrics can show the bound in force.
        self.last_max_error: float | None = None

    # ----------------------------------------------------------------- evidence
    def bin_of(self, score: float) -> int | None:
        """The bin a score falls in, or None below the grid (never servable)."""
        if not score >= self.grid[0]:  # also rejects NaN
            return None
        return int(np.searchsorted(self.grid, score, side="right") - 1)

    def bin_top(self, score: float) -> float:
        """Upper edge of the score's bin (the next grid point; +inf for the top
        bin; the lowest grid point below the grid)."""
        b = self.bin_of(score)
        if b is None:
            return float(self.grid[0])
        return float(self.grid[b + 1]) if b + 1 < len(self.grid) else math.inf

    def observe(self, score: float) -> None:
        """Counts one lookup whose best candidate had this score."""
        b = self.bin_of(score)
        if b is not None:
            self.fresh[b, self.LOOKUPS] += 1
            self._bounds = None

    def add(self, score: float, correct: bool, explored: bool = False) -> int | None:
        """Counts one verdict; returns its bin (None when below the grid)."""
        if explored:
            self.explored_verdicts += 1
            self.explored_wrong += 0 if correct else 1
        b = self.bin_of(score)
        if b is None:
            return None
        self.fresh[b, self.VERDICTS] += 1
        self.fresh[b, self.WRONG] += 0 if correct else 1
        self._bounds = None
        return b

    def set_base(self, counts: np.ndarray) -> None:
        self.base = np.asarray(counts, dtype=np.int64).reshape(len(self.grid), 3)
        self._bounds = None

    def take_fresh(self) -> np.ndarray:
        """The unwritten counts, handed to the writer and cleared here."""
        out, self.fresh = self.fresh, np.zeros_like(self.fresh)
        self.base = self.base + out  # still counted until the next load replaces base
        self._bounds = None
        return out

    @property
    def counts(self) -> np.ndarray:
        return self.base + self.fresh

    # ------------------------------------------------------------------- bounds
    def region_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per grid point t: the upper bound on the wrong-hit rate of serving
        every candidate scoring ≥ t, and the verdicts it rests on."""
        if self._bounds is None:
            counts = self.counts
            lookups = counts[:, self.LOOKUPS].astype(np.float64)
            n, wrong = counts[:, self.VERDICTS], counts[:, self.WRONG]
            tail_n = np.cumsum(n[::-1])[::-1]
            if self.method == "pooled":
                # All verdicts at or above t in one bound; safe under the
                # monotonicity assumption (see the module docstring).
                tail_wrong = np.cumsum(wrong[::-1])[::-1]
                uppers = np.asarray(
                    [
                        clopper_pearson_upper(int(k), int(m), self.alpha)
                        for k, m in zip(tail_wrong, tail_n, strict=True)
                    ]
                )
            else:
                uppers = self._stratified(lookups, n, wrong)
            self._bounds = (uppers, tail_n)
        return self._bounds

    def _stratified(self, lookups: np.ndarray, n: np.ndarray, wrong: np.ndarray) -> np.ndarray:
        """Each bin's own bound, weighted by the bin's share of the lookups.

        Verdicts are not a uniform sample of the region above a threshold:
        misses below the threshold are all judged, would-be hits only when
        explored. Within one bin, though, every lookup had the same chance of
        a verdict at any moment, so each bin's verdicts are a fair sample of
        that bin; weighting the bins by their traffic gives the region's rate.
        With ``correction="bonferroni"`` all bins hold at once with
        probability ≥ confidence, so every threshold's bound does too. A bin
        with lookups and no verdicts counts as entirely wrong.
        """
        per_bin = np.asarray(
            [
                clopper_pearson_upper(int(k), int(m), self.alpha)
                for k, m in zip(wrong, n, strict=True)
            ]
        )
        tail_lookups = np.cumsum(lookups[::-1])[::-1]
        tail_mass = np.cumsum((lookups * per_bin)[::-1])[::-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            uppers = np.where(tail_lookups > 0, tail_mass / tail_lookups, 1.0)
        return uppers

    def threshold_index(self, max_error: float) -> int | None:
        uppers, _ = self.region_bounds()
        ok = np.nonzero(uppers <= max_error)[0]
        return int(ok[0]) if len(ok) else None

    def summary(self, max_error: float) -> Decision:
        """The threshold in force for δ, without deciding anything."""
        self.last_max_error = max_error
        uppers, n = self.region_bounds()
        i = self.threshold_index(max_error)
        if i is None:
            # Nothing may be served: report the tightest bound there is.
            j = int(np.argmin(uppers))
            return Decision("miss", None, float(uppers[j]), int(n[j]))
        return Decision("miss", float(self.grid[i]), float(uppers[i]), int(n[i]))

    def report(self) -> dict[str, float | int | None]:
        """Figures for /metrics: outcomes, and at the latest δ the wrong rate
        measured among verdicts above the threshold with its bound."""
        explored_low, explored_high = clopper_pearson_interval(
            self.explored_wrong, self.explored_verdicts
        )
        counts = self.counts
        out: dict[str, float | int | None] = {
            "served": self.served,
            "explored": self.explored,
            "explored_verdicts": self.explored_verdicts,
            "explored_wrong": self.explored_wrong,
            "explored_wrong_low": explored_low,
            "explored_wrong_high": explored_high,
            "verdicts": int(counts[:, self.VERDICTS].sum()),
            "max_error": self.last_max_error,
            "threshold": None,
            "region_verdicts": 0,
            "region_wrong_rate": None,
            "upper": None,
        }
        if self.last_max_error is not None:
            state = self.summary(self.last_max_error)
            i = 0 if state.threshold is None else int(np.searchsorted(self.grid, state.threshold))
            n, wrong = counts[i:, self.VERDICTS].sum(), counts[i:, self.WRONG].sum()
            out["threshold"] = state.threshold
            out["region_verdicts"] = int(n)
            out["region_wrong_rate"] = float(wrong / n) if n else None
            out["upper"] = state.upper
        return out

    # ----------------------------------------------------------------- decision
    def explore_probability(self, verdicts: int) -> float:
        p = self.explore_scale / math.sqrt(verdicts) if verdicts > 0 else 1.0
        return max(self.explore_floor, min(1.0, p))

    def decide(self, score: float, max_error: float) -> Decision:
        self.observe(score)
        state = self.summary(max_error)
        if state.threshold is None or not score >= state.threshold:
            return state
        self._credit += self.explore_probability(state.verdicts)
        if self._credit >= 1.0:
            self._credit -= 1.0
            self.explored += 1
            return Decision("explore", state.threshold, state.upper, state.verdicts)
        self.served += 1
        return Decision("serve", state.threshold, state.upper, state.verdicts)
