"""Finding replicas by asking servers which models they serve (``GET /v1/models``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from backends.config import ReplicaConfig


@dataclass(frozen=True, slots=True)
class DiscoveredModel:
    id: str
    owned_by: str | None = None
    max_model_len: int | None = None
    parent: str | None = None  # set for vLLM LoRA adapters

    @property
    def is_vllm(self) -> bool:
        return self.owned_by == "vllm"


def parse_models_response(body: Any) -> list[DiscoveredModel]:
    """Models listed in an OpenAI ``/v1/models`` answer; malformed entries are skipped."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ValueError("not an OpenAI model list")
    models: list[DiscoveredModel] = []
    for item in body["data"]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        max_len = item.get("max_model_len")
        models.append(
            DiscoveredModel(
                id=item["id"],
                owned_by=item.get("owned_by") if isinstance(item.get("owned_by"), str) else None,
                max_model_len=max_len if isinstance(max_len, int) else None,
                parent=item.get("parent") if isinstance(item.get("parent"), str) else None,
            )
        )
    return models


async def fetch_models(
    client: httpx.AsyncClient,
    url: str,
    *,
    api_key: str | None = None,
    timeout: httpx.Timeout | float | None = None,
) -> list[DiscoveredModel]:
    """GET ``{url}/models``; raises httpx.HTTPError or ValueError when it cannot."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    response = await client.get(url.rstrip("/") + "/models", headers=headers, timeout=timeout)
    response.raise_for_status()
    return parse_models_response(response.json())


def replica_for(url: str, model: DiscoveredModel, api_key: str | None = None) -> ReplicaConfig:
    """The replica configuration for one model found at ``url``."""
    return ReplicaConfig(
        url=url.rstrip("/"), api_key=api_key, upstream_model=model.id, vllm=model.is_vllm
    )
