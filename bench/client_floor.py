"""How many requests/s the gateway's HTTP client alone can make from one core.

A proxied request costs the gateway one server exchange (its client to it) and
one client exchange (it to the backend). ``gateway_overhead.py`` measures the
first alone as the framework floor (GET /health); this measures the second
alone: the same engine the gateway's ``ReplicaPool`` sends requests with
(``backends.http_engine``), posting the benchmark's chat body to the zero-delay upstream
from one pinned process, with nothing else in it. Together they bound what one
gateway process can ever reach on this CPU, before any of its own work::

    ceiling = 1 / (1 / server_floor + 1 / client_floor)

Run alone: ``python bench/client_floor.py --url http://127.0.0.1:PORT/v1/chat/completions``
(``gateway_overhead.py`` runs it for you, pinned to the gateway's CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import orjson

from backends.config import BackendSettings
from backends.pool import ReplicaPool


async def measure(
    url: str, payload: str, engine: str, concurrency: int, seconds: float
) -> dict[str, float]:
    pool = ReplicaPool(BackendSettings(http_engine=engine, discover=[]))
    client = pool._engine
    connect, read = pool._request_timeout(None)
    body = payload.encode()
    headers = {"content-type": "application/json"}
    done = 0
    stop_at = 0.0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            response = await client.post(url, body, headers, connect, read)
            # Read and parse like the gateway does: the body is the answer.
            orjson.loads(response.content)
            done += 1

    try:
        # Warm-up opens the connections, so the timed part measures reuse.
        stop_at = time.perf_counter() + 1.0
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        done = 0
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await pool.close()
    return {"engine": engine, "concurrency": concurrency, "rps": done / elapsed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--payload", default=None, help="JSON body (default: the bench chat body)")
    parser.add_argument("--engine", choices=["httpcore", "aiohttp", "native"], default="aiohttp")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    payload = args.payload
    if payload is None:
        from gateway_overhead import body

        payload = body(stream=False)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # the gateway runs on uvloop when it is there; so does this
        runner = asyncio.run
    result = runner(measure(args.url, payload, args.engine, args.concurrency, args.seconds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
