"""Cache keys: the namespace a request lives in, its exact key and its query text.

Safety rests on the namespace. Two requests may share a cached answer only if
everything that can change the answer — tenant, model, the whole conversation
except the wording of the last user turn, and every generation parameter — is
identical. Parameters are handled with a deny-list of keys known NOT to change
the answer; anything else, including parameters OpenAI adds in the future, is
part of the namespace, so an unknown parameter can only cost a hit, never
serve a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Keys that change transport, bookkeeping or attribution but never the text the
# model produces.
NON_ANSWER_KEYS: frozenset[str] = frozenset(
    {
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "request_id",
        "x_request_id",
        "idempotency_key",
        "timeout",
    }
)

# Bumped whenever the key layout changes so old rows can never match new keys.
KEY_VERSION = 1

_LAST_USER_PLACEHOLDER = "<bearpaw:last-user-turn>"


def _normalise(value: Any) -> Any:
    """Make JSON-equal values serialise identically (1 vs 1.0, dropped nulls)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    return str(value)


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, normalised numbers."""
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _answer_params(request: dict) -> dict:
    return {
        k: v
        for k, v in request.items()
        if k not in NON_ANSWER_KEYS and k not in ("messages", "prompt", "model") and v is not None
    }


def last_user_index(messages: list[Any]) -> int | None:
    """Position of the last message with role "user", or None."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if isinstance(message, dict) and message.get("role") == "user":
            return i
    return None


def _conversation_context(request: dict) -> tuple[str, Any]:
    """Everything in the input except the words matched by meaning."""
    if "messages" in request:
        messages = list(request.get("messages") or [])
        idx = last_user_index(messages)
        if idx is not None:
            # Keep the turn's position, role and any other fields (name, ...) —
            # and every message after it, e.g. an assistant prefill — so only
            # the content itself is left to semantic matching.
            turn = dict(messages[idx])
            turn["content"] = _LAST_USER_PLACEHOLDER
            messages[idx] = turn
        return "chat", messages
    if "prompt" in request:
        # A completion prompt is matched by meaning as a whole: no prefix.
        return "completion", None
    # Unknown request shapes still get a unique, conservative namespace.
    return "other", None


def namespace_for(tenant: str, model: str, request: dict) -> str:
    """Hash of everything that must be identical for two requests to share an answer."""
    kind, context = _conversation_context(request)
    payload = {
        "v": KEY_VERSION,
        "tenant": tenant,
        "model": model,
        "kind": kind,
        "context": context,
        "params": _answer_params(request),
    }
    return _sha256(canonical_json(payload))


def canonical_hash(namespace: str, request: dict) -> str:
    """Exact-layer key: namespace plus the full request minus volatile fields."""
    body = {k: v for k, v in request.items() if k not in NON_ANSWER_KEYS}
    return _sha256(f"{KEY_VERSION}\n{namespace}\n{canonical_json(body)}")


def content_text(content: Any) -> str:
    """Text of a message content: a string, or the text parts of a part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text"):
                texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    return ""


def query_text(request: dict) -> str:
    """The text matched by meaning: the last user turn, or the completion prompt."""
    if "messages" in request:
        messages = request.get("messages") or []
        idx = last_user_index(messages)
        return "" if idx is None else content_text(messages[idx].get("content"))
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    return ""
