"""A zero-delay OpenAI-compatible upstream for measuring the gateway's own cost.

Answers instantly with fixed bodies, so whatever latency a benchmark sees on
top of a direct call is the gateway's. Written on a bare ``asyncio.Protocol``
with httptools' parser and uvloop (both ship with ``uvicorn[standard]``): no
framework, no per-request JSON encoding, so this process stays far cheaper than
the gateway and does not become the bottleneck when both share a machine.

    python bench/upstream.py --port 9100            # add `taskset -c 0` to pin it

Paths: ``GET /v1/models``, ``GET /health``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (JSON, or SSE when the body has ``"stream": true``:
a role chunk, three content chunks, a finish chunk, a usage chunk, ``[DONE]``).
The stream honours nothing else in the request: it always carries usage, as a
vLLM asked for ``include_usage`` would.

Two switches for the soak bench (bench/soak.py): a request whose body has
``"user":"bench-slow"`` gets its stream one event every 2 ms (so a client can
hang up in the middle of it), and every path under ``/fail/`` answers the
inference paths with a 500 (the rest, health and models, as usual), so a
replica configured at ``/fail/v1`` is a backend that fails every request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from typing import Any

import httptools

MODEL = "bench"
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def _chat_body() -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        },
        separators=(",", ":"),
    ).encode()


def _completion_body() -> bytes:
    return json.dumps(
        {
            "id": "cmpl-bench",
            "object": "text_completion",
            "created": 1700000000,
            "model": MODEL,
            "choices": [{"index": 0, "text": " Hello.", "logprobs": None, "finish_reason": "stop"}],
            "usage": USAGE,
        },
        separators=(",", ":"),
    ).encode()


def _chat_stream() -> list[bytes]:
    """The stream's HTTP chunks, in order (the last one ends the body)."""
    head = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
    }
    deltas: list[dict[str, Any]] = [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
        {"index": 0, "delta": {"content": "Hello"}, "finish_reason": None},
        {"index": 0, "delta": {"content": " from the"}, "finish_reason": None},
        {"index": 0, "delta": {"content": " bench upstream."}, "finish_reason": None},
        {"index": 0, "delta": {}, "finish_reason": "stop"},
    ]
    events = [{**head, "choices": [d]} for d in deltas]
    events.append({**head, "choices": [], "usage": USAGE})
    frames = [
        _chunk(b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")
        for data in events
    ]
    return [*frames, _chunk(b"data: [DONE]\n\n"), b"0\r\n\r\n"]


def _chunk(data: bytes) -> bytes:
    # One HTTP/1.1 chunk per SSE event, as a real server flushing each token would.
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _json_response(body: bytes, status: bytes = b"200 OK") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


MODELS = _json_response(
    json.dumps(
        {
            "object": "list",
            "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}],
        }
    ).encode()
)
HEALTH = _json_response(b"{}")
NOT_FOUND = _json_response(
    b'{"error":{"message":"not found","type":"not_found"}}', b"404 Not Found"
)
CHAT = _json_response(_chat_body())
COMPLETION = _json_response(_completion_body())
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
CHAT_STREAM = STREAM_HEAD + b"".join(_chat_stream())
# The same stream cut at its HTTP chunks, for the slow variant.
STREAM_PARTS = [STREAM_HEAD, *_chat_stream()]
FAILED = _json_response(
    b'{"error":{"message":"bench upstream failure","type":"server_error"}}',
    b"500 Internal Server Error",
)
SLOW_EVENT_S = 0.002


class UpstreamProtocol(asyncio.Protocol):
    """One connection: parse requests with httptools, answer from the fixed bytes."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None  # uvloop's transport is not an asyncio.Transport
        self.url = b""
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body.clear()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        assert self.transport is not None
        answer = self._answer()
        if answer is None:  # the slow stream: written by call_later
            self._write_slowly(STREAM_PARTS, self.parser.should_keep_alive())
            return
        self.transport.write(answer)
        if not self.parser.should_keep_alive():
            self.transport.close()

    def _write_slowly(self, parts: list[bytes], keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client hung up: the rest of the stream goes nowhere
        transport.write(parts[0])
        if len(parts) > 1:
            loop = asyncio.get_running_loop()
            loop.call_later(SLOW_EVENT_S, self._write_slowly, parts[1:], keep_alive)
        elif not keep_alive:
            transport.close()

    def _answer(self) -> bytes | None:
        path = self.url.split(b"?", 1)[0]
        failing = path.startswith(b"/fail/")
        if failing:
            path = path[len(b"/fail") :]
        if path in (b"/v1/chat/completions", b"/v1/completions"):
            if failing:
                return FAILED
            # A substring test, not a JSON parse: this server must stay cheap.
            compact = bytes(self.body).replace(b" ", b"")
            if b'"stream":true' in compact:
                return None if b'"user":"bench-slow"' in compact else CHAT_STREAM
            return CHAT if path == b"/v1/chat/completions" else COMPLETION
        if path == b"/v1/models":
            return MODELS
        if path in (b"/health", b"/v1/health"):
            return HEALTH
        return NOT_FOUND


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=2048)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench upstream on http://{host}:{port}/v1 (pid {os.getpid()})", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="zero-delay OpenAI-compatible upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # plain asyncio still works, only slower
        pass
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
