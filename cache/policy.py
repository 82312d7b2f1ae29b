"""Which requests may use the cache at all (per-tenant policy).

A request bypasses the cache — no lookup and no store — when a cached answer
would be wrong by construction, not merely unlikely to match:

* ``disabled`` — the tenant turned the cache off.
* ``n>1`` / ``best_of>1`` — the caller asked for several distinct samples.
* ``sampling`` — temperature is above 0, or absent (OpenAI's default is 1.0),
  so the caller expects a fresh draw; tenants may opt in with
  ``allow_sampling`` when "one good answer" is what they want.
* ``logprobs`` — log-probabilities describe one particular generation.
* ``tool_calls_in_flight`` — the last message is a tool/function result, or an
  assistant turn with tool calls follows the last user turn: the model is in
  the middle of an agent loop whose state lives outside the text.
* ``no_user_turn`` / ``empty_query`` — nothing to match.
* ``non_text`` — the last user turn carries images, audio or files, or the
  completion prompt is token ids.
* ``multiple_prompts`` — a completion request with several prompts.
* ``unsupported_request`` — neither ``messages`` nor ``prompt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cache.keys import last_user_index, query_text

OPERATING_POINTS = ("strict", "balanced", "aggressive")


@dataclass
class CachePolicy:
    enabled: bool = True
    allow_sampling: bool = False
    # Verifier threshold profile, see cache/verifier.py.
    operating_point: str = "balanced"

    def __post_init__(self) -> None:
        if self.operating_point not in OPERATING_POINTS:
            raise ValueError(
                f"operating_point must be one of {OPERATING_POINTS}, got {self.operating_point!r}"
            )


def _as_number(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _chat_bypass(messages: list[Any]) -> str | None:
    if not messages:
        return "no_user_turn"
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") in ("tool", "function"):
        return "tool_calls_in_flight"
    idx = last_user_index(messages)
    if idx is None:
        return "no_user_turn"
    for message in messages[idx + 1 :]:
        if isinstance(message, dict) and (
            message.get("tool_calls") or message.get("function_call")
        ):
            return "tool_calls_in_flight"
    content = messages[idx].get("content")
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") not in ("text", "input_text"):
                return "non_text"
    elif not isinstance(content, str):
        return "non_text"
    return None


def _completion_bypass(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return None
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return None
        if prompt and all(isinstance(p, str) for p in prompt):
            return "multiple_prompts"
    return "non_text"


def cache_decision(request: dict, policy: CachePolicy) -> str | None:
    """None when the request may be served from / stored in the cache, else why not."""
    if not policy.enabled:
        return "disabled"
    if _as_number(request.get("n"), 1) > 1:
        return "n>1"
    if _as_number(request.get("best_of"), 1) > 1:
        return "best_of>1"
    temperature = request.get("temperature")
    if not policy.allow_sampling and (temperature is None or _as_number(temperature, 1.0) > 0):
        return "sampling"
    # Chat uses a boolean, legacy completions an integer count; both mean "yes".
    if request.get("logprobs") or request.get("top_logprobs"):
        return "logprobs"
    if "messages" in request:
        reason = _chat_bypass(list(request.get("messages") or []))
    elif "prompt" in request:
        reason = _completion_bypass(request.get("prompt"))
    else:
        reason = "unsupported_request"
    if reason is not None:
        return reason
    if not query_text(request).strip():
        return "empty_query"
    return None
