"""POST /v1/messages/count_tokens: the replica renders and counts the prompt.

The request is translated exactly as messages.create translates it (system,
tools, prefill flags), then vLLM's `/tokenize` applies the model's chat
template, so the count equals the input_tokens messages.create reports.
"""

from __future__ import annotations

from typing import Any

from backends.pool import ReplicaPool
from gateway.dialects.messages.protocol import CountTokensRequest
from gateway.dialects.messages.translate import prompt_fields
from gateway.errors import APIError


async def count_input_tokens(pool: ReplicaPool, req: CountTokensRequest) -> int:
    fields = prompt_fields(req)
    canonical = await pool.resolve_or_discover(req.model)
    if canonical is None:
        raise APIError(
            404, f"The model `{req.model}` does not exist or you do not have access to it."
        )
    body: dict[str, Any] = {"model": canonical, **fields}
    response = await pool.request(canonical, "/tokenize", body, at_root=True)
    count = response.body.get("count")
    if not isinstance(count, int):
        raise APIError(500, "The backend did not count the tokens of this request.")
    return count
