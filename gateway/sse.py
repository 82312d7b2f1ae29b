"""Server-sent events for OpenAI streams: parse, assemble into a full answer, replay.

Assembly lets a streamed miss be cached and metered like a plain one; replay
turns a cached answer back into a stream the SDKs parse like a live one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def parse_event(raw: bytes) -> dict[str, Any] | None:
    """The JSON payload of one `data:` event; None for [DONE], comments and blanks."""
    payload = b""
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            payload += line[5:].strip()
    if not payload or payload == b"[DONE]":
        return None
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class StreamAssembler:
    """Accumulates chunks of a chat or text completion stream into the answer
    the same request would have got without streaming."""

    def __init__(self) -> None:
        self.base: dict[str, Any] | None = None
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.chunks = 0

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        if self.base is None:
            self.base = chunk
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for c in chunk.get("choices") or []:
            idx = c.get("index", 0)
            slot = self.choices.setdefault(
                idx, {"index": idx, "content": [], "role": None, "finish_reason": None, "tc": {}}
            )
            if "text" in c:  # text completion
                slot["content"].append(c.get("text") or "")
            delta = c.get("delta") or {}
            if delta.get("role"):
                slot["role"] = delta["role"]
            if delta.get("content"):
                slot["content"].append(delta["content"])
            for tc in delta.get("tool_calls") or []:
                cur = slot["tc"].setdefault(
                    tc.get("index", 0),
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if tc.get("id"):
                    cur["id"] = tc["id"]
                fn = tc.get("function") or {}
                cur["function"]["name"] += fn.get("name") or ""
                cur["function"]["arguments"] += fn.get("arguments") or ""
            if c.get("finish_reason"):
                slot["finish_reason"] = c["finish_reason"]
            if c.get("stop_reason") is not None:
                # vLLM's extra: which stop string ended the answer (the
                # Messages API reports it as stop_sequence, also on a cache hit).
                slot["stop_reason"] = c["stop_reason"]

    @property
    def text_generated(self) -> str:
        return "".join("".join(s["content"]) for s in self.choices.values())

    def response(self) -> dict[str, Any]:
        base = self.base or {}
        is_chat = base.get("object", "").startswith("chat")
        choices = []
        for idx in sorted(self.choices):
            s = self.choices[idx]
            text = "".join(s["content"])
            if is_chat:
                message: dict[str, Any] = {"role": s["role"] or "assistant", "content": text}
                if s["tc"]:
                    message["tool_calls"] = [s["tc"][k] for k in sorted(s["tc"])]
                    message["content"] = text or None
                choice = {
                    "index": idx,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": s["finish_reason"],
                }
                if s.get("stop_reason") is not None:
                    choice["stop_reason"] = s["stop_reason"]
                choices.append(choice)
            else:
                choices.append(
                    {
                        "index": idx,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": s["finish_reason"],
                    }
                )
        return {
            "id": base.get("id"),
            "object": "chat.completion" if is_chat else "text_completion",
            "created": base.get("created"),
            "model": base.get("model"),
            "choices": choices,
            "usage": self.usage,
            "system_fingerprint": base.get("system_fingerprint"),
        }


def _pieces(text: str, size: int = 16) -> Iterator[str]:
    # Replays in small pieces so clients that render incrementally still do.
    for i in range(0, len(text), size):
        yield text[i : i + size]


def replay(response: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """SSE events equivalent to `response` (a full chat or text completion)."""
    is_chat = response.get("object", "").startswith("chat")
    head = {
        "id": response.get("id"),
        "object": "chat.completion.chunk" if is_chat else "text_completion",
        "created": response.get("created"),
        "model": response.get("model"),
        "system_fingerprint": response.get("system_fingerprint"),
    }
    for choice in response.get("choices") or []:
        idx = choice.get("index", 0)
        if is_chat:
            msg = choice.get("message") or {}
            yield event(
                {
                    **head,
                    "choices": [
                        {
                            "index": idx,
                            "delta": {"role": msg.get("role", "assistant"), "content": ""},
                            "finish_reason": None,
                        }
                    ],
                }
            )
            for piece in _pieces(msg.get("content") or ""):
                yield event(
                    {
                        **head,
                        "choices": [
                            {"index": idx, "delta": {"content": piece}, "finish_reason": None}
                        ],
                    }
                )
            if msg.get("tool_calls"):
                calls = [{**tc, "index": i} for i, tc in enumerate(msg["tool_calls"])]
                yield event(
                    {
                        **head,
                        "choices": [
                            {"index": idx, "delta": {"tool_calls": calls}, "finish_reason": None}
                        ],
                    }
                )
            final = {"index": idx, "delta": {}, "finish_reason": choice.get("finish_reason")}
            if choice.get("stop_reason") is not None:
                final["stop_reason"] = choice["stop_reason"]
        else:
            for piece in _pieces(choice.get("text") or ""):
                yield event(
                    {
                        **head,
                        "choices": [
                            {"index": idx, "text": piece, "logprobs": None, "finish_reason": None}
                        ],
                    }
                )
            final = {
                "index": idx,
                "text": "",
                "logprobs": None,
                "finish_reason": choice.get("finish_reason"),
            }
        yield event({**head, "choices": [final]})
    if include_usage and response.get("usage"):
        yield event({**head, "choices": [], "usage": response["usage"]})
    yield DONE
