"""What the pool hands back: a decoded answer or an open SSE stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from backends.errors import UpstreamError, UpstreamTimeout


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    body: dict[str, Any]
    replica: str  # the replica's base URL, or "hosted:<litellm model>"
    headers: dict[str, str] = field(default_factory=dict)


class SseReader:
    """Splits an upstream byte stream into whole SSE events.

    Events are yielded as soon as their terminating blank line arrives, so the
    gateway never holds more than one event; a half event waits in the buffer.
    """

    __slots__ = ("_chunks", "_buffer", "_scan_from", "_separator", "replica")

    def __init__(self, chunks: AsyncIterator[bytes], replica: str = "") -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._scan_from = 0
        # vLLM and OpenAI end events with LF LF; sse-starlette based servers
        # use CRLF CRLF. Decided on the first chunk that shows a line ending.
        self._separator: bytes | None = None
        self.replica = replica

    async def next_event(self) -> bytes | None:
        """The next complete event including its blank line, or None at end of stream."""
        buffer = self._buffer
        try:
            while True:
                if self._separator is None and buffer:
                    newline = buffer.find(b"\n")
                    if newline != -1:
                        crlf = newline > 0 and buffer[newline - 1] == 13
                        self._separator = b"\r\n\r\n" if crlf else b"\n\n"
                if self._separator is not None:
                    end = buffer.find(self._separator, self._scan_from)
                    if end != -1:
                        end += len(self._separator)
                        event = bytes(buffer[:end])
                        del buffer[:end]
                        self._scan_from = 0
                        return event
                    # Resume the search where a separator could still start.
                    self._scan_from = max(0, len(buffer) - len(self._separator) + 1)
                chunk = await anext(self._chunks, None)
                if chunk is None:
                    if buffer.strip():
                        # A final event without its blank line: pass it on whole.
                        event = bytes(buffer) + (self._separator or b"\n\n")
                        buffer.clear()
                        return event
                    return None
                buffer += chunk
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"Upstream stream timed out: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise UpstreamError(
                f"Upstream stream was interrupted: {exc!r}", status=502, replica=self.replica
            ) from exc


class UpstreamStream:
    """An upstream SSE answer, already known to be good (status 200, first event read).

    Iterate it for ``b"data: ...\\n\\n"`` events; ``aclose()`` drops the upstream
    connection, which makes vLLM abort the generation. Iteration ends the
    stream by itself on exhaustion, on error and on cancellation.
    It is a plain async iterator rather than an async generator so that a
    cancelled consumer closes the upstream immediately instead of whenever the
    generator happens to be finalised.
    """

    __slots__ = ("replica", "status", "headers", "_next", "_first", "_close", "_closed", "_ok")

    def __init__(
        self,
        replica: str,
        next_event: Callable[[], Awaitable[bytes | None]],
        close: Callable[[bool], Awaitable[None]],
        *,
        first: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.replica = replica
        self.status = 200
        self.headers: dict[str, str] = headers if headers is not None else {}
        self._next = next_event
        self._first = first
        self._close = close
        self._closed = False
        self._ok = True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            event, self._first = self._first, None
            return event
        if self._closed:
            raise StopAsyncIteration
        try:
            event = await self._next()
        except BaseException as exc:
            # Cancellation is the client going away, not the replica failing.
            await self._finish(ok=not isinstance(exc, Exception))
            raise
        if event is None:
            await self._finish(ok=True)
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        await self._finish(ok=True)

    async def __aenter__(self) -> UpstreamStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _finish(self, *, ok: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._first = None
        await self._close(ok)
