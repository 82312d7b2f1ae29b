"""The batched lookup path gives what one lookup at a time gave.

Concurrent lookups are embedded, searched and verified as one batch
(SemanticCache._search_batch); these tests hold its answers, on a few hundred
real embeddings in several namespaces with tombstones, against a brute-force
reimplementation of the one-by-one path (exact inner product over the live
entries of the namespace, then Verifier.score per lookup) and against the same
lookups made one at a time.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine

import cache.index as index_module
from cache.config import CacheSettings
from cache.index import SemanticIndex
from cache.keys import canonical_hash
from cache.semantic_cache import Consultation, SemanticCache

pytestmark = pytest.mark.asyncio(loop_scope="session")

NAMESPACES = [f"ns-{i}" for i in range(4)]
TOPICS = ["Rome", "jazz", "volcanoes", "chess", "Python", "bees", "tax law", "bread"]
ASPECTS = ["history", "basics", "best books", "common mistakes", "cost", "origin"]
FORMS = [
    "What should I know about the {a} of {t}?",
    "Can you explain the {a} of {t} to a beginner?",
    "Give me a short overview of the {a} of {t}.",
    "Why do people care about the {a} of {t}?",
    "Tell me something surprising about the {a} of {t} in {y}.",
    "How would you summarise the {a} of {t} for a child?",
]


def stored_texts() -> list[str]:
    texts = []
    for f, form in enumerate(FORMS):
        for a, aspect in enumerate(ASPECTS):
            for t, topic in enumerate(TOPICS):
                texts.append(form.format(a=aspect, t=topic, y=1990 + (a * 8 + t + f) % 30))
    return texts  # 288 distinct questions


def query_texts(stored: list[str]) -> list[tuple[int, str]]:
    """(namespace, text): rewordings asked in the entry's own namespace,
    the next one, and a few questions nothing is stored for."""
    queries = []
    for j, text in enumerate(stored):
        reworded = text.lower().replace("can you explain", "please explain")
        if j % 5 == 0:
            reworded = reworded.replace("19", "20")  # another year: a near miss
        queries.append((j % 4 if j % 9 else (j + 1) % 4, reworded))
    queries += [(i % 4, f"What is the boiling point of liquid number {i}?") for i in range(12)]
    return queries


def chat(question: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": question}], "temperature": 0}


def answer(entry_id: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": entry_id}}]}


_VECTORS: dict[str, np.ndarray] = {}


async def _filled(tmp_path: Path, backend: str, verifier: bool) -> SemanticCache:
    settings = CacheSettings(
        sweep_interval_s=3600,
        use_gpu=False,
        # Waiting for company makes every gathered lookup part of a large batch.
        batch_max_wait_ms=50,
        batch_max_size=64,
        verifier_path=None if verifier else str(tmp_path / "no-verifier.npz"),
    )
    cache = SemanticCache(settings, create_engine(f"sqlite:///{tmp_path / 'c.db'}"))
    await cache.start()
    assert cache._index is not None
    if backend == "torch":
        # The matrix-product index the GPU uses, run on the CPU.
        cache._index = SemanticIndex(cache._index.dim, gpu_backend="torch")
    stored = stored_texts()
    missing = [t for t in stored if t not in _VECTORS]
    if missing:
        _VECTORS.update(zip(missing, await cache._embed_texts(missing), strict=True))
    for j, text in enumerate(stored):
        namespace = NAMESPACES[j % 4]
        eid = f"e{j:03d}"
        exact = canonical_hash(namespace, chat(text))
        response = json.dumps(answer(eid))
        cache._remember(eid, namespace, "t", exact, text, response, 2e9, _VECTORS[text])
    for j in range(0, len(stored), 7):  # tombstones the searches must skip
        cache._forget(f"e{j:03d}")
    if backend == "torch":
        assert any(
            isinstance(s.index, index_module.TorchFlatIP) for s in cache._index._spaces.values()
        )
    return cache


def _reference(cache: SemanticCache, namespace: str, query: str) -> tuple[str, float, float | None]:
    """The one-by-one path, independently: exact cosine against every live
    entry of the namespace, the top ``search_k`` above ``min_similarity``,
    then the verifier on those, one lookup at a time."""
    vector = cache._recent[query]
    ids = [e for e, entry in cache._entries.items() if entry.namespace == namespace]
    if not ids:
        return "", 0.0, None
    matrix = np.vstack([cache._index.vector(e) for e in ids])  # type: ignore[union-attr]
    sims = matrix.astype(np.float64) @ vector.astype(np.float64)
    order = [i for i in np.argsort(-sims, kind="stable") if sims[i] >= 0.8][:4]
    if not order:
        return "", 0.0, None
    if cache._verifier is None:
        return ids[order[0]], float(sims[order[0]]), None
    texts = [cache._entries[ids[i]].query for i in order]
    scores = cache._verifier.score(vector, query, matrix[order], texts)
    best = int(np.argmax(scores))
    return ids[order[best]], float(sims[order[best]]), float(scores[best])


def _summary(found: Consultation) -> tuple[str, str, float, float | None]:
    """Action, the entry served or proposed (its answer is its id), cosine, score."""
    if found.hit is not None:
        content = found.hit.response["choices"][0]["message"]["content"]
        return "hit", content, found.hit.similarity, found.hit.verifier_score
    if found.candidate is not None:
        c = found.candidate
        return "candidate", c.response["choices"][0]["message"]["content"], c.similarity, c.score
    return "miss", "", 0.0, None


@pytest.mark.parametrize(
    ("backend", "verifier"), [("faiss", True), ("torch", True), ("faiss", False)]
)
async def test_batched_lookups_equal_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, verifier: bool
) -> None:
    monkeypatch.setattr(index_module, "_GPU_MIN_ROWS", 32)
    cache = await _filled(tmp_path, backend, verifier)
    try:
        queries = query_texts(stored_texts())
        before = cache.stats()["embed_batches"]
        batched = await asyncio.gather(*(cache.consult(NAMESPACES[n], chat(q)) for n, q in queries))
        # Really batched: a handful of model calls for ~300 lookups.
        assert cache.stats()["embed_batches"] - before <= len(queries) // 16
        # One at a time (each its own batch; the vectors now come from the
        # recent-vector cache, so only search and scoring differ).
        single = [await cache.consult(NAMESPACES[n], chat(q)) for n, q in queries]

        kinds = {"hit": 0, "candidate": 0, "miss": 0}
        fallback = cache.settings.fallback_min_similarity
        threshold = cache._verifier.threshold("balanced") if cache._verifier else fallback
        for (n, q), got, alone in zip(queries, batched, single, strict=True):
            g, s = _summary(got), _summary(alone)
            assert g[:2] == s[:2], q
            assert g[2] == pytest.approx(s[2], abs=1e-5)
            assert (g[3] is None) == (s[3] is None)
            if g[3] is not None:
                assert g[3] == pytest.approx(s[3], abs=1e-5)
            kinds[g[0]] += 1
            eid, sim, score = _reference(cache, NAMESPACES[n], q)
            if g[0] == "miss":
                # No candidate, or one whose bin straddles the threshold (not judged).
                assert eid == "" or (score if score is not None else sim) < threshold, q
                continue
            assert g[1] == eid, q
            assert g[2] == pytest.approx(sim, abs=1e-5)
            # Without a verifier a candidate is scored by its cosine; a hit has no score.
            want = score if score is not None or g[0] == "hit" else sim
            if want is None:
                assert g[3] is None
            else:
                assert g[3] == pytest.approx(want, abs=1e-5)
            assert (g[0] == "hit") == ((score if score is not None else sim) >= threshold)
        # The comparison means something only if every outcome occurs often.
        assert kinds["hit"] >= 40, kinds
        assert kinds["miss"] >= 12, kinds
        if verifier:
            assert kinds["candidate"] >= 5, kinds
    finally:
        await cache.close()


async def test_embedding_in_a_batch_equals_embedding_alone(tmp_path: Path) -> None:
    """The model's side of batching: a text's vector does not depend on the
    batch it was encoded in (padding is masked), up to float rounding."""
    cache = await _filled(tmp_path, "faiss", True)
    try:
        texts = [q for _, q in query_texts(stored_texts())[:40]]
        embedder = cache._embedder
        assert embedder is not None
        together = await asyncio.gather(*(embedder.embed(t) for t in texts))
        for text, vector in zip(texts[:8], together[:8], strict=True):
            alone = await cache._embed_texts([text])
            np.testing.assert_allclose(vector, alone[0], atol=2e-5)
    finally:
        await cache.close()


def test_lexical_features_match_their_definition() -> None:
    """The set-size shortcuts (|x ∪ y| and |x △ y| from |x ∩ y|, log1p from a
    table) give exactly the features defined on the sets themselves, which is
    what the verifier was trained on."""
    from cache.features import LEXICAL_NAMES, TextInfo, lexical_features

    def jaccard(x: frozenset, y: frozenset) -> float:
        return 1.0 if not x and not y else len(x & y) / len(x | y)

    texts = stored_texts()[:60] + [q for _, q in query_texts(stored_texts())[-30:]]
    texts += ["", "Not NASA's 3,400 U.S. rockets in 2015?", "isn't it 2016 at NASA"]
    infos = [TextInfo(t) for t in texts]
    for a, b in zip(infos, infos[1:] + infos[:1], strict=True):
        got = dict(zip(LEXICAL_NAMES, lexical_features(a, b), strict=True))
        assert got["token_jaccard"] == jaccard(a.token_set, b.token_set)
        assert got["content_jaccard"] == jaccard(a.content, b.content)
        assert got["bigram_jaccard"] == jaccard(a.bigrams, b.bigrams)
        assert got["char3_jaccard"] == jaccard(a.char3, b.char3)
        assert got["caps_jaccard"] == jaccard(a.caps, b.caps)
        assert got["sym_diff_content"] == float(np.log1p(len(a.content ^ b.content)))
        assert got["numbers_sym_diff"] == float(np.log1p(len(a.numbers ^ b.numbers)))
        assert got["log_len_min"] == float(np.log1p(min(len(a.tokens), len(b.tokens))))
    stop = frozenset({"the", "of", "what", "should", "i", "about"})
    for info in infos:
        assert stop.isdisjoint(info.content)
        assert info.content <= info.token_set


def test_pair_feature_matrix_stacks_pair_features() -> None:
    from cache.features import TextInfo, pair_feature_matrix, pair_features

    rng = np.random.default_rng(3)
    u = rng.normal(size=(20, 384)).astype(np.float32)
    v = rng.normal(size=(20, 384)).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    texts = stored_texts()
    a = [TextInfo(t) for t in texts[:20]]
    b = [TextInfo(t) for t in texts[20:40]]
    got = pair_feature_matrix(u, v, a, b)
    want = np.vstack([pair_features(u[i], v[i], a[i], b[i]) for i in range(20)])
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got[:, 2:], want[:, 2:])
    np.testing.assert_allclose(got[:, :2], want[:, :2], atol=1e-6)


def _edge_texts() -> list[str]:
    texts = stored_texts()[:80] + [q for _, q in query_texts(stored_texts())[-40:]]
    texts += [
        "",
        " ",
        "ab",
        "Not NASA's 3,400 U.S. rockets in 2015?",
        "isn't it 2016 at NASA",
        "Why  don't\tI   Know  NOT Paris\nor\u00a0London?",
        "  leading   and trailing   Spaces  ",
        "Ünïcode Café in São Paulo, 1.5 or 1,500?",
        " ".join(f"w{i}" for i in range(600)),  # counts past the log1p table
        " ".join(f"N{i}" for i in range(300)) + " " + " ".join(str(i) for i in range(600)),
    ]
    return texts


def test_text_info_matches_its_definition() -> None:
    """TextInfo's faster spellings (trigrams as integers, the rest of the
    text after the first word, negations counted in two parts) give the sets
    and counts of the plain definitions."""
    import re

    from cache.features import _CAPITALISED, _NEGATIONS, TextInfo

    for text in _edge_texts():
        info = TextInfo(text)
        squeezed = " ".join(info.tokens)
        trigrams = {squeezed[i : i + 3] for i in range(max(0, len(squeezed) - 2))}
        assert info.char3 == {int.from_bytes(t.encode("ascii"), "big") for t in trigrams}
        words = text.split()
        rest = " ".join(words[1:]) if words else ""
        assert info.caps == {c.lower() for c in _CAPITALISED.findall(rest)}
        assert info.negations == sum(1 for t in info.tokens if t in _NEGATIONS or t.endswith("n't"))
        assert info.tokens == re.findall(r"[a-z0-9]+(?:'[a-z]+)?", " ".join(text.lower().split()))


def test_lexical_matrix_equals_lexical_features() -> None:
    """The batched lexical features are the per-pair ones, bit for bit."""
    from cache.features import TextInfo, lexical_features, lexical_matrix

    infos = [TextInfo(t) for t in _edge_texts()]
    rng = np.random.default_rng(5)
    a = [infos[i] for i in rng.integers(0, len(infos), 600)] + infos
    b = [infos[i] for i in rng.integers(0, len(infos), 600)] + infos[::-1]
    got = lexical_matrix(a, b)
    want = np.array([lexical_features(x, y) for x, y in zip(a, b, strict=True)])
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert lexical_matrix([], []).shape == (0, want.shape[1])


def test_score_pairs_equals_score_one_by_one() -> None:
    """Scoring a batch in place gives Verifier.score's probabilities (one row
    against many in a matrix product may round differently in BLAS)."""
    from cache.features import TextInfo
    from cache.verifier import Verifier

    verifier = Verifier.load()
    texts = _edge_texts()
    rng = np.random.default_rng(9)
    u = rng.normal(size=(len(texts), 384)).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = (u + 0.3 * rng.normal(size=u.shape)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    order = rng.permutation(len(texts))
    infos = [TextInfo(t) for t in texts]
    got = verifier.score_pairs(u, infos, v[order], [infos[j] for j in order])
    want = [
        verifier.score(u[i], texts[i], v[order[i]][None, :], [texts[order[i]]])[0]
        for i in range(len(texts))
    ]
    np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=1e-6)


def test_numeric_threads_cap_the_blas_pools_during_a_batch() -> None:
    from threadpoolctl import threadpool_info

    from cache.threads import blas_limiter, limit_torch_threads

    def blas_threads() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    with blas_limiter(1)():
        assert set(blas_threads()) <= {1}
    assert blas_threads() == before
    with blas_limiter(None)():
        assert blas_threads() == before
    # On the CPU torch's pool runs the model: never capped.
    assert limit_torch_threads(1, "cpu") is False
    assert SemanticIndex(8, threads=1)._threads == 1
    assert SemanticIndex(8)._threads == index_module._OMP_THREADS


async def test_search_batch_gives_candidates_best_first(tmp_path: Path) -> None:
    """_search_batch hands each lookup its candidates best first (verifier
    score, the first in search order among equals), so the loop takes the
    first live one; a candidate whose tokenisation is not remembered is
    tokenised from its entry, and one forgotten since the search is dropped."""
    cache = await _filled(tmp_path, "faiss", True)
    try:
        assert cache._index is not None and cache._verifier is not None
        queries = query_texts(stored_texts())[:120]
        texts = [q for _, q in queries]
        vectors = await cache._embed_texts(texts)
        jobs = [(NAMESPACES[n], q) for n, q in queries]
        got = cache._search_batch(vectors, jobs)
        found = cache._index.search_many([ns for ns, _ in jobs], vectors, 4, 0.8)
        assert sum(map(len, got)) > 200
        for j, (hits, cands) in enumerate(zip(found, got, strict=True)):
            assert sorted(e for e, _, _ in hits) == sorted(e for e, _, _ in cands)
            if not hits:
                continue
            want = cache._verifier.score(
                vectors[j],
                texts[j],
                np.vstack([v for _, _, v in hits]),
                [cache._entries[e].query for e, _, _ in hits],
            )
            best = int(np.argmax(want))
            assert cands[0][0] == hits[best][0]
            assert cands[0][2] == pytest.approx(float(want[best]), abs=1e-6)
            scores = [s for _, _, s in cands]
            assert scores == sorted(scores, reverse=True)
            by_id = {e: s for e, s, _ in hits}
            assert all(sim == by_id[e] for e, sim, _ in cands)
        # Tokenisations dropped for some candidates: recomputed, same answers.
        # An entry gone from memory (forgotten between search and scoring):
        # no longer a candidate.
        firsts = [c[0][0] for c in got if c]
        for eid in firsts[:10]:
            del cache._infos[eid]
        gone = firsts[10]
        entry = cache._entries.pop(gone)
        del cache._infos[gone]
        again = cache._search_batch(vectors, jobs)
        for before, after in zip(got, again, strict=True):
            kept = [c for c in before if c[0] != gone]
            # Other rows in the verifier's matrix products: float32 rounding only.
            assert [c[:2] for c in kept] == [c[:2] for c in after]
            for b, a in zip(kept, after, strict=True):
                assert a[2] == pytest.approx(b[2], abs=1e-6)
        cache._entries[gone] = entry
    finally:
        await cache.close()
