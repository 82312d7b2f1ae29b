"""GET /admin/latency/streams: the interactive stream latencies the gateway
measured (gateway/stream_latency.py), for the batch workers' SLO loop."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Query, Request

from gateway.auth import AdminDep

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.get("/latency/streams")
async def stream_latencies(
    request: Request,
    after: int = Query(default=0, ge=0, description="the last seq already read"),
    model: str | None = None,
) -> dict[str, Any]:
    ring = request.app.state.bearpaw.pipeline.stream_latencies
    now = time.monotonic()
    samples = [] if ring is None else ring.after(after)
    data = [
        {
            "seq": s.seq,
            # An age, not a timestamp: the reader's clock need not be this one.
            "age_s": round(now - s.at, 6),
            "model": s.model,
            "ttft_s": s.ttft_s,
            "tpot_s": s.tpot_s,
            "tokens": s.tokens,
            "duration_s": s.duration_s,
        }
        for s in samples
        if model is None or s.model == model
    ]
    last = 0 if ring is None else ring.last_seq
    return {"object": "list", "last_seq": last, "data": data}
