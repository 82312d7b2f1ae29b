"""An OpenAI-compatible upstream that fails on demand, for retry/failover/timeout tests.

Real answers come from the real vLLM fixture; this server exists only for failures
that vLLM cannot produce when asked: 5xx, hangs, slow starts, streams cut mid-way,
connections closed or reset. In its normal mode it answers like a tiny model with
deterministic text and exact usage, so the same test can compare good and bad calls.

    server = FaultServer().start()          # own thread, free port on 127.0.0.1
    server.set_fault("status", status=503, times=1)   # the next request gets a 503
    ...                                     # then it answers normally again
    server.request_count("/v1/chat/completions")

It is a small HTTP/1.1 server written on asyncio streams (no framework) because
several faults need the raw socket: closing it before any response byte, resetting
it, or stopping a chunked stream without its terminating chunk.

Faults (``mode``):
    ok            answer normally (the default when no fault is queued)
    status        answer ``status`` (default 500; 429 adds Retry-After) with an
                  OpenAI error object
    hang          read the request and never answer, until the client goes away or
                  ``release_hangs()`` / ``reset()`` / ``stop()``
    delay         wait ``delay`` seconds, then answer normally
    drop_stream   streams: send headers and ``after_chunks`` SSE events, then close
                  the socket without [DONE] or the final chunk; non-stream requests:
                  send the headers and half the body, then close
    close         close the connection right after reading the request
    reset         abort the connection with a TCP RST right after reading the request
    crash         like a killed process: right after reading the request stop
                  listening (new connections are refused) and reset every open
                  connection (``stop()`` still cleans up)

A fault applies to the paths in ``paths`` (default: the two inference paths; ``"*"``
means every path, /health and /metrics included) for ``times`` requests (None: until
changed). ``set_faults([...])`` queues several, used in order.

Admin endpoints, for control from another process (``python -m
tests.support.fault_server --port N``):
    POST /_fault          body {"mode": ..., "status": ..., "times": ...} (or a list)
    POST /_fault/reset    back to normal, counters cleared
    GET  /_fault/stats    {"requests": n, "by_path": {...}, "disconnects": n}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions")
MODES = ("ok", "status", "hang", "delay", "drop_stream", "close", "reset", "crash")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


@dataclass
class Fault:
    """One planned misbehaviour; see the module docstring for the modes."""

    mode: str = "ok"
    status: int = 500
    delay: float = 0.0
    after_chunks: int = 1
    times: int | None = None
    paths: tuple[str, ...] | str = INFERENCE_PATHS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; one of {MODES}")
        if isinstance(self.paths, list):
            self.paths = tuple(self.paths)
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1 (or None for 'until changed')")

    def applies_to(self, path: str) -> bool:
        return self.paths == "*" or path in self.paths


@dataclass
class RecordedRequest:
    """What reached the server, for assertions on what the gateway forwarded."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    fault: str
    received_at: float = field(default_factory=time.time)


class _ClientGone(Exception):
    pass


def count_tokens(text: str) -> int:
    """The fake tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def reply_words(prompt_text: str, max_tokens: int) -> tuple[list[str], str]:
    """Deterministic completion for a prompt: its words echoed, then a fixed tail."""
    words = ["echo:", *prompt_text.split()[-8:], "-", "fault", "server", "says", "hello."]
    if max_tokens < len(words):
        return words[:max_tokens], "length"
    return words, "stop"


class FaultServer:
    """See the module docstring. All public methods are safe to call from any thread."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        models: Iterable[str] = ("tiny",),
        faults: Iterable[Fault] = (),
        chunk_delay: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port
        self.models = tuple(models)
        self.chunk_delay = chunk_delay  # seconds between SSE events in normal streams
        self._default_chunk_delay = chunk_delay
        self._lock = threading.Lock()
        self._faults: list[Fault] = [replace(f) for f in faults]
        self._requests: list[RecordedRequest] = []
        self._disconnects = 0
        self._in_flight = 0
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._release: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # ---------------------------------------------------------------- lifecycle
    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def start(self) -> FaultServer:
        if self._thread is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)

            async def serve() -> None:
                self._release = asyncio.Event()
                self._server = await asyncio.start_server(self._handle, sock=sock)
                ready.set()

            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"fault-server:{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault server did not start")
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            self._release.set()
            for writer in list(self._writers):
                writer.close()
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._thread = None
        self._loop = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---------------------------------------------------------------- control
    def set_fault(self, mode: str = "ok", **options: Any) -> Fault:
        """Replace every queued fault with this one; returns it."""
        fault = Fault(mode=mode, **options)
        self.set_faults([fault])
        return fault

    def set_faults(self, faults: Iterable[Fault]) -> None:
        """Queue faults; each is used for its ``times`` requests, then the next one."""
        faults = [replace(f) for f in faults]  # private copies: `times` counts down
        with self._lock:
            self._faults = faults
        self.release_hangs()

    def release_hangs(self) -> None:
        """End every request now hanging (their connections are closed, no answer)."""
        if self._loop is not None and self._release is not None:
            self._loop.call_soon_threadsafe(self._swap_release)

    def _swap_release(self) -> None:
        self._release.set()
        self._release = asyncio.Event()

    def reset(self) -> None:
        """Normal mode, no recorded requests, counters at zero, default chunk delay."""
        self.set_faults([])
        self.chunk_delay = self._default_chunk_delay
        with self._lock:
            self._requests.clear()
            self._disconnects = 0
            self._prompt_tokens_total = 0
            self._generation_tokens_total = 0

    # ---------------------------------------------------------------- inspection
    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received (admin endpoints excluded), oldest first."""
        with self._lock:
            return list(self._requests)

    def request_count(self, path: str | None = None) -> int:
        """How many requests reached the server, optionally only those for ``path``."""
        with self._lock:
            return sum(1 for r in self._requests if path is None or r.path == path)

    @property
    def disconnects(self) -> int:
        """Requests whose client went away before the answer was complete."""
        with self._lock:
            return self._disconnects

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_path: dict[str, int] = {}
            for request in self._requests:
                by_path[request.path] = by_path.get(request.path, 0) + 1
            return {
                "requests": len(self._requests),
                "by_path": by_path,
                "disconnects": self._disconnects,
                "in_flight": self._in_flight,
                "faults": [asdict(f) for f in self._faults],
            }

    # ---------------------------------------------------------------- connection
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    break
                keep_alive = await self._dispatch(reader, writer, *request)
                if not keep_alive:
                    break
        except (_ClientGone, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def _read_request(
        self, reader: asyncio.StreamReader
    ) -> tuple[str, str, dict[str, str], bytes] | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        return method.upper(), target.split("?", 1)[0], headers, body

    def _next_fault(self, path: str) -> Fault:
        with self._lock:
            for index, fault in enumerate(self._faults):
                if not fault.applies_to(path):
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        del self._faults[index]
                return fault
        return Fault()

    async def _dispatch(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        path: str,
        headers: dict[str, str],
        raw_body: bytes,
    ) -> bool:
        keep_alive = headers.get("connection", "").lower() != "close"
        if path.startswith("/_fault"):
            status, payload = self._admin(method, path, raw_body)
            await self._send_json(writer, status, payload, keep_alive)
            return keep_alive

        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = raw_body.decode("utf-8", "replace")
        fault = self._next_fault(path)
        with self._lock:
            self._requests.append(RecordedRequest(method, path, headers, body, fault.mode))
            self._in_flight += 1
        try:
            return await self._respond(reader, writer, method, path, body, fault, keep_alive)
        except (_ClientGone, ConnectionError):
            with self._lock:
                self._disconnects += 1
            return False
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _respond(self, reader, writer, method, path, body, fault, keep_alive) -> bool:
        if fault.mode == "close":
            writer.close()
            return False
        if fault.mode == "reset":
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if fault.mode == "crash":
            self._server.close()  # the listening socket goes first: connects are refused
            for other in list(self._writers):
                other_sock = other.get_extra_info("socket")
                if other_sock is not None:
                    other_sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                other.transport.abort()
            return False
        if fault.mode == "hang":
            await self._hang(reader)
            return False
        if fault.mode == "delay":
            await asyncio.sleep(fault.delay)
        if fault.mode == "status":
            extra = {"Retry-After": "1"} if fault.status == 429 else {}
            message = f"fault server: injected HTTP {fault.status}"
            await self._send_error(writer, fault.status, message, keep_alive, extra)
            return keep_alive
        return await self._answer(writer, method, path, body, fault, keep_alive)

    async def _hang(self, reader: asyncio.StreamReader) -> None:
        release = asyncio.ensure_future(self._release.wait())
        client_gone = asyncio.ensure_future(reader.read(1))
        done, pending = await asyncio.wait(
            {release, client_gone}, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        if client_gone in done:
            raise _ClientGone

    # ---------------------------------------------------------------- normal answers
    async def _answer(self, writer, method, path, body, fault, keep_alive) -> bool:
        if path == "/health":
            await self._send(writer, 200, b"", "text/plain", keep_alive)
        elif path == "/metrics":
            await self._send(writer, 200, self._metrics_text().encode(), "text/plain", keep_alive)
        elif path == "/v1/models" and method == "GET":
            created = 1700000000
            models = [
                {"id": m, "object": "model", "created": created, "owned_by": "fault-server"}
                for m in self.models
            ]
            await self._send_json(writer, 200, {"object": "list", "data": models}, keep_alive)
        elif path in INFERENCE_PATHS and method == "POST":
            if not isinstance(body, dict):
                await self._send_error(writer, 400, "body must be a JSON object", keep_alive)
                return keep_alive
            return await self._complete(writer, path, body, fault, keep_alive)
        else:
            await self._send_error(writer, 404, f"no route for {method} {path}", keep_alive)
        return keep_alive

    async def _complete(self, writer, path, body, fault, keep_alive) -> bool:
        chat = path == "/v1/chat/completions"
        if chat:
            messages = body.get("messages") or []
            prompt_text = " ".join(_message_text(m) for m in messages)
            users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            last_user = _message_text(users[-1]) if users else ""
            prompt_tokens = count_tokens(prompt_text) + 2 * len(messages)
        else:
            prompt = body.get("prompt", "")
            last_user = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
            prompt_tokens = count_tokens(last_user) + 1
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        words, finish_reason = reply_words(last_user, int(max_tokens))
        n = int(body.get("n") or 1)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words) * n,
            "total_tokens": prompt_tokens + len(words) * n,
        }
        with self._lock:
            self._prompt_tokens_total += usage["prompt_tokens"]
            self._generation_tokens_total += usage["completion_tokens"]
        model = body.get("model") or self.models[0]
        ident = f"{'chatcmpl' if chat else 'cmpl'}-fault{self.request_count():06d}"
        created = int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = _stream_events(
                chat, ident, created, model, words, finish_reason, n, usage, include_usage
            )
            await self._send_stream(writer, events, fault, keep_alive)
            return keep_alive and fault.mode != "drop_stream"
        text = " ".join(words)
        if chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
                for i in range(n)
            ]
            obj = "chat.completion"
        else:
            choices = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}
                for i in range(n)
            ]
            obj = "text_completion"
        payload = {
            "id": ident,
            "object": obj,
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage,
        }
        if fault.mode == "drop_stream":
            data = json.dumps(payload).encode()
            head = _head(200, "application/json", {"Content-Length": str(len(data))}, True)
            writer.write(head + data[: len(data) // 2])
            await writer.drain()
            writer.transport.abort()
            return False
        await self._send_json(writer, 200, payload, keep_alive)
        return keep_alive

    async def _send_stream(self, writer, events: list[str], fault: Fault, keep_alive) -> None:
        head = _head(
            200,
            "text/event-stream",
            {"Transfer-Encoding": "chunked", "Cache-Control": "no-cache"},
            keep_alive,
        )
        writer.write(head)
        await writer.drain()
        for index, event in enumerate(events):
            if fault.mode == "drop_stream" and index >= fault.after_chunks:
                writer.transport.abort()  # no terminating chunk: a truncated body
                return
            data = f"data: {event}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            try:
                await writer.drain()
            except ConnectionError as exc:
                raise _ClientGone from exc
            if writer.is_closing():
                raise _ClientGone
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    # ---------------------------------------------------------------- admin + plumbing
    def _admin(self, method: str, path: str, raw_body: bytes) -> tuple[int, Any]:
        try:
            if path == "/_fault/stats" and method == "GET":
                return 200, self.stats()
            if path == "/_fault/reset" and method == "POST":
                self.reset()
                return 200, self.stats()
            if path == "/_fault" and method == "POST":
                spec = json.loads(raw_body or b"{}")
                specs = spec if isinstance(spec, list) else [spec]
                self.set_faults([Fault(**s) for s in specs])
                return 200, self.stats()
        except (TypeError, ValueError) as exc:
            return 400, _error_body(400, str(exc))
        return 404, _error_body(404, f"no admin route {method} {path}")

    def _metrics_text(self) -> str:
        with self._lock:
            running = self._in_flight
            prompt = self._prompt_tokens_total
            generation = self._generation_tokens_total
        labels = f'{{engine="0",model_name="{self.models[0]}"}}'
        return (
            f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{labels} "
            f"{running}\n"
            f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{labels} 0\n"
            f"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{labels} 0.0\n"
            f"# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{labels} "
            f"{prompt}\n"
            f"# TYPE vllm:generation_tokens_total counter\n"
            f"vllm:generation_tokens_total{labels} {generation}\n"
        )

    async def _send_error(self, writer, status, message, keep_alive, extra=None) -> None:
        await self._send_json(writer, status, _error_body(status, message), keep_alive, extra)

    async def _send_json(self, writer, status, payload, keep_alive, extra=None) -> None:
        data = json.dumps(payload).encode()
        await self._send(writer, status, data, "application/json", keep_alive, extra)

    async def _send(self, writer, status, data, content_type, keep_alive, extra=None) -> None:
        headers = {"Content-Length": str(len(data)), **(extra or {})}
        writer.write(_head(status, content_type, headers, keep_alive) + data)
        await writer.drain()


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, list):  # content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


def _error_body(status: int, message: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "APIError")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _head(status: int, content_type: str, headers: dict[str, str], keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    lines.append(f"Content-Type: {content_type}")
    lines.append("Connection: " + ("keep-alive" if keep_alive else "close"))
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _stream_events(chat, ident, created, model, words, finish_reason, n, usage, include_usage):
    """The SSE payloads in vLLM's order: role, one per token, finish, usage, [DONE]."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    events = []

    def chunk(choices, **extra):
        payload = {"id": ident, "object": obj, "created": created, "model": model}
        payload["choices"] = choices
        if include_usage:
            payload["usage"] = None
        payload.update(extra)
        events.append(json.dumps(payload))

    for i in range(n):
        if chat:
            chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, **_open()}])
        for position, word in enumerate(words):
            piece = word if position == 0 else " " + word
            last = position == len(words) - 1
            reason = finish_reason if last else None
            if chat:
                chunk([{"index": i, "delta": {"content": piece}, **_open(reason)}])
            else:
                chunk([{"index": i, "text": piece, **_open(reason)}])
    if include_usage:
        chunk([], usage=usage)
    events.append("[DONE]")
    return events


def _open(finish_reason: str | None = None) -> dict[str, Any]:
    return {"logprobs": None, "finish_reason": finish_reason}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the fault-injecting upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", action="append", dest="models")
    args = parser.parse_args(argv)
    server = FaultServer(port=args.port, host=args.host, models=args.models or ("tiny",))
    server.start()
    print(f"fault server on {server.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
