"""A CPU stand-in for vLLM, only for rehearsing bench/gpu_stack.py's process
plumbing before spending GPU time: /v1/models, /health, /v1/chat/completions
(JSON or SSE, exactly max_tokens chunks with ignore_eos) and a vLLM-shaped
/metrics. Its step time grows with the sequences running, so the SLO loop has
something to react to; its numbers mean nothing.

    python bench/gpu/fake_vllm.py --port 18100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
app = FastAPI()
state = {"running": 0, "gen": 0, "ttft": [0] * (len(BUCKETS) + 1), "itl": [0] * (len(BUCKETS) + 1)}
sums = {"ttft": 0.0, "itl": 0.0}


def observe(name: str, value: float) -> None:
    sums[name] += value
    for i, b in enumerate(BUCKETS):
        if value <= b:
            state[name][i] += 1
            return
    state[name][-1] += 1


def step() -> float:
    return 0.004 + 0.0002 * state["running"]


async def tokens(n: int, prompt_chars: int):
    state["running"] += 1
    try:
        start = time.monotonic()
        await asyncio.sleep(step() + prompt_chars * 2e-6)
        observe("ttft", time.monotonic() - start)
        last = time.monotonic()
        for i in range(n):
            if i:
                await asyncio.sleep(step())
                now = time.monotonic()
                observe("itl", now - last)
                last = now
            state["gen"] += 1
            yield i
    finally:
        state["running"] -= 1


@app.get("/health")
async def health() -> PlainTextResponse:
    return PlainTextResponse("")


@app.get("/v1/models")
async def models() -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": "llama", "object": "model"}]})


@app.post("/v1/chat/completions")
async def chat(request: Request):
    body = await request.json()
    n = int(body.get("max_tokens") or 16)
    chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
    usage = {"prompt_tokens": chars // 4, "completion_tokens": n, "total_tokens": chars // 4 + n}
    if not body.get("stream"):
        async for _ in tokens(n, chars):
            pass
        return JSONResponse(
            {
                "id": "x",
                "object": "chat.completion",
                "model": "llama",
                "created": 0,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "length",
                        "message": {"role": "assistant", "content": "w " * n},
                    }
                ],
                "usage": usage,
            }
        )

    async def sse():
        head = {"id": "x", "object": "chat.completion.chunk", "model": "llama", "created": 0}
        async for i in tokens(n, chars):
            delta = {"content": "w "} if i else {"role": "assistant", "content": "w "}
            choice = {"index": 0, "delta": delta, "finish_reason": None}
            yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        end = {"index": 0, "delta": {}, "finish_reason": "length"}
        yield f"data: {json.dumps({**head, 'choices': [end]})}\n\n"
        if (body.get("stream_options") or {}).get("include_usage"):
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")


@app.get("/metrics")
async def metrics() -> PlainTextResponse:
    lab = 'model_name="llama",engine="0"'
    out = [
        f"vllm:num_requests_running{{{lab}}} {state['running']}",
        f"vllm:num_requests_waiting{{{lab}}} 0",
        f"vllm:kv_cache_usage_perc{{{lab}}} {state['running'] / 1000}",
        f"vllm:generation_tokens_total{{{lab}}} {state['gen']}",
    ]
    for name, metric in (
        ("ttft", "time_to_first_token_seconds"),
        ("itl", "inter_token_latency_seconds"),
    ):
        acc = 0
        for b, c in zip([*BUCKETS, "+Inf"], state[name], strict=True):
            acc += c
            out.append(f'vllm:{metric}_bucket{{{lab},le="{b}"}} {acc}')
        out.append(f"vllm:{metric}_count{{{lab}}} {acc}")
        out.append(f"vllm:{metric}_sum{{{lab}}} {sums[name]}")
    return PlainTextResponse("\n".join(out) + "\n")


if __name__ == "__main__":
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=18100)
    uvicorn.run(app, host="127.0.0.1", port=p.parse_args().port, log_level="warning")
