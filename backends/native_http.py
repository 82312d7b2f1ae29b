"""A minimal HTTP/1.1 client for the pool's one kind of request (`http_engine: native`).

The pool sends one thing: a POST with a complete body, answered by JSON or
an SSE stream. Under load the general clients spent most of the upstream
call in their own machinery (request/response objects, header multidicts,
payload wrappers, timers, tracing hooks): about a third of the event loop's
time with aiohttp. This client is an asyncio protocol around httptools'
response parser with a keep-alive pool per server, and it knows exactly how
far a request got, which the retry rule needs:

* a connection that could not be opened raises `RequestNotSent` (retry safe);
* a pooled connection is only reused while it is open and idle for less than
  `keepalive_expiry`, checked just before the request is written;
* anything that fails after the first byte was written raises
  `RequestBroken` (never retried), a timeout `UpstreamTimeout`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

from backends.errors import UpstreamError, UpstreamTimeout
from backends.upstream import PoolExhausted, RawResponse, RawStream, RequestBroken, RequestNotSent

_Key = tuple[str, int, bool]  # host, port, tls


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.complete = False
        self.reusable = False
        self.received = False  # any byte of an answer arrived
        self.body: deque[bytes] = deque()
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._name = b""

    # ------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = exc
            self._close()
        self._wake()

    def eof_received(self) -> bool:
        self._mark_lost()
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_lost(exc)

    def _mark_lost(self, exc: BaseException | None = None) -> None:
        self.lost = True
        if self.headers_done and not self.complete and self._reads_to_eof():
            self.complete = True  # a body delimited by the end of the connection
        elif not self.complete and self.error is None:
            self.error = exc or ConnectionResetError("connection closed by the server")
        self._wake()

    def _reads_to_eof(self) -> bool:
        return "content-length" not in self.headers and "transfer-encoding" not in self.headers

    # ------------------------------------------------------ parser callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        # Asked now: the parser forgets the message's keep-alive once it is done.
        self.reusable = self.parser.should_keep_alive()
        self.complete = True

    # ------------------------------------------------------ exchange
    def usable(self, now: float, expiry: float) -> bool:
        transport = self.transport
        return (
            not self.lost
            and transport is not None
            and not transport.is_closing()
            and now - self.idle_since < expiry
        )

    def send(self, data: bytes) -> None:
        self._reset()
        assert self.transport is not None
        self.transport.write(data)

    async def wait(self, timeout: float) -> None:
        """Until something arrives (or the connection ends), at most `timeout` s."""
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def keep_alive(self) -> bool:
        return self.complete and self.reusable and not self.lost

    def _close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class NativeEngine:
    """The engine interface of backends/upstream.py on `_Connection`s."""

    def __init__(self, max_connections: int, keepalive_expiry: float) -> None:
        self._limit = max_connections
        self._expiry = keepalive_expiry
        self._idle: dict[_Key, list[_Connection]] = {}
        self._open: dict[_Key, int] = {}
        self._waiters: dict[_Key, deque[asyncio.Future[None]]] = {}
        self._targets: dict[str, tuple[_Key, bytes]] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    # ------------------------------------------------------ pool
    def _target(self, url: str) -> tuple[_Key, bytes]:
        found = self._targets.get(url)
        if found is None:
            parts = urlsplit(url)
            tls = parts.scheme == "https"
            host = parts.hostname or "127.0.0.1"
            port = parts.port or (443 if tls else 80)
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            default = (tls and port == 443) or (not tls and port == 80)
            authority = host if default else f"{host}:{port}"
            head = f"POST {path} HTTP/1.1\r\nhost: {authority}\r\n".encode("latin-1")
            if len(self._targets) > 1024:
                self._targets.clear()
            found = self._targets[url] = ((host, port, tls), head)
        return found

    async def _acquire(self, key: _Key, connect: float, pool_wait: float) -> _Connection:
        idle = self._idle.get(key)
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()  # the most recently used is the most likely alive
                if conn.usable(now, self._expiry):
                    return conn
                self._forget(key, conn)
        while self._open.get(key, 0) >= self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, deque()).append(waiter)
            try:
                async with asyncio.timeout(pool_wait):
                    await waiter
            except TimeoutError:
                raise PoolExhausted("No upstream connection became free in time.") from None
            idle = self._idle.get(key)
            if idle:
                return await self._acquire(key, connect, pool_wait)
        self._open[key] = self._open.get(key, 0) + 1
        try:
            return await self._connect(key, connect)
        except BaseException:
            self._open[key] -= 1
            self._notify(key)
            raise

    async def _connect(self, key: _Key, timeout: float) -> _Connection:
        host, port, tls = key
        loop = asyncio.get_running_loop()
        context = None
        if tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            context = self._tls
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), host, port, ssl=context
                )
        except TimeoutError as exc:
            raise RequestNotSent(f"Connecting to {host}:{port} timed out.", refused=False) from exc
        except OSError as exc:
            message = f"Could not connect to {host}:{port}: {exc!r}"
            raise RequestNotSent(message, refused=True) from exc
        return conn

    def _release(self, key: _Key, conn: _Connection) -> None:
        if conn.keep_alive() and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(key, []).append(conn)
            self._notify(key)
        else:
            conn._close()
            self._forget(key, conn)

    def _discard(self, key: _Key, conn: _Connection) -> None:
        conn.abort()
        self._forget(key, conn)

    def _forget(self, key: _Key, conn: _Connection) -> None:
        conn._close()
        self._open[key] = max(0, self._open.get(key, 0) - 1)
        self._notify(key)

    def _notify(self, key: _Key) -> None:
        waiters = self._waiters.get(key)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # ------------------------------------------------------ requests
    def _request_bytes(self, head: bytes, content: bytes, headers: dict[str, str]) -> bytes:
        lines = [head]
        for name, value in headers.items():
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(b"content-length: %d\r\n\r\n" % len(content))
        lines.append(content)
        return b"".join(lines)

    async def _exchange(
        self, url: str, content: bytes, headers: dict[str, str], connect: float, read: float
    ) -> tuple[_Key, _Connection]:
        """Sends the request and waits for the answer's status and headers."""
        key, head = self._target(url)
        conn = await self._acquire(key, connect, read)
        try:
            conn.send(self._request_bytes(head, content, headers))
            while not conn.headers_done:
                if conn.error is not None:
                    raise RequestBroken(f"Upstream {url} failed: {conn.error!r}")
                try:
                    await conn.wait(read)
                except TimeoutError as exc:
                    raise UpstreamTimeout(f"Upstream {url} timed out.") from exc
        except BaseException:
            # Cancelled, timed out or broken: the connection is in an unknown
            # state; closing it also tells the server to stop.
            self._discard(key, conn)
            raise
        return key, conn

    async def post(
        self, url: str, content: bytes, headers: dict[str, str], connect: float, read: float
    ) -> RawResponse:
        key, conn = await self._exchange(url, content, headers, connect, read)
        try:
            while not conn.complete:
                if conn.error is not None:
                    raise RequestBroken(f"Upstream {url} failed: {conn.error!r}")
                try:
                    await conn.wait(read)
                except TimeoutError as exc:
                    raise UpstreamTimeout(f"Upstream {url} timed out.") from exc
        except BaseException:
            self._discard(key, conn)
            raise
        body = b"".join(conn.body) if len(conn.body) != 1 else conn.body[0]
        response = RawResponse(conn.status, conn.headers, body)
        self._release(key, conn)
        return response

    async def open(
        self, url: str, content: bytes, headers: dict[str, str], connect: float, read: float
    ) -> RawStream:
        key, conn = await self._exchange(url, content, headers, connect, read)
        released = False

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                while conn.body:
                    yield conn.body.popleft()
                if conn.complete:
                    return
                if conn.error is not None:
                    raise UpstreamError(
                        f"Upstream stream was interrupted: {conn.error!r}", status=502, replica=url
                    )
                try:
                    await conn.wait(read)
                except TimeoutError as exc:
                    raise UpstreamTimeout("Upstream stream timed out.") from exc

        async def read_all() -> bytes:
            parts = []
            async for part in chunks():
                parts.append(part)
            return b"".join(parts)

        async def close(finished: bool) -> None:
            nonlocal released
            if released:
                return
            released = True
            if finished and conn.complete:
                self._release(key, conn)
            else:
                # Dropping the connection is how vLLM learns to stop generating.
                self._discard(key, conn)

        return RawStream(conn.status, conn.headers, chunks, read_all, close)

    async def aclose(self) -> None:
        self._closed = True
        for key, conns in self._idle.items():
            for conn in conns:
                conn._close()
            self._open[key] = 0
        self._idle.clear()
