"""The gateway freezes its start-up heap for the garbage collector (gateway/app.py,
settle_heap): full collections no longer walk the frameworks' objects, while
garbage made after start-up is still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.app import GC_GEN0_THRESHOLD, create_app
from gateway.settings import Settings


@pytest.fixture
def restore_gc() -> Iterator[None]:
    # The test process's collector is global state: leave it as found.
    threshold = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_startup_freezes_heap_and_later_cycles_are_still_collected(
    tmp_path: Path, restore_gc: None
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        admin_key="admin",
        cache={"enabled": False},
        backends={"discover": []},
        workers={"embedded": False},
    )
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(settings)) as client:
        # Everything alive at start-up is in the permanent generation.
        assert gc.get_freeze_count() > 10_000
        assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD
        assert client.get("/health").status_code == 200
        # A reference cycle made after start-up is not frozen: still collected.
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        ref = weakref.ref(a)
        del a, b
        gc.collect()
        assert ref() is None


def test_gc_freeze_off_leaves_the_collector_alone(tmp_path: Path, restore_gc: None) -> None:
    settings = Settings(
        data_dir=tmp_path,
        admin_key="admin",
        cache={"enabled": False},
        backends={"discover": []},
        workers={"embedded": False},
        gc_freeze=False,
    )
    threshold = gc.get_threshold()
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 200
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == threshold
