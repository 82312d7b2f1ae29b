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
_WH_SET = frozenset(_WH_WORDS)
_BE_U32 = np.dtype(">u4")
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
        "sizes",
    )

    def __init__(self, text: str) -> None:
        self.lower = " ".join(text.lower().split())
        tokens = self.tokens = _TOKEN.findall(self.lower)
        self.token_set = frozenset(tokens)
        # Set arithmetic instead of a generator: the same set, a fraction of the cost.
        self.content = self.token_set - _STOPWORDS
        self.bigrams = frozenset(zip(tokens, tokens[1:], strict=False))
        # Character trigrams of the tokens joined by spaces, each as the
        # integer of its three bytes (the tokens are ASCII): the same sets as
        # of 3-character strings, intersected about twice as fast, and kept
        # for every cache entry in about half the memory.
        squeezed = " ".join(tokens).encode("ascii")
        if len(squeezed) >= 3:
            # Window i read as the big-endian 4 bytes from i (one zero byte
            # padded on), shifted right by 8: bytes i, i+1, i+2. Two numpy
            # calls instead of nine.
            windows = np.ndarray((len(squeezed) - 2,), _BE_U32, squeezed + b"\0", 0, (1,))
            self.char3 = frozenset((windows >> 8).tolist())
        else:
            self.char3 = frozenset()
        numbers = _NUMBER.findall(text)
        if "," in text:
            numbers = [n.replace(",", "") for n in numbers]
        self.numbers = frozenset(numbers)
        # The first word is capitalised by grammar, not because it is a name.
        # (What follows the first word as it stands: the pattern cannot match
        # whitespace, so it finds what it found in the words re-joined by one
        # space.)
        words = text.split(None, 1)
        rest = words[1] if len(words) > 1 else ""
        self.caps = frozenset(map(str.lower, _CAPITALISED.findall(rest)))
        # No negation word ends in "n't", so the two counts add up; and a
        # token ending in "n't" is in the text.
        negations = sum(map(_NEGATIONS.__contains__, tokens))
        if "n't" in self.lower:
            negations += sum(t.endswith("n't") for t in tokens)
        self.negations = negations
        self.wh = next((t for t in tokens if t in _WH_SET), "")
        # What lexical_matrix needs of each side, gathered once per text.
        self.sizes = (
            len(self.lower),
            len(tokens),
            len(self.token_set),
            len(self.content),
            len(self.bigrams),
            len(self.char3),
            len(self.numbers),
            len(self.caps),
            negations > 0,
        )


# np.log1p of the small counts the features take, looked up: numpy's scalar
# call costs about a microsecond, three times per candidate of every lookup
# (math.log1p is cheaper but differs from numpy's in the last bit).
_LOG1P = [float(np.log1p(i)) for i in range(512)]
_LOG1P_ARRAY = np.asarray(_LOG1P, dtype=np.float64)


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


def _log1p_many(n: np.ndarray) -> np.ndarray:
    """``_log1p`` of each count: the same table, the same fallback."""
    out = _LOG1P_ARRAY[np.minimum(n, len(_LOG1P) - 1)]
    big = np.flatnonzero(n >= len(_LOG1P))
    for i in big.tolist():
        out[i] = _log1p(int(n[i]))
    return out


def _jaccard_many(both: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    union = x + y - both
    # Integer counts divided in float64, as Python divides two ints: the same bits.
    return np.divide(both, union, out=np.ones(len(both)), where=union > 0)


def _ratio_many(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    big = np.maximum(x, y)
    return np.divide(np.minimum(x, y), big, out=np.ones(len(big)), where=big > 0)


def lexical_matrix(infos_a: list[TextInfo], infos_b: list[TextInfo]) -> np.ndarray:
    """``lexical_features`` of ``infos_a[i]`` and ``infos_b[i]`` as row ``i``
    (float64): the same numbers, with Python left only for what needs the
    sets themselves (six intersection sizes and two string comparisons a
    pair); every ratio, logarithm and flag is computed for all pairs at once."""
    n = len(infos_a)
    if n == 0:
        return np.zeros((0, len(LEXICAL_NAMES)))
    # One loop, one tuple a pair: the intersections and the comparisons that
    # cannot be had from sizes.
    both = np.array(
        [
            (
                len(a.token_set & b.token_set),
                len(a.content & b.content),
                len(a.bigrams & b.bigrams),
                len(a.char3 & b.char3),
                len(a.numbers & b.numbers) if a.numbers and b.numbers else 0,
                len(a.caps & b.caps) if a.caps and b.caps else 0,
                a.wh != b.wh,
                a.lower == b.lower,
            )
            for a, b in zip(infos_a, infos_b, strict=True)
        ],
        dtype=np.int64,
    )
    sa = np.array([a.sizes for a in infos_a], dtype=np.int64)
    sb = np.array([b.sizes for b in infos_b], dtype=np.int64)
    # Columns of sizes: 0 chars, 1 tokens, 2 token set, 3 content, 4 bigrams,
    # 5 char3, 6 numbers, 7 caps, 8 has a negation.
    content_diff = sa[:, 3] + sb[:, 3] - 2 * both[:, 1]
    numbers_diff = sa[:, 6] + sb[:, 6] - 2 * both[:, 4]
    caps_diff = sa[:, 7] + sb[:, 7] - 2 * both[:, 5]
    out = np.empty((n, len(LEXICAL_NAMES)))
    out[:, 0] = _jaccard_many(both[:, 0], sa[:, 2], sb[:, 2])
    out[:, 1] = _jaccard_many(both[:, 1], sa[:, 3], sb[:, 3])
    out[:, 2] = _jaccard_many(both[:, 2], sa[:, 4], sb[:, 4])
    out[:, 3] = _jaccard_many(both[:, 3], sa[:, 5], sb[:, 5])
    out[:, 4] = _ratio_many(sa[:, 0], sb[:, 0])
    out[:, 5] = _ratio_many(sa[:, 1], sb[:, 1])
    out[:, 6] = _log1p_many(np.minimum(sa[:, 1], sb[:, 1]))
    out[:, 7] = _log1p_many(content_diff)
    # Two sets differ exactly when their symmetric difference is not empty.
    out[:, 8] = numbers_diff > 0
    out[:, 9] = _log1p_many(numbers_diff)
    out[:, 10] = caps_diff > 0
    out[:, 11] = _jaccard_many(both[:, 5], sa[:, 7], sb[:, 7])
    out[:, 12] = sa[:, 8] != sb[:, 8]
    out[:, 13] = both[:, 6]
    out[:, 14] = both[:, 7]
    return out


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
    ``infos_b[i]``, stacked: every column is computed for all pairs at once
    (``lexical_matrix``), so a batch of lookups pays Python only for the set
    intersections."""
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
    out[:, 2:head] = lexical_matrix(infos_a, infos_b)
    # In place: no (pairs x dim) temporaries, the same float32 results.
    diff = out[:, head : head + dim]
    np.subtract(u, v, out=diff)
    np.abs(diff, out=diff)
    np.multiply(u, v, out=out[:, head + dim :])
    return out
