"""Graceful shutdown: say "not ready" first, then stop, letting streams finish.

On SIGTERM (or SIGINT) the gateway marks itself draining at once, so /ready
answers 503 and a load balancer stops sending new work. After
``drain_seconds`` (setting ``BEARPAW_DRAIN_SECONDS``, default 0: a plain process has no balancer to
wait for; in Kubernetes set it to a little more than the readiness probe's
period) the signal is handed to uvicorn, which stops accepting connections
and waits up to its ``timeout_graceful_shutdown`` for in-flight requests,
open SSE streams included, before the app's own shutdown runs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("bearpaw.shutdown")

Handler = Callable[[int, FrameType | None], Any] | int | None


def install_drain(extras: dict[str, Any], delay: float = 0.0) -> Callable[[], None]:
    """Wraps the SIGTERM/SIGINT handlers that are installed now (uvicorn's,
    when called from the lifespan) and returns a function that restores them.

    Must run on the main thread, inside the running event loop."""
    loop = asyncio.get_running_loop()
    wait = delay
    previous: dict[int, Handler] = {}

    def on_signal(sig: int, frame: FrameType | None) -> None:
        first = not extras.get("draining")
        extras["draining"] = True
        handler = previous.get(sig)
        if not callable(handler):
            return
        if not first or wait <= 0:
            # A second signal means "now", as uvicorn treats it.
            handler(sig, frame)
            return
        log.info("draining: not ready, stopping in %.1fs", wait)
        # Signal handlers interrupt arbitrary code: touch the loop only through
        # its thread-safe entry point.
        loop.call_soon_threadsafe(loop.call_later, wait, handler, sig, None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, on_signal)
        except ValueError:  # not the main thread (e.g. an in-process test client)
            previous.pop(sig, None)

    def restore() -> None:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is on_signal:
                signal.signal(sig, handler)  # type: ignore[arg-type]

    return restore
