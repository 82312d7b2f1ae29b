"""Responses API stream events, built from chat completion chunks.

Event builders are plain functions over one small `StreamState`; sequence
numbers are stamped in `_emit` and nowhere else. A chunk goes in, the events
it implies come out, so a live stream and a cache replay (which the pipeline
also hands over as chat chunks) produce the same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.dialects.responses.translate import (
    ItemIds,
    finished_status,
    function_call_item,
    message_item,
    response_object,
    usage_of,
)


@dataclass
class _Call:
    output_index: int
    item_id: str
    call_id: str
    name: str
    arguments: list[str] = field(default_factory=list)


@dataclass
class StreamState:
    response_id: str
    body: dict[str, Any]  # the Responses request
    ids: ItemIds
    created_at: float
    sequence: int = 0
    output: list[dict[str, Any] | None] = field(default_factory=list)
    text_index: int | None = None  # output index of the open message item
    text: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)  # chat tool index -> call
    open_calls: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    broken: bool = False  # the backend failed before the answer was finished


def _emit(state: StreamState, kind: str, **fields: Any) -> bytes:
    payload = {"type": kind, **fields, "sequence_number": state.sequence}
    state.sequence += 1
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _snapshot(state: StreamState, status: str, **extra: Any) -> dict[str, Any]:
    return response_object(
        state.response_id,
        state.body,
        status=status,
        created_at=state.created_at,
        output=[item for item in state.output if item is not None],
        **extra,
    )


def start(state: StreamState) -> list[bytes]:
    return [
        _emit(state, "response.created", response=_snapshot(state, "in_progress")),
        _emit(state, "response.in_progress", response=_snapshot(state, "in_progress")),
    ]


def on_chunk(state: StreamState, chunk: dict[str, Any]) -> list[bytes]:
    """Events for one chat.completion.chunk."""
    if chunk.get("usage"):
        state.usage = chunk["usage"]
    out: list[bytes] = []
    for choice in chunk.get("choices") or []:
        if choice.get("index", 0) != 0:
            continue  # Responses has one output; n > 1 is not part of the API
        delta = choice.get("delta") or {}
        if delta.get("content"):
            out += _text_delta(state, delta["content"])
        for call in delta.get("tool_calls") or []:
            out += _call_delta(state, call)
        if choice.get("finish_reason"):
            state.finish_reason = choice["finish_reason"]
    return out


def _text_delta(state: StreamState, piece: str) -> list[bytes]:
    out: list[bytes] = []
    if state.text_index is None:
        index = len(state.output)
        state.text_index = index
        item = message_item(state.ids.message(), "", status="in_progress")
        item["content"] = []
        state.output.append(None)  # filled in when the item is done
        out.append(_emit(state, "response.output_item.added", output_index=index, item=item))
        out.append(
            _emit(
                state,
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            )
        )
    state.text.append(piece)
    out.append(
        _emit(
            state,
            "response.output_text.delta",
            item_id=state.ids.message(),
            output_index=state.text_index,
            content_index=0,
            delta=piece,
            logprobs=[],
        )
    )
    return out


def _call_delta(state: StreamState, delta: dict[str, Any]) -> list[bytes]:
    out: list[bytes] = []
    tool_index = int(delta.get("index", 0))
    fn = delta.get("function") or {}
    call = state.calls.get(tool_index)
    if call is None:
        out += _close_text(state)
        index = len(state.output)
        call = _Call(
            output_index=index,
            item_id=state.ids.function_call(tool_index),
            call_id=delta.get("id") or state.ids.call_id(tool_index),
            name=str(fn.get("name") or ""),
        )
        state.calls[tool_index] = call
        state.open_calls.append(tool_index)
        state.output.append(None)
        item = function_call_item(call.item_id, call.call_id, call.name, "", "in_progress")
        out.append(_emit(state, "response.output_item.added", output_index=index, item=item))
    elif fn.get("name"):
        call.name += fn["name"]
    if fn.get("arguments"):
        call.arguments.append(fn["arguments"])
        out.append(
            _emit(
                state,
                "response.function_call_arguments.delta",
                item_id=call.item_id,
                output_index=call.output_index,
                delta=fn["arguments"],
            )
        )
    return out


def _item_status(state: StreamState) -> str:
    cut = state.broken or state.finish_reason == "length"
    return "incomplete" if cut else "completed"


def _close_text(state: StreamState) -> list[bytes]:
    if state.text_index is None:
        return []
    index, text = state.text_index, "".join(state.text)
    state.text_index = None
    item = message_item(state.ids.message(), text, status=_item_status(state))
    state.output[index] = item
    part = item["content"][0]
    common = {"item_id": item["id"], "output_index": index, "content_index": 0}
    return [
        _emit(state, "response.output_text.done", **common, text=text, logprobs=[]),
        _emit(state, "response.content_part.done", **common, part=part),
        _emit(state, "response.output_item.done", output_index=index, item=item),
    ]


def close_items(state: StreamState) -> list[bytes]:
    """Done events for every item still open, in output order."""
    out = _close_text(state)
    for tool_index in state.open_calls:
        call = state.calls[tool_index]
        arguments = "".join(call.arguments)
        item = function_call_item(
            call.item_id, call.call_id, call.name, arguments, _item_status(state)
        )
        state.output[call.output_index] = item
        out.append(
            _emit(
                state,
                "response.function_call_arguments.done",
                item_id=call.item_id,
                output_index=call.output_index,
                name=call.name,
                arguments=arguments,
            )
        )
        out.append(
            _emit(state, "response.output_item.done", output_index=call.output_index, item=item)
        )
    state.open_calls.clear()
    return out


def final_response(state: StreamState) -> dict[str, Any]:
    status, incomplete = finished_status(state.finish_reason)
    return _snapshot(state, status, usage=usage_of(state.usage), incomplete=incomplete)


def finished(state: StreamState, response: dict[str, Any]) -> bytes:
    kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    return _emit(state, kind, response=response)


def failed(state: StreamState, message: str, code: str = "server_error") -> list[bytes]:
    """An `error` event, then `response.failed` carrying the same error."""
    response = _snapshot(
        state,
        "failed",
        usage=usage_of(state.usage),
        error={"code": "server_error", "message": message},
    )
    return [
        _emit(state, "error", code=code, message=message, param=None),
        _emit(state, "response.failed", response=response),
    ]
