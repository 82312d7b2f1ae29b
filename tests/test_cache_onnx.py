"""The ONNX Runtime embedder gives torch's vectors, in input order, and is reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cache import onnx_encoder
from cache.embedder import Embedder

TEXTS = [
    "How do I learn to play the guitar as an adult?",
    "hi",
    "What is the capital of France, and why was it chosen over Lyon in the middle ages?",
    "Is it safe to eat raw cookie dough?",
    "",
    "What's 2+2?",
] * 3


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[Embedder, Embedder, Path]:
    cache_dir = tmp_path_factory.mktemp("onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BEARPAW_ONNX_CACHE", str(cache_dir))
        mp.setattr(onnx_encoder, "_encoders", {})  # a fresh export into cache_dir
        fast = Embedder(runtime="onnx")
    return fast, Embedder(runtime="torch"), cache_dir


def test_onnx_is_used_and_matches_torch(both: tuple[Embedder, Embedder, Path]) -> None:
    fast, reference, cache_dir = both
    assert fast.runtime == "onnx" and reference.runtime == "torch"
    assert len(list(cache_dir.glob("*.onnx"))) == 1
    a = fast.encode(TEXTS, batch_size=4)  # several batches, mixed lengths
    b = reference.encode(TEXTS)
    assert a.shape == b.shape == (len(TEXTS), 384) and a.dtype == np.float32
    # Same vectors row by row: order restored after the length sort.
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_single_text_and_empty_list(both: tuple[Embedder, Embedder, Path]) -> None:
    fast, reference, _ = both
    np.testing.assert_allclose(fast.encode([TEXTS[0]]), reference.encode([TEXTS[0]]), atol=1e-5)
    assert fast.encode([]).shape == (0, 384)


def test_a_second_encoder_reuses_the_exported_graph(
    both: tuple[Embedder, Embedder, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, reference, cache_dir = both
    monkeypatch.setenv("BEARPAW_ONNX_CACHE", str(cache_dir))
    monkeypatch.setattr(onnx_encoder, "_encoders", {})
    exported = {p: p.stat().st_mtime_ns for p in cache_dir.glob("*.onnx")}

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("the graph on disk should have been reused")

    monkeypatch.setattr(onnx_encoder.torch.onnx, "export", no_export)
    again = Embedder(runtime="onnx")
    assert again.runtime == "onnx"
    assert {p: p.stat().st_mtime_ns for p in cache_dir.glob("*.onnx")} == exported
    np.testing.assert_allclose(again.encode(TEXTS[:2]), reference.encode(TEXTS[:2]), atol=1e-5)


def test_falls_back_to_torch_without_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_encoder, "available", lambda: False)
    embedder = Embedder(runtime="onnx")
    assert embedder.runtime == "torch"
    assert embedder.encode(["hi"]).shape == (1, 384)
