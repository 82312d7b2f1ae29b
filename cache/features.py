"""Pair features for the verifier: what the cosine alone cannot see.

Embeddings blur exactly the details that make two questions different
("learn Python" vs "learn Java", "in 2015" vs "in 2016", "can" vs "can't"), so
the verifier sees both embedding interactions and cheap lexical signals aimed
at those details. Every feature is symmetric in (a, b): the cache must not
care which side was stored first.
"""

from __future__ import annotations

import re

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_CAPITALISED = re.compile(r"\b[A-Z][A-Za-z0-9]*(?:[.\-][A-Za-z0-9]+)*")
_NEGATIONS = frozenset(
    {"not", "no", "never", "none", "nothing", "nobody", "neither", "nor", "without"}
)
_WH_WORDS = ("what", "why", "how", "when", "where", "who", "which", "whom", "whose", "is", "can")
_STOPWORDS = frozenset(
    "a an the of to in on for at by with and or is are was were be been am do does did i"
    " you he she it we they my your me our this that these those what how why when where"
    " who which whom can could should would will shall may might must have has had from"
    " as into about there their its if so than then".split()
)

LEXICAL_NAMES = (
    "token_jaccard",
    "content_jaccard",
    "bigram_jaccard",
    "char3_jaccard",
    "len_ratio_chars",
    "len_ratio_tokens",
    "log_len_min",
    "sym_diff_content",
    "numbers_differ",
    "numbers_sym_diff",
    "caps_differ",
    "caps_jaccard",
    "negation_differ",
    "wh_differ",
    "identical_normalised",
)


class TextInfo:
    """Per-text tokenisation, computed once and reused across candidates."""

    __slots__ = (
        "lower",
        "tokens",
        "token_set",
        "content",
        "bigrams",
        "char3",
        "numbers",
        "caps",
        "negations",
        "wh",
    )

    def __init__(self, text: str) -> None:
        self.lower = " ".join(text.lower().split())
        self.tokens = _TOKEN.findall(self.lower)
        self.token_set = frozenset(self.tokens)
        # Set arithmetic instead of a generator: the same set, a fraction of the cost.
        self.content = self.token_set - _STOPWORDS
        self.bigrams = frozenset(zip(self.tokens, self.tokens[1:], strict=False))
        squeezed = " ".join(self.tokens)
        self.char3 = frozenset([squeezed[i : i + 3] for i in range(max(0, len(squeezed) - 2))])
        self.numbers = frozenset(n.replace(",", "") for n in _NUMBER.findall(text))
        # The first word is capitalised by grammar, not because it is a name.
        words = text.split()
        rest = " ".join(words[1:]) if words else ""
        self.caps = frozenset(c.lower() for c in _CAPITALISED.findall(rest))
        self.negations = sum(1 for t in self.tokens if t in _NEGATIONS or t.endswith("n't"))
        self.wh = next((t for t in self.tokens if t in _WH_WORDS), "")


# np.log1p of the small counts the features take, looked up: numpy's scalar
# call costs about a microsecond, three times per candidate of every lookup
# (math.log1p is cheaper but differs from numpy's in the last bit).
_LOG1P = [float(np.log1p(i)) for i in range(512)]


def _log1p(n: int) -> float:
    return _LOG1P[n] if n < 512 else float(np.log1p(n))


def _jaccard(x: frozenset, y: frozenset) -> float:
    if not x and not y:
        return 1.0
    # |x ∪ y| from the sizes: building the union set cost as much as the
    # intersection, for every candidate of every lookup.
    both = len(x & y)
    return both / (len(x) + len(y) - both)


def _sym_diff_size(x: frozenset, y: frozenset) -> int:
    return len(x) + len(y) - 2 * len(x & y)


def _ratio(x: float, y: float) -> float:
    big = max(x, y)
    return 1.0 if big == 0 else min(x, y) / big


def lexical_features(a: TextInfo, b: TextInfo) -> list[float]:
    """The ``LEXICAL_NAMES`` features, in that order."""
    return [
        _jaccard(a.token_set, b.token_set),
        _jaccard(a.content, b.content),
        _jaccard(a.bigrams, b.bigrams),
        _jaccard(a.char3, b.char3),
        _ratio(len(a.lower), len(b.lower)),
        _ratio(len(a.tokens), len(b.tokens)),
        _log1p(min(len(a.tokens), len(b.tokens))),
        _log1p(_sym_diff_size(a.content, b.content)),
        float(a.numbers != b.numbers),
        _log1p(_sym_diff_size(a.numbers, b.numbers)),
        float(a.caps != b.caps),
        _jaccard(a.caps, b.caps),
        float((a.negations > 0) != (b.negations > 0)),
        float(a.wh != b.wh),
        float(a.lower == b.lower),
    ]


def pair_features(u: np.ndarray, v: np.ndarray, a: TextInfo, b: TextInfo) -> np.ndarray:
    """Feature row for one pair of unit embeddings and their texts.

    Layout: [cosine, cosine², lexical..., |u-v| (dim), u*v (dim)].
    """
    cosine = float(np.dot(u, v))
    head = np.asarray([cosine, cosine * cosine, *lexical_features(a, b)], dtype=np.float32)
    return np.concatenate([head, np.abs(u - v), u * v]).astype(np.float32, copy=False)


def feature_matrix(
    u: np.ndarray, v: np.ndarray, texts_a: list[str], texts_b: list[str]
) -> np.ndarray:
    """Stack ``pair_features`` for many pairs (training and evaluation)."""
    infos: dict[str, TextInfo] = {}

    def info(text: str) -> TextInfo:
        found = infos.get(text)
        if found is None:
            found = infos[text] = TextInfo(text)
        return found

    rows = [
        pair_features(u[i], v[i], info(texts_a[i]), info(texts_b[i])) for i in range(len(texts_a))
    ]
    return np.vstack(rows) if rows else np.zeros((0, 2 + len(LEXICAL_NAMES)), np.float32)


def pair_feature_matrix(
    u: np.ndarray, v: np.ndarray, infos_a: list[TextInfo], infos_b: list[TextInfo]
) -> np.ndarray:
    """``pair_features`` for row ``i`` of ``u`` and ``v`` with ``infos_a[i]`` and
    ``infos_b[i]``, stacked: the embedding columns are computed for all pairs
    at once, so a batch of lookups pays the Python cost of the lexical
    features only."""
    n = len(infos_a)
    dim = u.shape[1] if u.ndim == 2 else 0
    out = np.empty((n, 2 + len(LEXICAL_NAMES) + 2 * dim), dtype=np.float32)
    if n == 0:
        return out
    u = np.asarray(u, dtype=np.float32)
    v = np.asarray(v, dtype=np.float32)
    # Row-wise dot products in float32, like np.dot of two float32 vectors.
    cosine = np.einsum("ij,ij->i", u, v).astype(np.float64)
    out[:, 0] = cosine
    out[:, 1] = cosine * cosine
    head = 2 + len(LEXICAL_NAMES)
    out[:, 2:head] = [lexical_features(a, b) for a, b in zip(infos_a, infos_b, strict=True)]
    np.abs(u - v, out=out[:, head : head + dim])
    np.multiply(u, v, out=out[:, head + dim :])
    return out
