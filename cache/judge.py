"""Does a fresh backend answer match the cached answer a lookup would have served?

This is the verdict the wrong-hit bound learns from. For a deterministic
request (temperature 0) the backend would give the same text to the same
question, so the cached answer is right exactly when the texts are equal
(whitespace aside). For a sampled request two right answers can differ in
wording, so the judge embeds both answers with the cache's embedder and calls
them the same when their cosine is at least ``ANSWER_MATCH_COSINE``: a lenient
judge makes the bound lenient too, which is why the threshold is high and
fixed rather than tuned.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

ANSWER_MATCH_COSINE = 0.9

Embed = Callable[[list[str]], Awaitable[np.ndarray]]


def answer_text(response: dict[str, Any]) -> str:
    """The answer's text: every choice's content and tool calls, in order."""
    parts: list[str] = []
    for choice in response.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            parts.append(str(message.get("content") or ""))
            if message.get("tool_calls"):
                parts.append(json.dumps(message["tool_calls"], sort_keys=True))
        else:
            parts.append(str(choice.get("text") or ""))
    return " ".join(" ".join(parts).split())


def is_deterministic(request: dict[str, Any]) -> bool:
    temperature = request.get("temperature")
    try:
        return temperature is not None and float(temperature) == 0.0
    except (TypeError, ValueError):
        return False


async def answers_match(
    cached: dict[str, Any], fresh: dict[str, Any], deterministic: bool, embed: Embed
) -> bool:
    a, b = answer_text(cached), answer_text(fresh)
    if a == b:
        return True
    if deterministic or not a or not b:
        return False
    vectors = await embed([a, b])
    return float(np.dot(vectors[0], vectors[1])) >= ANSWER_MATCH_COSINE
