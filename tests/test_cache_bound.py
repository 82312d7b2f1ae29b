"""The semantic cache's wrong-hit bound: the statistics, the decision rule, the
shared verdict counts, `bearpaw cache simulate` on real labelled pairs, and a
gateway in front of real vLLM exploring a would-be hit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI
from sqlalchemy import create_engine, text

from cache import calibration as calib
from cache.bound import (
    PRESETS,
    VERIFIER_GRID,
    Calibration,
    clopper_pearson_interval,
    clopper_pearson_upper,
    parse_max_error,
)
from cache.simulate import proof_ceiling, verdicts_needed
from cache.verifier import Verifier
from gateway.reports import usage_report
from tests.support.gateway_process import GatewayProcess

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO.parent / "shared" / "data" / "qqp-pairs-dev.jsonl"


# ------------------------------------------------------------------ statistics
def test_clopper_pearson_matches_published_values():
    # No failures in n trials: the exact bound is 1 - alpha^(1/n) ("rule of three").
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(0.0295, abs=1e-4)
    # Textbook exact intervals (e.g. Clopper & Pearson 1934 tables, R's binom.test).
    assert clopper_pearson_upper(1, 10, 0.05) == pytest.approx(0.3942, abs=1e-4)
    low, high = clopper_pearson_interval(1, 10)
    assert (low, high) == (pytest.approx(0.0025, abs=1e-4), pytest.approx(0.4450, abs=1e-4))
    low, high = clopper_pearson_interval(5, 20)
    assert (low, high) == (pytest.approx(0.0866, abs=1e-4), pytest.approx(0.4910, abs=1e-4))
    # Nothing known, or everything wrong: no bound below 1.
    assert clopper_pearson_upper(0, 0, 0.05) == 1.0
    assert clopper_pearson_upper(7, 7, 0.05) == 1.0


def test_max_error_parsing():
    assert parse_max_error("0.02") == 0.02
    assert parse_max_error(" Balanced ") == PRESETS["balanced"] == 0.02
    assert parse_max_error("strict") == 0.01 and parse_max_error("aggressive") == 0.05
    for bad in ("0", "1", "-0.1", "nan", "lots", "", "1.5"):
        with pytest.raises(ValueError):
            parse_max_error(bad)


def _calibration_with(counts: dict[int, tuple[int, int, int]], **kw) -> Calibration:
    """bin index -> (lookups, verdicts, wrong)"""
    cal = Calibration(VERIFIER_GRID, **kw)
    base = np.zeros((len(VERIFIER_GRID), 3), dtype=np.int64)
    for i, row in counts.items():
        base[i] = row
    cal.set_base(base)
    return cal


def test_bins():
    cal = Calibration(VERIFIER_GRID)
    assert VERIFIER_GRID[:5] == (0.5, 0.6, 0.7, 0.75, 0.8) and VERIFIER_GRID[-1] == 0.99
    assert list(VERIFIER_GRID) == sorted(set(VERIFIER_GRID))
    # Rows are keyed by a bin's lower edge in thousandths: edges must stay distinct.
    assert len({round(edge * 1000) for edge in VERIFIER_GRID}) == len(VERIFIER_GRID)
    top = len(VERIFIER_GRID) - 1
    assert [cal.bin_of(s) for s in (0.2, 0.5, 0.69, 0.9, 0.949, 0.95, 0.995, 1.0)] == [
        None,
        0,
        1,
        VERIFIER_GRID.index(0.9),
        VERIFIER_GRID.index(0.925),
        VERIFIER_GRID.index(0.95),
        top,
        top,
    ]
    assert cal.bin_of(float("nan")) is None
    assert [cal.bin_top(s) for s in (0.2, 0.65, 0.93, 0.995)] == [0.5, 0.7, 0.95, float("inf")]


def test_gateway_default_is_the_pooled_bound_without_bonferroni():
    cal = Calibration(VERIFIER_GRID)
    assert cal.method == "pooled" and cal.alpha == pytest.approx(0.05)
    with pytest.raises(ValueError):
        Calibration(VERIFIER_GRID, method="bayes")
    with pytest.raises(ValueError):
        Calibration(VERIFIER_GRID, correction="holm")
    # The stored scorer names the grid: counts binned on another grid are not reused.
    assert calib.scorer_name(None, "m").endswith(f":g{calib.GRID_VERSION}")
    assert calib.scorer_name({"a": 1}, "m").startswith("verifier:")


def test_pooled_bound_pools_every_verdict_of_the_region():
    i90, i95 = VERIFIER_GRID.index(0.9), VERIFIER_GRID.index(0.95)
    # 600 verdicts at [0.9, 0.925) with 12 wrong, 300 at [0.95, 0.97) with 0 wrong.
    cal = _calibration_with({i90: (600, 600, 12), i95: (900, 300, 0)})
    uppers, n = cal.region_bounds()
    assert n[i90] == 900 and n[i95] == 300
    assert uppers[i90] == pytest.approx(clopper_pearson_upper(12, 900, 0.05))
    assert uppers[i95] == pytest.approx(clopper_pearson_upper(0, 300, 0.05))
    # 12 of 900 wrong: the bound (about 2.1 %) passes δ = 0.05 and 0.025, not 0.015.
    assert cal.summary(0.05).threshold == VERIFIER_GRID[0]
    assert cal.summary(0.025).threshold == VERIFIER_GRID[0]
    # From 0.925 up (the bin [0.925, 0.95) is empty) only the 300 right ones count.
    assert cal.summary(0.015).threshold == VERIFIER_GRID[i90 + 1] == 0.925


def _monotone_stream(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and verdicts with P(wrong | score) falling from 60 % to 0.5 %."""
    score = rng.beta(4, 1.2, n)
    p_wrong = 0.005 + 0.6 * (1 - score) ** 2
    return score, rng.random(n) >= p_wrong


@pytest.mark.parametrize("delta", [0.02, 0.05])
def test_realised_wrong_rate_stays_under_delta_on_a_monotone_stream(delta):
    # Under the bound's one assumption (a higher score is never more likely to
    # be wrong) the served hits' realised wrong rate stays ≤ δ, while a
    # threshold is found and most of what it allows is served, not explored.
    for seed in range(5):
        rng = np.random.default_rng(seed)
        score, right = _monotone_stream(rng, 8000)
        cal = Calibration(VERIFIER_GRID)
        served = wrong = explored = 0
        for s, ok in zip(score, right, strict=True):
            decision = cal.decide(float(s), delta)
            if decision.action == "serve":
                served += 1
                wrong += not ok
            else:
                explored += decision.action == "explore"
                cal.add(float(s), bool(ok), explored=decision.action == "explore")
        assert served > 300, (seed, served)
        assert wrong / served <= delta, (seed, wrong, served)
        assert explored < served / 3


def test_nothing_is_served_before_there_is_evidence():
    cal = Calibration(VERIFIER_GRID)
    for score in (0.5, 0.9, 0.999, 1.0):
        decision = cal.decide(score, 0.05)
        assert decision.action == "miss" and decision.threshold is None
        assert decision.upper == 1.0


def test_never_serves_where_the_upper_bound_exceeds_delta():
    rng = np.random.default_rng(7)
    for _ in range(200):
        counts = {}
        for i in range(len(VERIFIER_GRID)):
            n = int(rng.integers(0, 800))
            lookups = n + int(rng.integers(0, 3 * n + 1))
            counts[i] = (lookups, n, int(rng.binomial(n, rng.uniform(0, 0.1))))
        cal = _calibration_with(counts, method=str(rng.choice(["stratified", "pooled"])))
        delta = float(rng.choice([0.01, 0.02, 0.05]))
        for score in rng.uniform(0.4, 1.0, 20):
            decision = cal.decide(float(score), delta)
            # The bounds in force for that decision (its lookup is counted).
            uppers, _ = cal.region_bounds()
            if decision.action in ("serve", "explore"):
                assert decision.upper <= delta
                assert score >= decision.threshold
                i = VERIFIER_GRID.index(decision.threshold)
                # The lowest admissible threshold: every lower one is over δ.
                assert all(u > delta for u in uppers[:i])
            else:
                assert decision.threshold is None or score < decision.threshold
                assert decision.threshold is not None or all(u > delta for u in uppers)


def test_stratified_bound_is_at_the_bonferroni_level_and_weighs_bins_by_traffic():
    # The top bin [0.99, 1] is well verified; the one below has traffic and no verdicts.
    top = len(VERIFIER_GRID) - 1
    cal = _calibration_with(
        {top - 1: (500, 0, 0), top: (1000, 1000, 3)}, method="stratified", correction="bonferroni"
    )
    state = cal.summary(0.05)
    assert state.threshold == VERIFIER_GRID[top] and state.verdicts == 1000
    alpha = 0.05 / len(VERIFIER_GRID)
    assert state.upper == pytest.approx(clopper_pearson_upper(3, 1000, alpha))
    assert state.upper > clopper_pearson_upper(3, 1000, 0.05)
    # Unverified traffic counts as wrong: serving from the bin below would be a third wrong.
    uppers, _ = cal.region_bounds()
    assert uppers[top - 1] == pytest.approx((500 + 1000 * state.upper) / 1500)
    # Bins without traffic weigh nothing.
    assert uppers[0] == pytest.approx(uppers[top - 1])


def test_exploration_shrinks_as_verdicts_accumulate():
    cal = Calibration(VERIFIER_GRID)
    probabilities = [cal.explore_probability(n) for n in (1, 10, 100, 1000, 10_000, 100_000)]
    assert probabilities == sorted(probabilities, reverse=True)
    assert probabilities[0] == 1.0 and probabilities[-1] == cal.explore_floor
    # Fed a stream of right answers, the share explored falls over time.
    explored_per_window = []
    for _window in range(4):
        explored = 0
        for _ in range(2000):
            decision = cal.decide(0.999, 0.02)
            if decision.action != "serve":
                cal.add(0.999, True, explored=decision.action == "explore")
                explored += decision.action == "explore"
        explored_per_window.append(explored)
    assert cal.served > 0
    assert explored_per_window[0] > explored_per_window[1] > explored_per_window[3] > 0


@pytest.mark.parametrize("method", ["pooled", "stratified"])
def test_wrong_verdicts_stop_serving(method):
    i90, i95 = VERIFIER_GRID.index(0.9), VERIFIER_GRID.index(0.95)
    # Below 0.9 most candidates are wrong: nothing there may be served.
    cal = _calibration_with(
        {i90 - 1: (100, 100, 60), i90: (2000, 2000, 0), i95: (2000, 2000, 0)}, method=method
    )
    assert cal.summary(0.01).threshold == 0.9
    for _ in range(100):
        cal.add(0.91, False)
    # [0.925, 0.95) is empty: from 0.925 up only the right verdicts at 0.95+ count.
    assert cal.summary(0.01).threshold == VERIFIER_GRID[i95 - 1] == 0.925
    for _ in range(100):
        cal.add(0.96, False)
    assert cal.summary(0.01).threshold is None
    assert cal.decide(0.999, 0.01).action == "miss"


# --------------------------------------------------------------- shared counts
async def test_verdict_counts_are_shared_through_the_database(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'cal.db'}")
    key = ("ten_a", "tiny", "verifier:x")
    first, second = calib.CalibrationBook(engine), calib.CalibrationBook(engine)
    await first.load()
    await second.load()
    for book, wrong in ((first, False), (second, True)):
        cal = book.get(key, VERIFIER_GRID)
        for _ in range(40):
            cal.observe(0.996)
        for _ in range(30):
            cal.add(0.996, True)
        cal.add(0.996, not wrong)
        cal.add(0.1, False)  # below the grid: never servable, never counted
    await first.sync()
    await second.sync()  # adds to the row the first process wrote
    await first.sync()
    for book in (first, second):
        counts = book.get(key, VERIFIER_GRID).counts
        assert counts[-1].tolist() == [80, 62, 1] and counts[:-1].sum() == 0
    # A restarted process starts from the stored totals.
    third = calib.CalibrationBook(engine)
    await third.load()
    assert third.get(key, VERIFIER_GRID).counts[-1].tolist() == [80, 62, 1]
    assert third.get(("ten_b", "tiny", "verifier:x"), VERIFIER_GRID).counts.sum() == 0
    engine.dispose()


# -------------------------------------------------------------------- simulate
def bearpaw(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BEARPAW_DATA_DIR": str(tmp_path),
        "BEARPAW_EMBED_CACHE": str(tmp_path / "embeddings"),
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_simulate_keeps_the_wrong_hit_rate_under_delta(tmp_path):
    # 2,000 pairs the verifier never saw (its held-out lines: every 5th).
    lines = PAIRS.read_text().splitlines()
    heldout = [line for i, line in enumerate(lines) if i % 5 == 4][-2000:]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(heldout) + "\n")
    # On pairs the verifier never saw, even its scores ≥ 0.9 are about 9 % wrong
    # (QQP's labels are noisy): at δ = 0.05 nothing can be proven safe in 2,000
    # lookups and nothing is served, so the test asks for δ = 0.2.
    out = bearpaw(tmp_path, "cache", "simulate", str(path), "--max-error", "0.2", "--every", "500")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    assert [int(r[0]) for r in rows] == [500, 1000, 1500, 2000]
    lookups, hits, wrong = (int(x) for x in rows[-1][:3])
    assert hits > 0
    assert wrong / hits <= 0.2
    assert "best fixed verifier" in out.stdout and "best fixed cosine" in out.stdout
    # The cost of proof is printed for both scores; what it leaves is part of
    # the region it names.
    proof = re.search(r"verifier\s+region ≥ \S+\s+(\d+) lookups.*about (\d+) hits left", out.stdout)
    assert proof is not None and "cosine    region" in out.stdout
    assert int(proof.group(2)) <= int(proof.group(1))
    bad = bearpaw(tmp_path, "cache", "simulate", str(path), "--max-error", "2")
    assert bad.returncode != 0 and "max-error" in bad.stderr


def test_verdicts_needed_is_the_exact_bound_inverted():
    # No wrong verdicts: the bound is 1 - 0.05^(1/n), ≤ 0.05 from n = 59 on.
    assert verdicts_needed(0.0, 0.05) == 59
    assert clopper_pearson_upper(0, 59, 0.05) <= 0.05 < clopper_pearson_upper(0, 58, 0.05)
    assert verdicts_needed(0.0, 0.01) == 299
    # A region wrong 2.5 % of the time needs a couple of hundred verdicts for δ = 0.05,
    # far more as its rate nears δ, and can never be proven at or above δ.
    n = verdicts_needed(0.025, 0.05)
    assert n is not None and 150 < n < 300
    assert verdicts_needed(0.045, 0.05) > 10 * n
    assert verdicts_needed(0.05, 0.05) is None and verdicts_needed(0.2, 0.05) is None
    rates = [0.0, 0.005, 0.01, 0.02, 0.03, 0.04]
    needed = [verdicts_needed(r, 0.05) for r in rates]
    assert needed == sorted(needed)


def test_proof_ceiling_takes_the_region_with_most_hits_left():
    rng = np.random.default_rng(0)
    # 1,000 lookups scoring 0.99 and never wrong, 1,000 scoring 0.6 and always wrong.
    score = np.r_[np.full(1000, 0.99), np.full(1000, 0.6)]
    same = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    order = rng.permutation(2000)
    c = proof_ceiling("verifier", score[order], same[order], VERIFIER_GRID, 0.05)
    # Every threshold from 0.7 to 0.99 holds the same 1,000 right lookups; the
    # proof takes 59 of them (rule of three), 941 are left.
    assert (c.threshold, c.lookups, c.rate, c.needed, c.hits) == (0.7, 1000, 0.0, 59, 941)
    # Where no region is below δ, nothing is left, and the region shown is the
    # least wrong one.
    same_bad = rng.random(2000) < np.where(score[order] > 0.9, 0.9, 0.5)
    c = proof_ceiling("verifier", score[order], same_bad, VERIFIER_GRID, 0.05)
    assert c.hits == 0 and c.needed is None and c.threshold == 0.7


def test_tenant_max_error_from_the_cli(tmp_path):
    made = bearpaw(tmp_path, "tenants", "create", "acme", "--cache-max-error", "balanced")
    assert made.returncode == 0, made.stderr
    bad = bearpaw(tmp_path, "tenants", "update", "acme", "--cache-max-error", "3")
    assert bad.returncode != 0 and "cache-max-error" in bad.stderr
    assert (
        bearpaw(tmp_path, "tenants", "update", "acme", "--cache-max-error", "0.05").returncode == 0
    )
    listed = json.loads(bearpaw(tmp_path, "tenants", "list", "--json").stdout)
    assert [t["cache_max_error"] for t in listed] == [0.05]


# ------------------------------------------------------------------ end to end
QUESTION = "How do I learn to play the guitar quickly?"
PARAPHRASE = "How can I learn to play guitar quickly?"


@pytest.fixture(scope="module")
def gateway(vllm_server, tmp_path_factory):
    gw = GatewayProcess(
        tmp_path_factory.mktemp("gw-bound"),
        backends=[vllm_server.base_url],
        env={"BEARPAW_CACHE__SWEEP_INTERVAL_S": "0.3"},
    ).start()
    yield gw
    gw.stop()


def ask(client: OpenAI, question: str, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=[{"role": "user", "content": question}],
        max_tokens=8,
        temperature=0,
        **kw,
    )
    return raw.headers, raw.parse()


def _bound(headers) -> dict[str, str]:
    return dict(part.strip().split("=", 1) for part in headers["x-bearpaw-cache-bound"].split(";"))


def _eventually(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_bad_max_error_header_is_refused(gateway, vllm_server):
    key = gateway.create_key("plain")
    gateway.wait_models(key, {"tiny"})
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {key}", "x-bearpaw-cache-max-error": "1.5"},
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "x-bearpaw-cache-max-error" and "less than 1" in error["message"]
    # Per request, a preset name is as good as a number.
    client = OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=120)
    headers, _ = ask(client, QUESTION, extra_headers={"x-bearpaw-cache-max-error": "strict"})
    bound = _bound(headers)
    assert bound["max-error"] == "0.01" and bound["threshold"] == "none"


def test_explored_lookup_is_answered_fresh_and_metered_as_verification(gateway, vllm_server):
    r = gateway.admin("POST", "/admin/tenants", json={"name": "acme", "cache_max_error": 0.05})
    assert r.status_code == 201, r.text
    tenant_id = r.json()["id"]
    assert r.json()["cache_max_error"] == 0.05
    key = gateway.create_key("acme")
    client = OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=120)
    # Evidence from this tenant's past traffic, as another gateway process
    # would have written it: 2,000 right answers in every bin of the grid.
    verifier = Verifier.load()
    scorer = calib.scorer_name(verifier.meta, "all-MiniLM-L6-v2")
    engine = create_engine(gateway.database_url)
    calib.add_counts(
        engine,
        [
            ((tenant_id, "tiny", scorer), round(edge * 1000), 2000, 2000, 0)
            for edge in VERIFIER_GRID
        ],
    )
    headers, _ = ask(client, QUESTION)
    assert headers["x-bearpaw-cache"] == "miss"
    # The gateway adopts the stored counts at its next sweep.
    seen = _eventually(lambda: _bound(ask(client, QUESTION)[0])["threshold"] != "none")
    assert seen
    headers, _ = ask(client, QUESTION)
    assert headers["x-bearpaw-cache-layer"] == "exact"
    bound = _bound(headers)
    assert bound["max-error"] == "0.05" and float(bound["threshold"]) == VERIFIER_GRID[0]
    assert float(bound["upper"]) <= 0.05 and int(bound["verdicts"]) >= 2000 * len(VERIFIER_GRID)

    before = vllm_server.metrics().get("vllm:request_success_total", 0.0)
    headers, fresh = ask(client, PARAPHRASE)
    # The first would-be semantic hit under a bound is explored: the backend answers.
    assert headers["x-bearpaw-cache"] == "verify", headers
    # (At least: the dev vLLM may be shared with other test runs.)
    assert vllm_server.metrics().get("vllm:request_success_total", 0.0) >= before + 1
    assert fresh.usage.completion_tokens > 0
    request_id = headers["x-request-id"]

    def recorded():
        with engine.connect() as conn:
            return conn.execute(
                text(
                    "select cache, prompt_tokens, completion_tokens from usage_records "
                    "where request_id = :r"
                ),
                {"r": request_id},
            ).first()

    row = _eventually(recorded)
    assert row is not None and row[0] == "verify"
    report = usage_report(engine, ["tenant"], tenant="acme")
    (acme,) = report.rows
    assert acme.cache_verifications == 1
    assert acme.verification_tokens == row[1] + row[2] > 0
    assert report.as_dict()["totals"]["verification_tokens"] == acme.verification_tokens

    # The verdict reaches the calibration, /metrics and, at the next sweep, the database.
    def metric(name: str) -> float | None:
        body = httpx.get(gateway.url + "/metrics", timeout=10).text
        for labels, value in re.findall(rf"^{name}\{{(.*)\}} (\S+)$", body, re.M):
            if dict(re.findall(r'(\w+)="([^"]*)"', labels)) == {
                "tenant": tenant_id,
                "model": "tiny",
            }:
                return float(value)
        return None

    assert _eventually(lambda: metric("bearpaw_cache_bound_verified_hits_total") == 1.0)
    assert metric("bearpaw_cache_bound_max_error") == 0.05
    assert metric("bearpaw_cache_wrong_hit_rate_upper") <= 0.05
    assert metric("bearpaw_cache_bound_verdicts") >= 2000 * len(VERIFIER_GRID) + 1

    def stored() -> int:
        counts = calib.load_counts(engine).get((tenant_id, "tiny", scorer), {})
        return sum(n for _, n, _ in counts.values())

    assert _eventually(lambda: stored() == 2000 * len(VERIFIER_GRID) + 1)
    engine.dispose()
