"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    state = request.app.state.bearpaw
    replicas = state.pool.snapshot()
    # "ready" is healthy with a breaker that is not open: what routing uses.
    healthy = [r for r in replicas if r.get("ready", r.get("healthy"))]
    draining = state.extras.get("draining", False)
    ok = bool(healthy) and not draining
    # Inference does not need the database, Redis or the broker (usage is
    # spooled, keys are cached, jobs wait in the outbox): their state is
    # reported here for alerts, but only replicas and draining decide readiness.
    spool = state.extras.get("usage_spool")
    dependencies = state.extras.get("dependencies")
    outbox = state.extras.get("tasks")
    body = {
        "status": "ready" if ok else "not_ready",
        "draining": draining,
        "replicas": replicas,
        "dependencies": dependencies.snapshot() if dependencies is not None else {},
        "usage_spool": {
            "depth": spool.depth if spool is not None else 0,
            "oldest_age_s": spool.oldest_age_s() if spool is not None else None,
        },
        "task_outbox": {"depth": getattr(outbox, "depth", 0)},
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = request.app.state.bearpaw.extras.get("registry")
    data = generate_latest(registry) if registry is not None else generate_latest()
    return Response(data, media_type=CONTENT_TYPE_LATEST)
