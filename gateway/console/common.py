"""Small helpers the console's route modules share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request

T = TypeVar("T")


async def db(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs a blocking database function with the engine, off the event loop."""
    state = request.app.state.bearpaw
    return await state.run_sync(lambda: fn(state.engine, *args, **kwargs))


def state(request: Request) -> Any:
    return request.app.state.bearpaw
