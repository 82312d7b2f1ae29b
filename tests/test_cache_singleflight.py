"""Concurrent identical misses share one backend call."""

import asyncio

import pytest

from cache.singleflight import SingleFlight


async def test_concurrent_callers_share_one_call() -> None:
    flight = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def backend() -> dict:
        nonlocal calls
        calls += 1
        await release.wait()
        return {"answer": 42}

    tasks = [asyncio.create_task(flight.do("k", backend)) for _ in range(10)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert all(r == {"answer": 42} for r in results)
    assert len(flight) == 0


async def test_different_keys_do_not_share() -> None:
    flight = SingleFlight()
    calls: list[str] = []

    async def backend(key: str) -> str:
        calls.append(key)
        await asyncio.sleep(0)
        return key

    results = await asyncio.gather(*(flight.do(k, lambda k=k: backend(k)) for k in "abc"))
    assert results == ["a", "b", "c"]
    assert sorted(calls) == ["a", "b", "c"]


async def test_exception_reaches_every_caller_and_key_is_freed() -> None:
    flight = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def failing() -> None:
        nonlocal calls
        calls += 1
        await release.wait()
        raise RuntimeError("backend down")

    tasks = [asyncio.create_task(flight.do("k", failing)) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert calls == 1
    assert all(isinstance(r, RuntimeError) for r in results)

    async def ok() -> str:
        return "fine"

    assert await flight.do("k", ok) == "fine"


async def test_a_cancelled_waiter_does_not_cancel_the_shared_call() -> None:
    flight = SingleFlight()
    release = asyncio.Event()

    async def backend() -> str:
        await release.wait()
        return "done"

    leader = asyncio.create_task(flight.do("k", backend))
    await asyncio.sleep(0)
    follower = asyncio.create_task(flight.do("k", backend))
    await asyncio.sleep(0)
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    release.set()
    assert await leader == "done"
