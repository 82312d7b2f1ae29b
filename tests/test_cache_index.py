"""FAISS index per namespace: isolation, removal and compaction."""

import numpy as np
import pytest

from cache.index import SemanticIndex


def unit(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_search_never_crosses_namespaces() -> None:
    index = SemanticIndex(8)
    index.add("ns-a", "e1", unit(1))
    assert index.search("ns-a", unit(1), k=4, min_similarity=0.9)[0][0] == "e1"
    assert index.search("ns-b", unit(1), k=4, min_similarity=-1.0) == []


def test_min_similarity_and_removal() -> None:
    index = SemanticIndex(8)
    index.add("ns", "near", unit(1))
    index.add("ns", "far", -unit(1))
    found = index.search("ns", unit(1), k=4, min_similarity=0.5)
    assert [eid for eid, _ in found] == ["near"]
    index.remove("near")
    assert index.search("ns", unit(1), k=4, min_similarity=0.5) == []
    assert len(index) == 1


def test_tombstones_are_compacted_and_results_stay_correct() -> None:
    index = SemanticIndex(8)
    for i in range(200):
        index.add("ns", f"e{i}", unit(i))
    for i in range(150):
        index.remove(f"e{i}")
    assert len(index) == 50
    for i in range(150, 200):
        found = index.search("ns", unit(i), k=1, min_similarity=0.99)
        assert found and found[0][0] == f"e{i}"
        assert np.allclose(index.vector(f"e{i}"), unit(i))


def test_last_entry_removed_drops_namespace() -> None:
    index = SemanticIndex(8)
    index.add("ns", "e", unit(0))
    index.remove("e")
    assert index.namespaces == 0


def test_torch_backend_finds_what_faiss_finds(monkeypatch) -> None:
    """A namespace past the GPU size moves to the torch matrix-product index
    (run on the CPU here); its answers equal FAISS's flat index, removals and
    compaction included."""
    import cache.index as index_module

    monkeypatch.setattr(index_module, "_GPU_MIN_ROWS", 64)
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    on_torch = SemanticIndex(16, gpu_backend="torch")
    on_faiss = SemanticIndex(16)
    for i, v in enumerate(vectors):
        on_torch.add("ns", f"e{i}", v)
        on_faiss.add("ns", f"e{i}", v)
    for i in range(0, 300, 7):  # tombstones, then a compaction
        on_torch.remove(f"e{i}")
        on_faiss.remove(f"e{i}")
    assert isinstance(on_torch._spaces["ns"].index, index_module.TorchFlatIP)
    for q in vectors[:40]:
        got = on_torch.search("ns", q, 5, 0.0)
        want = on_faiss.search("ns", q, 5, 0.0)
        assert [e for e, _ in got] == [e for e, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)


@pytest.mark.parametrize("tombstones", [False, True])
def test_search_flat_equals_brute_force(tombstones: bool) -> None:
    """The batch search's columns: per query (in any namespace order) the
    live rows of its namespace at or above the floor, best first, at most k,
    with their stored vectors. Without tombstones the hits are picked by a
    mask over the whole result matrix, with them row by row; both must give
    the exact inner-product answer."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(3, 16)).astype(np.float32)
    index = SemanticIndex(16)
    vectors: dict[str, np.ndarray] = {}
    for i in range(300):
        v = centres[i % 3] + 0.5 * rng.normal(size=16).astype(np.float32)
        v /= np.linalg.norm(v)
        vectors[f"e{i}"] = v
        index.add(f"ns{i % 2}", f"e{i}", v)
    if tombstones:
        for i in range(0, 300, 5):
            index.remove(f"e{i}")
            del vectors[f"e{i}"]
    assert any(s.dead for s in index._spaces.values()) == tombstones
    queries = centres[rng.integers(0, 3, 40)] + 0.5 * rng.normal(size=(40, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    namespaces = [f"ns{j % 3}" for j in range(40)]  # ns2 holds nothing
    k, floor = 4, 0.6
    slots, ids, scores, found = index.search_flat(namespaces, queries, k, floor)
    assert len(slots) == len(ids) == len(scores) == len(found) > 0
    for j, namespace in enumerate(namespaces):
        live = [e for e in vectors if int(e[1:]) % 2 == int(namespace[2:])]
        sims = {e: float(np.float32(vectors[e] @ queries[j])) for e in live}
        want = sorted((e for e in live if sims[e] >= floor), key=lambda e: -sims[e])[:k]
        mine = [n for n, slot in enumerate(slots) if slot == j]
        assert [ids[n] for n in mine] == want
        for n in mine:
            assert abs(scores[n] - sims[ids[n]]) < 1e-5
            np.testing.assert_array_equal(found[n], vectors[ids[n]])
        assert [(e, s) for e, s, _ in index.search_many(namespaces, queries, k, floor)[j]] == [
            (ids[n], scores[n]) for n in mine
        ]
