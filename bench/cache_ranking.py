"""Why the wrong-hit bound cannot beat a hindsight threshold on QQP: measured.

Issue 13 asks the online bound (cache/bound.py) to serve more hits at δ = 0.05
than the best fixed threshold whose precision is ≥ 0.95 *in hindsight*. With
the same score that is impossible by construction (the hindsight threshold is
the largest top-scored set still ≥ 0.95 precise; an online rule must also
prove its region first), so this script asks whether any cheap ranking, or
any cheaper proof, could close the gap. It prints, for two slices of
``qqp-pairs-dev.jsonl``:

* A: the last 5,000 lines (4/5 of them in the verifier's training split, so
  its scores there are optimistic) and B: the held-out lines (every 5th, never
  seen by the verifier), behind the cache's vector gate;
* the wrong share among each score's top-k candidates and the hindsight best
  fixed thresholds;
* the cost of proof (cache/simulate.py's ``proof_ceiling``): the verdicts a 95 %
  bound needs at the region's own wrong rate, and the hits left afterwards;
* combined rankings (logistic regression and gradient boosting over the
  verifier's logit, the cosine and the lexical features), fitted by 5-fold
  cross-validation *on B itself* — more labels than any online fit has, so an
  optimistic estimate of what combining could give on unseen pairs;
* how often a lookup's question was already seen earlier in the stream (what
  per-entry statistics, as in vCache, would have to learn from);
* the share of nearly identical pairs (character-trigram Jaccard ≥ 0.95)
  labelled "different": a floor under any score's wrong rate;
* two other bounds tried on A and B (5 orders): traffic-weighted bins with a Kish
  effective sample size (Korn–Graubard), and a bound on the served mixture
  that spends the slack of the served region on the bin just below it.

    python bench/cache_ranking.py [--pairs FILE]   # about 1 min with embeddings memoised

Embeddings are memoised on disk ($BEARPAW_EMBED_CACHE), like
``bearpaw cache simulate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import beta

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache.bound import VERIFIER_GRID, Calibration  # noqa: E402
from cache.config import CacheSettings  # noqa: E402
from cache.embedder import Embedder  # noqa: E402
from cache.features import LEXICAL_NAMES, feature_matrix  # noqa: E402
from cache.pairs import embed_pairs, load_pairs  # noqa: E402
from cache.simulate import COSINE_GRID, _best_cut, proof_ceiling  # noqa: E402
from cache.verifier import Verifier  # noqa: E402

DEFAULT_PAIRS = "/work/shared/data/qqp-pairs-dev.jsonl"
ORDERS = (None, 1, 2, 3, 4)


def top_k_wrong(score: np.ndarray, same: np.ndarray, ks: tuple[int, ...]) -> str:
    order = np.argsort(-score, kind="stable")
    wrong = np.cumsum(~same[order])
    return "  ".join(f"top {k}: {100 * wrong[k - 1] / k:4.1f} %" for k in ks if k <= len(order))


def describe(name: str, score: np.ndarray, same: np.ndarray, grid: tuple[float, ...]) -> None:
    print(f"  {name:<26} {top_k_wrong(score, same, (25, 50, 100, 200, 400))}")
    for delta in (0.05, 0.02, 0.01):
        t, n, w = _best_cut(score, same, 1 - delta)
        c = proof_ceiling(name, score, same, grid, delta)
        needed = "can never be proven" if c.needed is None else f"needs {c.needed} verdicts"
        cut = "none" if t is None else f"{t:.4f}"
        print(
            f"    δ={delta:<5g} hindsight: {n:>5} hits ({w} wrong) at ≥ {cut:<7}"
            f" proof: region ≥ {c.threshold} has {c.lookups} lookups, {100 * c.rate:.2f} %"
            f" wrong, {needed} -> about {c.hits} hits left"
        )


def cross_fitted(x: np.ndarray, y: np.ndarray, make, seed: int) -> np.ndarray:  # noqa: ANN001
    from sklearn.model_selection import StratifiedKFold

    out = np.zeros(len(y))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y):
        out[test] = make().fit(x[train], y[train]).predict_proba(x[test])[:, 1]
    return out


def repeats(a: list[str], b: list[str], rows: np.ndarray, gate: np.ndarray) -> tuple[int, int]:
    """Gated lookups, and those whose question (either side) came up earlier."""
    seen: set[str] = set()
    hits = total = 0
    for i in rows:
        qa, qb = " ".join(a[i].lower().split()), " ".join(b[i].lower().split())
        if gate[i]:
            total += 1
            hits += qa in seen or qb in seen
        seen.update((qa, qb))
    return total, hits


# ------------------------------------------------------------- other bounds
class KishStratified(Calibration):
    """Bins weighted by their lookups (not their verdicts), the weighted rate
    bounded by Clopper–Pearson at the Kish effective sample size."""

    def region_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        if self._bounds is None:
            c = self.counts.astype(np.float64)
            lookups, n, wrong = c[:, 0], c[:, 1], c[:, 2]
            uppers = np.ones(len(lookups))
            for i in range(len(lookups)):
                li, ni, ki = lookups[i:], n[i:], wrong[i:]
                if li.sum() == 0 or np.any((li > 0) & (ni == 0)):
                    continue
                per_verdict = np.where(ni > 0, li / li.sum() / np.maximum(ni, 1), 0.0)
                rate = float((per_verdict * ki).sum())
                n_eff = min(1.0 / float((per_verdict**2 * ni).sum()), float(ni.sum()))
                k_eff = rate * n_eff
                if k_eff < n_eff:
                    uppers[i] = float(beta.ppf(1 - self.alpha, k_eff + 1, n_eff - k_eff))
            self._bounds = (uppers, np.cumsum(n[::-1])[::-1].astype(np.int64))
        return self._bounds


def mixture_upper(served: np.ndarray, n: np.ndarray, wrong: np.ndarray, alpha: float) -> float:
    """Bound on the realised wrong rate of the hits served so far: per-bin rates
    weighted by served counts, Kish effective size, plus the served hits' own
    binomial noise."""
    used = served > 0
    if not used.any():
        return 0.0
    if np.any(used & (n == 0)):
        return 1.0
    w = served[used] / served[used].sum()
    rate = float((w * wrong[used] / n[used]).sum())
    n_eff = 1.0 / (float((w**2 / n[used]).sum()) + 1.0 / served[used].sum())
    k_eff = rate * n_eff
    return 1.0 if k_eff >= n_eff else float(beta.ppf(1 - alpha, k_eff + 1, n_eff - k_eff))


def replay(
    score: np.ndarray, same: np.ndarray, delta: float, seed: int | None, variant: str
) -> tuple[int, int]:
    order = np.arange(len(same))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(order)
    cal = (KishStratified if variant == "kish" else Calibration)(VERIFIER_GRID)
    served_by_bin = np.zeros(len(VERIFIER_GRID))
    served = wrong = 0
    for i in order:
        s, b = float(score[i]), cal.bin_of(float(score[i]))
        decision = cal.decide(s, delta)
        action = decision.action
        if variant == "mixture" and action == "miss" and decision.threshold is not None:
            below = int(np.searchsorted(cal.grid, decision.threshold)) - 1
            if b is not None and b == below:
                trial = served_by_bin.copy()
                trial[b] += 1
                c = cal.counts.astype(np.float64)
                if mixture_upper(trial, c[:, 1], c[:, 2], cal.alpha) <= delta:
                    action = "serve"
        if action == "serve":
            served += 1
            wrong += not same[i]
            if b is not None:
                served_by_bin[b] += 1
        else:
            cal.add(s, bool(same[i]), explored=action == "explore")
    return served, wrong


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=DEFAULT_PAIRS)
    args = parser.parse_args(argv)
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    settings = CacheSettings()
    pairs = load_pairs(args.pairs)
    u, v = embed_pairs(
        pairs, Embedder(settings.embedder, settings.device, settings.embedder_runtime)
    )
    features = feature_matrix(u, v, pairs.a, pairs.b)
    prob = Verifier.load(settings.verifier_path).predict_features(features)
    cosine = features[:, 0].astype(np.float64)
    gate = cosine >= settings.min_similarity
    index = np.arange(len(pairs))
    slices = {
        "A (last 5,000 lines; 4/5 in the verifier's training split)": index >= len(pairs) - 5000,
        "B (held-out lines, never seen by the verifier)": pairs.heldout,
    }
    for name, rows_mask in slices.items():
        m = rows_mask & gate
        y = pairs.same[m]
        print(f"\n{name}: {int(m.sum())} lookups with a candidate, {int((~y).sum())} wrong")
        describe("verifier", prob[m], y, VERIFIER_GRID)
        describe("cosine", cosine[m], y, COSINE_GRID)
        total, seen = repeats(pairs.a, pairs.b, np.nonzero(rows_mask)[0], gate)
        print(f"  lookups whose question came up earlier in the stream: {seen} of {total}")

    m = pairs.heldout & gate
    y = pairs.same[m]
    p = np.clip(prob[m], 1e-6, 1 - 1e-6)
    x = np.c_[np.log(p / (1 - p)), features[m, : 2 + len(LEXICAL_NAMES)]]
    print("\ncombined rankings on B, 5-fold cross-fitted on B itself (3 fold seeds):")
    makers = {
        "logistic (verifier logit + cosine + lexical)": lambda: LogisticRegression(
            C=1.0, max_iter=2000
        ),
        "gradient boosting (same inputs)": lambda: HistGradientBoostingClassifier(
            max_iter=150, learning_rate=0.05, max_depth=3
        ),
    }
    print(
        f"  {'verifier alone':<46} hindsight hits at precision ≥ 0.95: {_best_cut(p, y, 0.95)[1]}"
    )
    for label, make in makers.items():
        results = []
        for seed in range(3):
            score = cross_fitted(x, y, make, seed)
            ceiling = proof_ceiling(label, score, y, VERIFIER_GRID, 0.05)
            results.append((_best_cut(score, y, 0.95)[1], ceiling.hits))
        print(
            f"  {label:<46} hindsight hits at precision ≥ 0.95: "
            f"{', '.join(str(h) for h, _ in results)}; proof leaves at δ = 0.05: "
            f"{', '.join(str(c) for _, c in results)}"
        )

    char3 = features[:, 2 + LEXICAL_NAMES.index("char3_jaccard")]
    near = gate & (char3 >= 0.95)
    print(
        f"\nnearly identical pairs (character-trigram Jaccard ≥ 0.95): {int(near.sum())}, "
        f"labelled different: {100 * float((~pairs.same[near]).mean()):.1f} %"
    )

    for name, rows_mask in slices.items():
        m = rows_mask & gate
        print(f"\nother bounds on {name[0]}, δ = 0.05, 5 orders of its lookups: hits (wrong)")
        for variant in ("pooled", "kish", "mixture"):
            runs = [replay(prob[m], pairs.same[m], 0.05, seed, variant) for seed in ORDERS]
            worst = max(w / s if s else 0.0 for s, w in runs)
            print(
                f"  {variant:<8} "
                + ", ".join(f"{s} ({w})" for s, w in runs)
                + f"   min {min(s for s, _ in runs)}, worst realised {100 * worst:.2f} %"
            )
    print(json.dumps({"pairs": args.pairs, "lines": len(pairs)}))


if __name__ == "__main__":
    main()
