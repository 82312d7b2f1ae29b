"""The streaming loop: the pipeline's chat chunks in, Anthropic events out, with
pings while nothing arrives.

The pipeline answers a stream once the backend sent its first event; a request
that waits longer than `ping_every` for that (a queued replica) is answered
right away with message_start and pings, so clients and proxies see a live
connection. Chunks are read through a task so that a silent upstream can be
answered with a ping without abandoning the read in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio

from gateway.dialects.messages.errors import openai_message
from gateway.dialects.messages.events import (
    PING,
    StreamState,
    message_start,
    on_chunk,
    on_done,
    on_error,
)
from gateway.pipeline import Outcome
from gateway.sse import parse_event

log = logging.getLogger("bearpaw.messages")

PING_SECONDS = 10.0


async def relay(
    pending: asyncio.Future[Outcome], state: StreamState, ping_every: float = PING_SECONDS
) -> AsyncIterator[bytes]:
    """Anthropic's event stream for a pipeline run (`pending`, done or not)."""
    step: asyncio.Task[bytes | None] | None = None
    try:
        while not pending.done():
            await asyncio.wait({pending}, timeout=ping_every)
            if not pending.done():
                for event in (PING,) if state.started else message_start(state):
                    yield event
        try:
            outcome = pending.result()
        except Exception:
            log.exception("messages stream failed before its first chunk")
            outcome = Outcome(500, None)
        if outcome.stream is None:
            # It failed after the client was already answered with message_start.
            for event in on_error(state, outcome.status, openai_message(outcome.body)):
                yield event
            return
        completed = False
        while True:
            step = asyncio.get_running_loop().create_task(_next(outcome.stream))
            while not step.done():
                await asyncio.wait({step}, timeout=ping_every)
                if not step.done() and state.started:
                    yield PING
            raw, step = step.result(), None
            if raw is None:
                break
            if state.ended:
                continue  # after an error: drained so that the pipeline meters it
            for event in _translate(state, raw):
                yield event
            completed = completed or _is_done(raw)
        if completed:
            for event in on_done(state):
                yield event
        else:
            for event in on_error(state, 502, "The backend stream ended early."):
                yield event
    finally:
        with anyio.CancelScope(shield=True):
            await _cleanup(pending, step)


def _translate(state: StreamState, raw: bytes) -> list[bytes]:
    data = parse_event(raw)
    if data is None:
        return []
    if "error" in data and not data.get("choices"):
        return on_error(state, 500, openai_message(data))
    return on_chunk(state, data)


def _is_done(raw: bytes) -> bool:
    return raw.startswith(b"data:") and raw[5:].strip() == b"[DONE]"


async def _next(stream: AsyncIterator[bytes]) -> bytes | None:
    return await anext(stream, None)


async def _cleanup(pending: asyncio.Future[Outcome], step: asyncio.Task[Any] | None) -> None:
    """Stops whatever still runs when the client went away: the pipeline then
    meters the request as abandoned and closes the upstream stream."""
    if not pending.done():
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        return
    if step is not None and not step.done():
        step.cancel()
        await asyncio.gather(step, return_exceptions=True)
    if pending.cancelled() or pending.exception() is not None:
        return
    stream = pending.result().stream
    if stream is not None and hasattr(stream, "aclose"):
        await stream.aclose()
