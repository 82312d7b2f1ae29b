"""Memory under a long mixed load: the gateway's RSS after 100k and after N requests.

Starts the zero-delay upstream and one gateway process (uvicorn, uvloop, cache
ON, JSON access log on, usage records in SQLite) and sends `--requests`
requests (default 1,000,000) over `--connections` keep-alive connections, in
a fixed mix out of every 100:

    55 chat JSON (no-store)       20 chat streams (no-store)   10 exact cache hits
     3 bad bodies (400)            2 bad keys (401)              2 unknown models (404)
     3 backend failures (a replica that answers 500; once its breaker opens, 503)
     3 clients that hang up right after sending a JSON request
     2 clients that hang up after the first event of a slow stream

The cache-hit requests repeat 20 fixed questions (temperature 0), so after the
first 20 misses they are all exact hits and the cache stays 20 entries: what
the run measures is the request path's own memory, not stored answers. The
gateway's RSS (VmRSS of its process) is printed at every `--every` requests
and at the end, with the requests/s and the statuses seen per kind; the goal
is at most 10 % growth from the 100k point to the end.

    python bench/soak.py                        # 1,000,000 requests (~20 min here)
    python bench/soak.py --requests 200000      # shorter; both RSS points still print
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import free_port, markdown_table, start_gateway, start_upstream  # noqa: E402

# Out of every 100 requests (order shuffled deterministically below).
MIX = {
    "json": 55,
    "stream": 20,
    "cache_hit": 10,
    "bad_body": 3,
    "bad_key": 2,
    "no_model": 2,
    "backend_500": 3,
    "hangup_json": 3,
    "hangup_stream": 2,
}
HIT_QUESTIONS = 20


def schedule() -> list[str]:
    """The 100-request cycle: kinds interleaved, not in blocks (a stride walk)."""
    kinds = [k for k, n in MIX.items() for _ in range(n)]
    assert len(kinds) == 100
    return [kinds[(i * 37) % 100] for i in range(100)]  # 37 is coprime with 100


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _raw(path: str, body: dict | str, key: str, cache_control: str) -> bytes:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    cc = f"cache-control: {cache_control}\r\n" if cache_control else ""
    return (
        f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {key}\r\ncontent-length: {len(data)}\r\n{cc}\r\n"
    ).encode() + data


def build_requests(key: str, i: int, kind: str) -> tuple[bytes, bool]:
    """(request bytes, whether it is a stream) for request number i of `kind`."""
    path = "/v1/chat/completions"
    chat = {"model": "bench", "max_tokens": 16}
    text = f"soak request {i}: say hello in five words."
    cc = "no-store"
    stream = False
    if kind in ("json", "hangup_json"):
        body: dict | str = {**chat, "messages": [{"role": "user", "content": text}]}
    elif kind == "stream":
        body = {**chat, "messages": [{"role": "user", "content": text}], "stream": True}
        stream = True
    elif kind == "hangup_stream":
        body = {
            **chat,
            "messages": [{"role": "user", "content": text}],
            "stream": True,
            "user": "bench-slow",
        }
        stream = True
    elif kind == "cache_hit":
        q = f"soak cached question number {i % HIT_QUESTIONS}?"
        body = {**chat, "temperature": 0, "messages": [{"role": "user", "content": q}]}
        cc = ""  # looked up and stored like any client's request
    elif kind == "bad_body":
        body = {"model": "bench", "messages": "not a list"}
    elif kind == "bad_key":
        body = {**chat, "messages": [{"role": "user", "content": text}]}
        key = "sk-bearpaw-not-a-key"
    elif kind == "no_model":
        body = {**chat, "model": "no-such-model", "messages": [{"role": "user", "content": text}]}
    elif kind == "backend_500":
        body = {**chat, "model": "bench-fail", "messages": [{"role": "user", "content": text}]}
    else:
        raise ValueError(kind)
    return _raw(path, body, key, cc), stream


@dataclass
class Tally:
    done: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    hits: int = 0
    failures: Counter[str] = field(default_factory=Counter)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, lower, bytes(body)
            body += (await reader.readexactly(size + 2))[:-2]
    start = lower.index(b"content-length:") + len(b"content-length:")
    length = int(lower[start : lower.index(b"\r\n", start)])
    return status, lower, await reader.readexactly(length)


async def client(
    port: int, key: str, cycle: list[str], total: int, counter: list[int], tally: Tally
) -> None:
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while True:
        i = counter[0]
        if i >= total:
            break
        counter[0] += 1
        kind = cycle[i % 100]
        raw, _ = build_requests(key, i, kind)
        try:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = conn
            writer.write(raw)
            if kind == "hangup_json":
                await writer.drain()
                writer.close()  # gone before the answer
                conn = None
            elif kind == "hangup_stream":
                head = await reader.readuntil(b"\r\n\r\n")
                tally.statuses[(kind, int(head[9:12]))] += 1
                await reader.readuntil(b"\n\n")  # the first event
                writer.close()
                conn = None
            else:
                status, headers, body = await read_response(reader)
                tally.statuses[(kind, status)] += 1
                if kind == "cache_hit" and b"x-bearpaw-cache: hit" in headers:
                    tally.hits += 1
                if kind == "stream" and status == 200 and not body.endswith(b"data: [DONE]\n\n"):
                    tally.failures["stream without [DONE]"] += 1
                if b"connection: close" in headers:
                    writer.close()
                    conn = None
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            tally.failures[f"{kind}: {type(exc).__name__}"] += 1
            if conn is not None:
                conn[1].close()
            conn = None
        tally.done += 1


async def drive(
    port: int, key: str, pid: int, total: int, conns: int, every: int
) -> list[list[object]]:
    cycle = schedule()
    tally = Tally()
    counter = [0]
    rows: list[list[object]] = []
    started = time.monotonic()
    tasks = [
        asyncio.create_task(client(port, key, cycle, total, counter, tally)) for _ in range(conns)
    ]
    marks = sorted({*range(every, total + 1, every), 100_000, total} - {0})
    marks = [m for m in marks if m <= total]
    last_t, last_n = started, 0
    while marks:
        await asyncio.sleep(0.05)
        if tally.done >= marks[0] or all(t.done() for t in tasks):
            now = time.monotonic()
            mark = marks.pop(0)
            rate = (tally.done - last_n) / (now - last_t) if now > last_t else 0.0
            rss = rss_mib(pid)
            rows.append([mark, tally.done, round(rss, 1), round(rate), round(now - started)])
            print(
                json.dumps(
                    {"requests": tally.done, "rss_mib": round(rss, 1), "req_per_s": round(rate)}
                ),
                flush=True,
            )
            last_t, last_n = now, tally.done
    await asyncio.gather(*tasks)
    drive.tally = tally  # type: ignore[attr-defined]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--every", type=int, default=100_000, help="print RSS this often")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    pin = args.pin if args.pin is not None else (os.cpu_count() or 1) >= 2
    gw_cpu, load_cpu = ("1", "0") if pin else (None, None)
    if load_cpu is not None:
        os.sched_setaffinity(0, {int(load_cpu)})  # this driver beside the upstream
    up_port = free_port()
    upstream = start_upstream(up_port, cpus=load_cpu)
    base = f"http://127.0.0.1:{up_port}"
    models = [
        {"name": "bench", "replicas": [{"url": f"{base}/v1", "vllm": False}]},
        {"name": "bench-fail", "replicas": [{"url": f"{base}/fail/v1", "vllm": False}]},
    ]
    gateway = start_gateway(models, cache=True, cpus=gw_cpu, log_level=args.log_level)
    pid = gateway.proc.popen.pid
    port = int(gateway.url.rsplit(":", 1)[1].split("/")[0])
    rss_start = rss_mib(pid)
    t0 = time.monotonic()
    try:
        rows = asyncio.run(
            drive(port, gateway.key, pid, args.requests, args.connections, args.every)
        )
    finally:
        gateway.stop()
        upstream.stop()
    elapsed = time.monotonic() - t0
    tally: Tally = drive.tally  # type: ignore[attr-defined]
    print(
        f"\ngateway pinned to CPU {gw_cpu}, upstream and this driver to CPU {load_cpu}; "
        f"{args.connections} connections; cache on; log level {args.log_level}; "
        f"{tally.done:,} requests in {elapsed:,.0f} s ({tally.done / elapsed:,.0f} req/s)\n"
    )
    print(f"RSS after start-up (ready, before any request): {rss_start:,.1f} MiB\n")
    print(markdown_table(["mark", "requests done", "RSS MiB", "req/s since last", "s"], rows))
    by_mark = {r[0]: float(r[2]) for r in rows}  # type: ignore[arg-type]
    if 100_000 in by_mark and args.requests > 100_000:
        end = by_mark[args.requests]
        growth = (end - by_mark[100_000]) / by_mark[100_000]
        verdict = "met" if growth <= 0.10 else "NOT met"
        print(
            f"\nRSS after 100k: {by_mark[100_000]:,.1f} MiB; after {args.requests:,}: "
            f"{end:,.1f} MiB; growth {100 * growth:+.1f} % (goal <= 10 %): {verdict}"
        )
    kinds = sorted({k for k, _ in tally.statuses})
    print("\nstatuses by kind:")
    for kind in kinds:
        seen = {s: n for (k, s), n in sorted(tally.statuses.items()) if k == kind}
        print(f"  {kind:14s} {seen}")
    sent_hits = sum(n for (k, _), n in tally.statuses.items() if k == "cache_hit")
    print(f"  cache hits: {tally.hits:,} of {sent_hits:,} cache-hit requests")
    hangups = sum(1 for k in schedule() if k == "hangup_json") * args.requests // 100
    print(f"  hang-ups right after sending (no status read): ~{hangups:,}")
    if tally.failures:
        print(f"  client-side failures: {dict(tally.failures)}")


if __name__ == "__main__":
    main()
