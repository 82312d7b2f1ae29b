"""The shipped verifier: loads, is deterministic, and rejects near misses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cache.embedder import Embedder
from cache.eval import evaluate, format_report
from cache.features import LEXICAL_NAMES, TextInfo, lexical_features
from cache.verifier import Verifier


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier.load()


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def prob(verifier: Verifier, embedder: Embedder, a: str, b: str) -> float:
    u, v = embedder.encode([a, b])
    return float(verifier.score(u, a, v[None, :], [b])[0])


def test_operating_points_are_ordered(verifier: Verifier) -> None:
    t = verifier.thresholds
    assert set(t) == {"strict", "balanced", "aggressive"}
    assert t["strict"] >= t["balanced"] >= t["aggressive"]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I learn Python?", "How do I learn Java?"),
        ("What is the capital of France?", "What is the capital of Germany?"),
        ("How much does an iPhone 12 cost?", "How much does an iPhone 13 cost?"),
        ("Is it safe to eat raw eggs?", "Is it not safe to eat raw eggs?"),
    ],
)
def test_near_misses_are_rejected(verifier: Verifier, embedder: Embedder, a: str, b: str) -> None:
    assert prob(verifier, embedder, a, b) < verifier.threshold("balanced")


def test_paraphrase_scores_above_near_miss(verifier: Verifier, embedder: Embedder) -> None:
    para = prob(
        verifier,
        embedder,
        "How can I learn Python quickly?",
        "What is the fastest way to learn Python?",
    )
    near = prob(
        verifier, embedder, "How can I learn Python quickly?", "How can I learn Java quickly?"
    )
    assert para > near


def test_score_is_symmetric_and_deterministic(verifier: Verifier, embedder: Embedder) -> None:
    a, b = "Why is the sky blue?", "What makes the sky look blue?"
    forward = prob(verifier, embedder, a, b)
    assert forward == prob(verifier, embedder, a, b)
    assert forward == pytest.approx(prob(verifier, embedder, b, a), abs=1e-6)


def test_lexical_signals() -> None:
    feats = dict(
        zip(
            LEXICAL_NAMES,
            lexical_features(
                TextInfo("Why did Rome fall in 476?"), TextInfo("How did Rome not fall in 1453?")
            ),
            strict=True,
        )
    )
    assert feats["numbers_differ"] == 1.0
    assert feats["negation_differ"] == 1.0
    assert feats["wh_differ"] == 1.0
    assert feats["caps_differ"] == 0.0  # "Rome" on both sides; first words ignored


def test_save_load_roundtrip(verifier: Verifier, tmp_path: Path) -> None:
    path = tmp_path / "v.npz"
    verifier.save(path)
    again = Verifier.load(path)
    x = np.random.default_rng(0).normal(size=(8, verifier.mean.shape[0])).astype(np.float32)
    assert np.array_equal(verifier.predict_features(x), again.predict_features(x))
    assert again.thresholds == verifier.thresholds


def test_eval_reports_every_operating_point(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BEARPAW_EMBED_CACHE", str(tmp_path / "emb"))
    pairs = [
        ("How do I learn Python?", "What is the best way to learn Python?", True),
        ("How do I learn Python?", "How do I learn Java?", False),
        ("What is the capital of France?", "Which city is the capital of France?", True),
        ("What is the capital of France?", "What is the capital of Spain?", False),
        ("Why is the sky blue?", "What makes the sky blue?", True),
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"a": a, "b": b, "same": s}) + "\n" for a, b, s in pairs))
    report = evaluate(str(data), split="all")
    names = [r.name for r in report.results]
    assert names == [
        "cosine>=0.85",
        "cosine>=0.90",
        "cosine>=0.95",
        "strict",
        "balanced",
        "aggressive",
    ]
    text = format_report(report)
    assert "whole file" in text
    assert "strict" in text and "balanced" in text and "aggressive" in text
    assert report.recommendation and report.recommendation in text
