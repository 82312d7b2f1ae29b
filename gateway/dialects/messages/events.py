"""Chat completion chunks in, Anthropic stream events out.

A small state (which content block is open, what the chunks said about the
end and the usage) and pure functions over it: `on_chunk` for every chunk,
`on_done` once the chat stream finished, `on_error` when it failed. They do no
I/O, so recorded chunks can be replayed through them in tests.

Blocks: chat text deltas form one `text` block; every chat tool call becomes a
`tool_use` block whose arguments stream as `input_json_delta`. A block is
opened on its first content and closed when another one opens or the message
ends, as Anthropic's stream does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.dialects.messages.errors import envelope
from gateway.dialects.messages.translate import fallback_tool_id, stop_reason, usage_block

PING = b'event: ping\ndata: {"type":"ping"}\n\n'


def sse(name: str, data: dict[str, Any]) -> bytes:
    """One named server-sent event, the framing Anthropic's SDKs parse."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@dataclass
class StreamState:
    msg_id: str
    model: str  # the name the client asked for
    stop_sequences: list[str] | None = None
    started: bool = False
    block: int = -1  # index of the last block opened
    open: bool = False  # whether that block still awaits its content_block_stop
    text_block: int | None = None  # index of the open text block, if any
    tool_blocks: dict[int, int] = field(default_factory=dict)  # chat tool index -> block
    finish: str | None = None
    matched: Any = None  # vLLM's choice `stop_reason`: the stop string it matched
    input_tokens: int = 0
    output_tokens: int = 0
    ended: bool = False  # message_stop or an error went out


def message_start(state: StreamState) -> list[bytes]:
    """message_start and the first ping; called once, before any block."""
    state.started = True
    message = {
        "id": state.msg_id,
        "type": "message",
        "role": "assistant",
        "model": state.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage_block(state.input_tokens, 0),
    }
    return [sse("message_start", {"type": "message_start", "message": message}), PING]


def on_chunk(state: StreamState, chunk: dict[str, Any]) -> list[bytes]:
    """Events for one chat.completion.chunk."""
    usage = chunk.get("usage")
    if usage:
        state.input_tokens = int(usage.get("prompt_tokens") or state.input_tokens)
        state.output_tokens = int(usage.get("completion_tokens") or 0)
    out = [] if state.started else message_start(state)
    for choice in chunk.get("choices") or []:
        if choice.get("index", 0) != 0:
            continue  # Messages has one answer; the gateway never asks for more
        delta = choice.get("delta") or {}
        if delta.get("content"):
            out += _text(state, delta["content"])
        for call in delta.get("tool_calls") or []:
            out += _tool_call(state, call)
        if choice.get("finish_reason"):
            state.finish = choice["finish_reason"]
            state.matched = choice.get("stop_reason")
    return out


def on_done(state: StreamState) -> list[bytes]:
    """The end of a successful stream: close the open block, say why it stopped."""
    out = [] if state.started else message_start(state)
    out += _close(state)
    reason, sequence = stop_reason(
        state.finish, state.matched, state.stop_sequences, bool(state.tool_blocks)
    )
    # Usage counts are totals; input_tokens here too, for streams whose first
    # chunk carried none (a cached answer replayed, a start sent while waiting).
    usage = usage_block(state.input_tokens, state.output_tokens)
    delta = {"stop_reason": reason, "stop_sequence": sequence}
    out.append(sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
    out.append(sse("message_stop", {"type": "message_stop"}))
    state.ended = True
    return out


def on_error(state: StreamState, status: int, message: str) -> list[bytes]:
    """A failure once the stream began: Anthropic's `error` event, and nothing after it."""
    if state.ended:
        return []
    state.ended = True
    return [sse("error", envelope(status, message))]


def _text(state: StreamState, text: str) -> list[bytes]:
    out: list[bytes] = []
    if state.text_block is None:
        out += _open(state, {"type": "text", "text": ""})
        state.text_block = state.block
    delta = {"type": "text_delta", "text": text}
    out.append(_delta(state.block, delta))
    return out


def _tool_call(state: StreamState, call: dict[str, Any]) -> list[bytes]:
    out: list[bytes] = []
    function = call.get("function") or {}
    position = int(call.get("index", 0))
    block = state.tool_blocks.get(position)
    if block is None:
        opened = state.block + 1
        tool_id = call.get("id") or fallback_tool_id(state.msg_id, opened)
        start = {"type": "tool_use", "id": tool_id, "name": function.get("name") or "", "input": {}}
        out += _open(state, start)
        block = state.tool_blocks[position] = state.block
    arguments = function.get("arguments")
    if arguments:
        out.append(_delta(block, {"type": "input_json_delta", "partial_json": arguments}))
    return out


def _open(state: StreamState, content_block: dict[str, Any]) -> list[bytes]:
    out = _close(state)
    state.block += 1
    state.open = True
    event = {"type": "content_block_start", "index": state.block, "content_block": content_block}
    out.append(sse("content_block_start", event))
    return out


def _close(state: StreamState) -> list[bytes]:
    if not state.open:
        return []
    state.open = False
    state.text_block = None
    return [sse("content_block_stop", {"type": "content_block_stop", "index": state.block})]


def _delta(index: int, delta: dict[str, Any]) -> bytes:
    return sse(
        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    )
