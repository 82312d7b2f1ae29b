"""GET /v1/models and /v1/models/{model}.

Each model carries `capabilities`: the endpoints it can be called on, learnt
from its servers (backends/capabilities.py) plus the APIs the gateway
translates onto chat completions (gateway/capabilities.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from backends.pool import ReplicaPool
from gateway.auth import CallerDep
from gateway.capabilities import advertised
from gateway.errors import APIError

router = APIRouter(prefix="/v1", tags=["models"])

CREATED = 1_700_000_000  # models have no creation time here; a fixed one keeps lists stable


def _model(name: str, pool: ReplicaPool) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": CREATED,
        "owned_by": "bearpaw",
        "capabilities": advertised(pool.capabilities(name)),
    }


@router.get("/models")
async def list_models(request: Request, _: CallerDep) -> dict:
    pool = request.app.state.bearpaw.pool
    return {"object": "list", "data": [_model(n, pool) for n in pool.model_names()]}


@router.get("/models/{model:path}")
async def get_model(model: str, request: Request, _: CallerDep) -> dict:
    pool = request.app.state.bearpaw.pool
    if model not in pool.model_names():
        raise APIError(
            404, f"The model '{model}' does not exist", code="model_not_found", param="model"
        )
    return _model(model, pool)
