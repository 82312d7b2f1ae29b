"""POST /v1/messages/count_tokens: the replica renders and counts the prompt.

The request is translated exactly as messages.create translates it (system,
tools, prefill flags), then sent through the pipeline as a vLLM `/tokenize`
call, which applies the model's chat template: the count equals the
input_tokens messages.create reports, and the call is authenticated, admitted,
routed and metered (with no tokens: counting generates nothing) like any other.
"""

from __future__ import annotations

from gateway.caller import Caller
from gateway.dialects.messages.protocol import CountTokensRequest
from gateway.dialects.messages.translate import prompt_fields
from gateway.errors import APIError
from gateway.pipeline import Call, Pipeline

API = "messages.count_tokens"


async def count_input_tokens(
    pipeline: Pipeline, caller: Caller, request_id: str, req: CountTokensRequest
) -> int:
    call = Call(
        endpoint="tokenize",
        body={"model": req.model, **prompt_fields(req)},
        caller=caller,
        request_id=request_id,
        api=API,
    )
    outcome = await pipeline.run(call)
    body = outcome.body or {}
    if outcome.status >= 400:
        error = body.get("error") or {}
        raise APIError(
            outcome.status,
            str(error.get("message") or "The backend could not count the tokens."),
            code=error.get("code"),
            headers=outcome.headers,
        )
    count = body.get("count")
    if not isinstance(count, int):
        raise APIError(500, "The backend did not count the tokens of this request.")
    return count
