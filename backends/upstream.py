"""What the pool hands back (a decoded answer or an open SSE stream), and the
engines that carry its requests to replicas (httpx or aiohttp)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
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


# ---------------------------------------------------------------- engines
#
# The pool talks to replicas through an engine: one POST answered whole, or one
# POST whose answer is read as a stream. What matters beyond speed is how a
# failure is classified, because that decides whether another replica may be
# tried. Only a failure that proves no byte of the request can have been
# processed (the connection was never established) is `RequestNotSent`; anything
# after that point may have started a generation upstream, and retrying it on
# another replica could run it twice.


class RequestNotSent(Exception):
    """The connection was never established: safe to try another replica.

    ``refused`` tells a server that is gone (refused, unroutable) from one that
    did not accept in time."""

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.message = message
        self.refused = refused


class RequestBroken(Exception):
    """The connection failed after the request may have been written: the
    replica may be generating, so it must not be retried elsewhere."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PoolExhausted(Exception):
    """No connection of the shared pool became free in time (nothing was sent)."""


@dataclass(slots=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    content: bytes


class RawStream:
    """An open upstream answer: its status and headers are known, its body is
    read with `chunks()`; `close(finished)` returns the connection to the pool
    when the answer was finished and has arrived whole, and drops it otherwise
    (which makes vLLM abort the generation)."""

    __slots__ = ("status", "headers", "_chunks", "_read", "_close")

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        chunks: Callable[[], AsyncIterator[bytes]],
        read: Callable[[], Awaitable[bytes]],
        close: Callable[[bool], Awaitable[None]],
    ) -> None:
        self.status = status
        self.headers = headers
        self._chunks = chunks
        self._read = read
        self._close = close

    def chunks(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def read(self) -> bytes:
        return await self._read()

    async def close(self, finished: bool = False) -> None:
        await self._close(finished)


class HttpxEngine:
    """Requests through an httpx client (httpcore's pool, or the test's mock).

    httpx raises ConnectError/ConnectTimeout only while opening a connection;
    httpcore swallows a failed write and reports the failure when it reads
    the answer, so every other transport error may follow a written request."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self._timeouts: dict[tuple[float, float], httpx.Timeout] = {}

    def _timeout(self, connect: float, read: float) -> httpx.Timeout:
        timeout = self._timeouts.get((connect, read))
        if timeout is None:
            if len(self._timeouts) > 64:  # per-request timeouts are few; stay bounded
                self._timeouts.clear()
            timeout = self._timeouts[(connect, read)] = httpx.Timeout(read, connect=connect)
        return timeout

    async def post(
        self, url: str, content: bytes, headers: dict[str, str], connect: float, read: float
    ) -> RawResponse:
        with _httpx_errors(url):
            response = await self.client.post(
                url, content=content, headers=headers, timeout=self._timeout(connect, read)
            )
        return RawResponse(response.status_code, dict(response.headers), response.content)

    async def open(
        self, url: str, content: bytes, headers: dict[str, str], connect: float, read: float
    ) -> RawStream:
        request = self.client.build_request(
            "POST", url, content=content, headers=headers, timeout=self._timeout(connect, read)
        )
        with _httpx_errors(url):
            response = await self.client.send(request, stream=True)

        async def read_all() -> bytes:
            with _httpx_errors(url):
                return await response.aread()

        async def close(_finished: bool) -> None:
            await response.aclose()

        # Errors while reading events are mapped by SseReader.
        return RawStream(
            response.status_code, dict(response.headers), response.aiter_bytes, read_all, close
        )

    async def aclose(self) -> None:
        await self.client.aclose()


class _httpx_errors:  # noqa: N801 - used as a context manager, reads like one
    __slots__ = ("url",)

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb) -> bool:  # noqa: ANN001
        if exc is None or not isinstance(exc, httpx.HTTPError):
            return False
        if isinstance(exc, httpx.ConnectError):
            raise RequestNotSent(f"Could not connect to {self.url}: {exc!r}", refused=True) from exc
        if isinstance(exc, httpx.ConnectTimeout):
            raise RequestNotSent(f"Connecting to {self.url} timed out.", refused=False) from exc
        if isinstance(exc, httpx.PoolTimeout):
            raise PoolExhausted("No upstream connection became free in time.") from exc
        if isinstance(exc, httpx.TimeoutException):
            raise UpstreamTimeout(f"Upstream {self.url} timed out.") from exc
        if isinstance(exc, httpx.TransportError):
            raise RequestBroken(f"Upstream {self.url} failed: {exc!r}") from exc
        return False


class AiohttpEngine:
    """Requests on aiohttp's own connection pool, without an httpx layer.

    aiohttp raises ClientConnectorError (and its DNS/SSL subclasses) and
    ConnectionTimeoutError only before a connection is handed to the request,
    so those are the only failures that prove nothing was sent. Everything else
    (ServerDisconnectedError, ClientOSError, ClientPayloadError, ...) can
    follow a written request. aiohttp never retries a POST itself, and its
    connector drops pooled connections the server has already closed."""

    def __init__(self, max_connections: int, keepalive_expiry: float) -> None:
        self._limit = max_connections
        self._keepalive = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running event loop.
        session = self._session
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limit, keepalive_timeout=self._keepalive, ssl=True
            )
            session = self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return session

    def _timeout(self, connect: float, read: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get((connect, read))
        if timeout is None:
            if len(self._timeouts) > 64:
                self._timeouts.clear()
            # `connect` covers the wait for a pooled connection as well, like
            # httpx's pool timeout; `sock_connect` the TCP handshake alone.
            timeout = aiohttp.ClientTimeout(
                total=None, connect=read, sock_connect=connect, sock_read=read
            )
            self._timeouts[(connect, read)] = timeout
        return timeout

    async def post(
        self, url: str, content: bytes, headers: dict[str, str], connect: float, read: float
    ) -> RawResponse:
        with _aiohttp_errors(url):
            async with self._client().post(
                url, data=content, headers=headers, timeout=self._timeout(connect, read)
            ) as response:
                body = await response.read()
                return RawResponse(response.status, _lower(response.headers), body)

    async def open(
        self, url: str, content: bytes, headers: dict[str, str], connect: float, read: float
    ) -> RawStream:
        with _aiohttp_errors(url):
            response = await self._client().post(
                url, data=content, headers=headers, timeout=self._timeout(connect, read)
            )

        async def chunks() -> AsyncIterator[bytes]:
            with _aiohttp_errors(url, reading=True):
                async for chunk in response.content.iter_any():
                    yield chunk

        async def read_all() -> bytes:
            with _aiohttp_errors(url, reading=True):
                return await response.read()

        async def close(finished: bool) -> None:
            if finished:
                response.release()
            else:
                response.close()

        return RawStream(response.status, _lower(response.headers), chunks, read_all, close)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


class _aiohttp_errors:  # noqa: N801 - used as a context manager, reads like one
    __slots__ = ("url", "reading")

    def __init__(self, url: str, *, reading: bool = False) -> None:
        self.url = url
        self.reading = reading  # the answer has started: report as a broken stream

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb) -> bool:  # noqa: ANN001
        if exc is None or isinstance(exc, asyncio.CancelledError):
            return False
        url = self.url
        if self.reading:
            if isinstance(exc, asyncio.TimeoutError):
                raise UpstreamTimeout(f"Upstream stream timed out: {exc!r}") from exc
            if isinstance(exc, (aiohttp.ClientError, OSError)):
                raise UpstreamError(
                    f"Upstream stream was interrupted: {exc!r}", status=502, replica=url
                ) from exc
            return False
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise RequestNotSent(f"Could not connect to {url}: {exc!r}", refused=True) from exc
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            raise RequestNotSent(f"Connecting to {url} timed out.", refused=False) from exc
        if isinstance(exc, asyncio.TimeoutError):
            raise UpstreamTimeout(f"Upstream {url} timed out.") from exc
        if isinstance(exc, (aiohttp.ClientError, OSError)):
            raise RequestBroken(f"Upstream {url} failed: {exc!r}") from exc
        return False
