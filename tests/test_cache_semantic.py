"""The semantic cache end to end, with the real embedder, verifier and database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from cache.config import CacheSettings
from cache.keys import namespace_for
from cache.semantic_cache import SemanticCache

# The cache fixture starts background tasks on the session loop (the suite's
# fixture default), so the tests must run on that loop too.
pytestmark = pytest.mark.asyncio(loop_scope="session")

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def chat(question: str, system: str = "You are a helpful assistant.", **params) -> dict:
    return {
        "model": "llama-3-8b",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "temperature": 0,
        **params,
    }


def answer(text_: str) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "llama-3-8b",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text_},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


QUESTION = "How can I improve my English speaking skills?"
PARAPHRASE = "What are some ways to improve my spoken English?"


def ns(request: dict, tenant: str = "acme") -> str:
    return namespace_for(tenant, "llama-3-8b", request)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return create_engine(f"sqlite:///{tmp_path / 'cache.db'}")


@pytest.fixture
def settings() -> CacheSettings:
    return CacheSettings(sweep_interval_s=3600, use_gpu=False)


@pytest.fixture
async def cache(settings: CacheSettings, engine: Engine) -> AsyncIterator[SemanticCache]:
    c = SemanticCache(settings, engine)
    await c.start()
    yield c
    await c.close()


async def test_exact_repeat_is_an_exact_hit(cache: SemanticCache) -> None:
    req = chat(QUESTION)
    await cache.store(ns(req), req, answer("Practice daily."), tenant="acme")
    hit = await cache.lookup(ns(req), chat(QUESTION, stream=True, user="someone"))
    assert hit is not None
    assert hit.layer == "exact"
    assert hit.response["choices"][0]["message"]["content"] == "Practice daily."
    assert hit.verifier_score is None


async def test_repeat_while_the_store_is_in_flight_is_an_exact_hit(cache: SemanticCache) -> None:
    """The gateway answers before the store finishes (embedding, database write):
    a client repeating the request at once must still hit."""
    req = chat("What is the boiling point of water at sea level?")
    store = asyncio.create_task(cache.store(ns(req), req, answer("100 C"), tenant="acme"))
    await asyncio.sleep(0)  # the store has started and is waiting on its embedding
    assert not store.done()
    hit = await cache.lookup(ns(req), req)
    assert hit is not None and hit.layer == "exact"
    assert hit.response["choices"][0]["message"]["content"] == "100 C"
    await store
    hit = await cache.lookup(ns(req), req)
    assert hit is not None and hit.layer == "exact" and hit.entry_id != "storing"


async def test_begin_store_serves_repeats_before_anything_is_awaited(
    cache: SemanticCache,
) -> None:
    """The pipeline calls begin_store inside its single flight, just before
    the flight lets the duplicates go: the exact layer must have the answer
    at that instant, not once a spawned store task first runs."""
    req = chat("How many legs does a spider have?")
    work = cache.begin_store(ns(req), req, answer("Eight."), tenant="acme")
    assert work is not None
    hit = await cache.lookup(ns(req), req)  # no turn of the loop given to the store
    assert hit is not None and hit.layer == "exact" and hit.entry_id == "storing"
    assert hit.response["choices"][0]["message"]["content"] == "Eight."
    await work
    hit = await cache.lookup(ns(req), req)
    assert hit is not None and hit.layer == "exact" and hit.entry_id != "storing"


async def test_paraphrase_in_same_namespace_is_a_semantic_hit(cache: SemanticCache) -> None:
    req = chat(QUESTION)
    await cache.store(ns(req), req, answer("Practice daily."), tenant="acme")
    para = chat(PARAPHRASE)
    assert ns(para) == ns(req)
    hit = await cache.lookup(ns(para), para, operating_point="aggressive")
    assert hit is not None
    assert hit.layer == "semantic"
    assert hit.similarity >= cache.settings.min_similarity
    assert hit.verifier_score is not None
    assert cache.stats()["hits_semantic"] == 1


async def test_hit_response_is_a_copy(cache: SemanticCache) -> None:
    req = chat(QUESTION)
    await cache.store(ns(req), req, answer("Practice daily."), tenant="acme")
    first = await cache.lookup(ns(req), req)
    assert first is not None
    first.response["choices"] = []
    second = await cache.lookup(ns(req), req)
    assert second is not None and second.response["choices"]


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda q: (chat(q), "globex"), id="other-tenant"),
        pytest.param(
            lambda q: (chat(q, system="Answer like a pirate."), "acme"), id="other-system-prompt"
        ),
        pytest.param(lambda q: (chat(q, temperature=0.5), "acme"), id="other-temperature"),
        pytest.param(lambda q: (chat(q, max_tokens=16), "acme"), id="other-max-tokens"),
    ],
)
async def test_same_question_in_another_namespace_misses(cache: SemanticCache, other) -> None:
    req = chat(QUESTION)
    await cache.store(ns(req), req, answer("Practice daily."), tenant="acme")
    for question in (QUESTION, PARAPHRASE):
        request, tenant = other(question)
        assert await cache.lookup(ns(request, tenant), request, "aggressive") is None
    assert cache.stats()["hits"] == 0


async def test_unrelated_question_misses(cache: SemanticCache) -> None:
    req = chat(QUESTION)
    await cache.store(ns(req), req, answer("Practice daily."), tenant="acme")
    other = chat("What is the boiling point of water at sea level?")
    assert await cache.lookup(ns(other), other, "aggressive") is None


async def test_verifier_rejects_near_miss_in_same_namespace(cache: SemanticCache) -> None:
    req = chat("How do I learn Python programming quickly?")
    await cache.store(ns(req), req, answer("Python answer"), tenant="acme")
    near = chat("How do I learn Java programming quickly?")
    assert await cache.lookup(ns(near), near, "balanced") is None


async def test_ttl_expiry(settings: CacheSettings, engine: Engine) -> None:
    clock = FakeClock()
    settings.ttl_seconds = 60
    c = SemanticCache(settings, engine, clock=clock)
    await c.start()
    try:
        req = chat(QUESTION)
        await c.store(ns(req), req, answer("x"), tenant="acme")
        clock.now += 30
        assert await c.lookup(ns(req), req) is not None
        clock.now += 31
        assert await c.lookup(ns(req), req) is None
        assert c.stats()["entries"] == 0
        # The sweeper removes expired rows from the database as well.
        req2 = chat("Another question about gardening tomatoes?")
        await c.store(ns(req2), req2, answer("y"), tenant="acme")
        clock.now += 61
        assert await c.sweep() == 1
        with engine.connect() as conn:
            assert conn.execute(text("select count(*) from cache_entries")).scalar() == 0
    finally:
        await c.close()


async def test_eviction_drops_least_recently_used(settings: CacheSettings, engine: Engine) -> None:
    settings.max_entries = 2
    c = SemanticCache(settings, engine)
    await c.start()
    try:
        reqs = [
            chat(q)
            for q in ("What is photosynthesis?", "Who wrote Hamlet?", "How tall is Mount Everest?")
        ]
        await c.store(ns(reqs[0]), reqs[0], answer("0"), tenant="acme")
        await c.store(ns(reqs[1]), reqs[1], answer("1"), tenant="acme")
        assert await c.lookup(ns(reqs[0]), reqs[0]) is not None  # 0 is now most recent
        await c.store(ns(reqs[2]), reqs[2], answer("2"), tenant="acme")
        assert c.stats()["entries"] == 2
        assert c.stats()["evictions"] == 1
        assert await c.lookup(ns(reqs[1]), reqs[1]) is None
        assert await c.lookup(ns(reqs[0]), reqs[0]) is not None
        assert await c.lookup(ns(reqs[2]), reqs[2]) is not None
        with engine.connect() as conn:
            assert conn.execute(text("select count(*) from cache_entries")).scalar() == 2
    finally:
        await c.close()


async def test_purge_removes_only_that_tenant(cache: SemanticCache, engine: Engine) -> None:
    req = chat(QUESTION)
    await cache.store(ns(req, "acme"), req, answer("a"), tenant="acme")
    await cache.store(ns(req, "globex"), req, answer("g"), tenant="globex")
    assert await cache.purge("acme") == 1
    assert await cache.lookup(ns(req, "acme"), req) is None
    assert await cache.lookup(ns(req, "globex"), req) is not None
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from cache_entries")).scalar() == 1


async def test_storing_the_same_request_replaces_the_entry(cache: SemanticCache) -> None:
    req = chat(QUESTION)
    await cache.store(ns(req), req, answer("old"), tenant="acme")
    await cache.store(ns(req), req, answer("new"), tenant="acme")
    hit = await cache.lookup(ns(req), req)
    assert hit is not None
    assert hit.response["choices"][0]["message"]["content"] == "new"
    assert cache.stats()["entries"] == 1


async def test_concurrent_lookups_are_embedded_in_batches(
    settings: CacheSettings, engine: Engine
) -> None:
    settings.batch_max_wait_ms = 50
    c = SemanticCache(settings, engine)
    await c.start()
    try:
        questions = [f"Question number {i} about the history of Rome?" for i in range(16)]
        hits = await asyncio.gather(*(c.lookup(ns(chat(q)), chat(q)) for q in questions))
        assert all(h is None for h in hits)
        assert c.stats()["embed_batches"] < len(questions)
    finally:
        await c.close()


async def _check_restart(settings: CacheSettings, engine: Engine) -> None:
    # A tenant name of its own: the PostgreSQL database is shared with other tests.
    tenant = "bearpaw-cache-restart-test"
    req = chat(QUESTION)
    first = SemanticCache(settings, engine)
    await first.start()
    await first.purge(tenant)
    await first.store(ns(req, tenant), req, answer("kept"), tenant=tenant)
    await first.close()

    second = SemanticCache(settings, engine)
    await second.start()
    try:
        assert second.stats()["entries"] >= 1
        exact = await second.lookup(ns(req, tenant), req)
        assert exact is not None and exact.layer == "exact"
        para = chat(PARAPHRASE)
        semantic = await second.lookup(ns(para, tenant), para, "aggressive")
        assert semantic is not None and semantic.layer == "semantic"
        assert semantic.response["choices"][0]["message"]["content"] == "kept"
    finally:
        await second.purge(tenant)
        await second.close()


async def test_restart_keeps_entries_sqlite(settings: CacheSettings, engine: Engine) -> None:
    await _check_restart(settings, engine)


async def test_restart_keeps_entries_postgres(settings: CacheSettings) -> None:
    engine = create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    try:
        await _check_restart(settings, engine)
    finally:
        engine.dispose()


async def test_processes_converge_through_the_database(tmp_path):
    """A purge made elsewhere (CLI, another gateway) and entries stored by another
    process reach this process's memory at its next sweep."""
    engine = create_engine(f"sqlite:///{tmp_path / 'shared.db'}")
    settings = CacheSettings(sweep_interval_s=3600)
    a, b = SemanticCache(settings, engine), SemanticCache(settings, engine)
    await a.start()
    await b.start()
    try:
        req = {
            "model": "m",
            "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }
        ns = namespace_for("t1", "m", req)
        answer = {"object": "chat.completion", "choices": [{"message": {"content": "Paris"}}]}
        await a.store(ns, req, answer, tenant="t1")
        assert await b.lookup(ns, req) is None  # b has not synced yet
        await b.sweep()
        hit = await b.lookup(ns, req)
        assert hit is not None and hit.response["choices"][0]["message"]["content"] == "Paris"
        # A purge through another process (here: a) reaches b at its next sweep.
        assert await a.purge("t1") >= 1
        assert await b.lookup(ns, req) is not None
        await b.sweep()
        assert await b.lookup(ns, req) is None
    finally:
        await a.close()
        await b.close()
