"""Responses API <-> chat completions: request, items and response shapes.

Pure functions only: the service (service.py) does the I/O. A Responses
request becomes one chat completion over the whole conversation (earlier
turns come from the gateway's store), and the chat answer becomes the
Response object with its output items.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.errors import APIError

# Request keys copied as they are into the Response object (null when not given).
ECHOED = ("instructions", "max_output_tokens", "metadata", "previous_response_id")


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


# ------------------------------------------------------------------ input items
def input_items(value: str | list[dict[str, Any]], item_id: Any) -> list[dict[str, Any]]:
    """The request's `input` as a list of items, each with an id (as the
    input_items endpoint lists them). `item_id(i)` makes the i-th id."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    items = []
    for i, raw in enumerate(value):
        if not isinstance(raw, dict):
            raise _bad("Each input item must be an object.", f"input[{i}]")
        item = dict(raw)
        kind = item.setdefault("type", "message")
        if kind == "message":
            item = _input_message(item, i)
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise _bad(f"A function_call item needs `{key}`.", f"input[{i}].{key}")
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad("A function_call_output item needs `call_id`.", f"input[{i}].call_id")
            if not isinstance(item.get("output"), str | list):
                raise _bad("A function_call_output item needs `output`.", f"input[{i}].output")
        elif kind == "reasoning":
            pass  # kept in the conversation record; the chat model does not see it
        else:
            raise _bad(
                f"Input items of type '{kind}' are not supported by this gateway.",
                f"input[{i}].type",
            )
        item.setdefault("id", item_id(i))
        items.append(item)
    return items


def _input_message(item: dict[str, Any], i: int) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise _bad(
            "A message's role must be one of 'user', 'assistant', 'system' or 'developer'.",
            f"input[{i}].role",
        )
    content = item.get("content")
    part_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        parts: list[dict[str, Any]] = [{"type": part_type, "text": content}]
        if role == "assistant":
            parts[0]["annotations"] = []
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "output_text", "text", "refusal"):
                parts.append(part)
            elif kind == "input_image":
                if not part.get("image_url"):
                    raise _bad(
                        "Only images given by `image_url` (a URL or a data URL) are supported.",
                        f"input[{i}].content[{j}]",
                    )
                parts.append(part)
            else:
                raise _bad(
                    f"Content parts of type '{kind}' are not supported by this gateway.",
                    f"input[{i}].content[{j}].type",
                )
    else:
        raise _bad("A message needs `content`: a string or a list of parts.", f"input[{i}]")
    return {**item, "content": parts, "status": item.get("status", "completed")}


def _text_of(parts: Any) -> str:
    if isinstance(parts, str):
        return parts
    texts = []
    for part in parts or []:
        if isinstance(part, dict) and part.get("type") in (
            "input_text",
            "output_text",
            "text",
        ):
            texts.append(str(part.get("text", "")))
        elif isinstance(part, dict) and part.get("type") == "refusal":
            texts.append(str(part.get("refusal", "")))
    return "".join(texts)


def _chat_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if all(p.get("type") != "input_image" for p in parts):
        return _text_of(parts)
    out: list[dict[str, Any]] = []
    for part in parts:
        if part.get("type") == "input_image":
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail"):
                image["detail"] = part["detail"]
            out.append({"type": "image_url", "image_url": image})
        else:
            out.append({"type": "text", "text": _text_of([part])})
    return out


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat conversation for `items` (earlier turns, then this turn's input)."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            if role == "assistant":
                messages.append({"role": "assistant", "content": _text_of(item["content"])})
            else:
                messages.append({"role": role, "content": _chat_content(item["content"])})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            # Calls made in one turn belong to one assistant message, as the
            # chat template expects before their tool results.
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if not last.get("content"):
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item["call_id"],
                    "content": _text_of(item["output"]),
                }
            )
    return messages


# ------------------------------------------------------------------ request
def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for tool in tools:
        function = {"name": tool["name"], "parameters": tool.get("parameters") or {}}
        if tool.get("description"):
            function["description"] = tool["description"]
        if tool.get("strict") is not None:
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, dict):
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format") or {}
    kind = fmt.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema: dict[str, Any] = {
            "name": fmt.get("name") or "response",
            "schema": fmt.get("schema"),
        }
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        if fmt.get("description"):
            schema["description"] = fmt["description"]
        return {"type": "json_schema", "json_schema": schema}
    return None


def chat_body(body: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completion request that answers Responses request `body`."""
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    optional = {
        "max_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "tools": chat_tools(body.get("tools")),
        "tool_choice": chat_tool_choice(body.get("tool_choice")),
        "parallel_tool_calls": body.get("parallel_tool_calls"),
        "response_format": response_format(body.get("text")),
        "user": body.get("user"),
    }
    if body.get("top_logprobs"):
        optional["logprobs"] = True
        optional["top_logprobs"] = body["top_logprobs"]
    chat.update({k: v for k, v in optional.items() if v is not None})
    if not chat.get("tools"):
        chat.pop("tool_choice", None)
        chat.pop("parallel_tool_calls", None)
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


# ------------------------------------------------------------------ response
def usage_of(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not chat_usage:
        return None
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    completion = int(chat_usage.get("completion_tokens") or 0)
    cached = int((chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def output_items(
    message: dict[str, Any], ids: ItemIds, status: str = "completed"
) -> list[dict[str, Any]]:
    """Output items of one chat answer: its text, then one item per tool call.
    `status` is the items' own: "incomplete" when max_output_tokens cut them, as
    the stream's items say (events._item_status)."""
    items = []
    text = message.get("content")
    calls = message.get("tool_calls") or []
    if text or not calls:
        items.append(message_item(ids.message(), text or "", status))
    for i, call in enumerate(calls):
        fn = call.get("function") or {}
        items.append(
            function_call_item(
                ids.function_call(i),
                call.get("id") or ids.call_id(i),
                str(fn.get("name") or ""),
                str(fn.get("arguments") or ""),
                status,
            )
        )
    return items


class ItemIds:
    """Ids derived from the request id, so the usage record, the stored
    response and its items link up (and a replayed job gets the same ids)."""

    def __init__(self, request_id: str) -> None:
        self.stem = request_id.removeprefix("req_")

    @property
    def response(self) -> str:
        return response_id_for(self.stem)

    def message(self) -> str:
        return f"msg_{self.stem}"

    def function_call(self, index: int) -> str:
        return f"fc_{self.stem}_{index}"

    def call_id(self, index: int) -> str:
        return f"call_{self.stem}_{index}"

    def input_item(self, index: int) -> str:
        return f"in_{self.stem}_{index}"


def response_id_for(request_id: str) -> str:
    return "resp_" + request_id.removeprefix("req_")


def finished_status(finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def response_object(
    response_id: str,
    body: dict[str, Any],
    *,
    status: str,
    created_at: float | None = None,
    output: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    incomplete: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Response object as the spec shapes it, echoing the request's settings."""
    now = time.time()
    fmt = ((body.get("text") or {}).get("format")) or {"type": "text"}
    final = status in ("completed", "incomplete", "failed", "cancelled")
    response: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": int(created_at or now),
        "status": status,
        "completed_at": int(now) if final and status != "failed" else None,
        "background": bool(body.get("background")),
        "error": error,
        "incomplete_details": incomplete,
        "model": body.get("model"),
        "output": output or [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.get("store", True) is not False,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": fmt},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": [_echo_tool(tool) for tool in body.get("tools") or []],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation") or "disabled",
    }
    for key in ECHOED:
        response[key] = body.get(key)
    # The spec types `usage` as an object and `user` as a string, neither nullable:
    # they are left out until there is a value.
    if usage is not None:
        response["usage"] = usage
    if body.get("user") is not None:
        response["user"] = body["user"]
    response["metadata"] = body.get("metadata") or {}
    return response


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    # The Response lists each function tool with every field the spec
    # requires, whether or not the request spelled it out.
    return {
        **tool,
        "type": "function",
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict"),
    }


def from_chat(
    response_id: str, body: dict[str, Any], chat: dict[str, Any], ids: ItemIds, created_at: float
) -> dict[str, Any]:
    """The Response for a whole chat completion answer."""
    choice = (chat.get("choices") or [{}])[0]
    status, incomplete = finished_status(choice.get("finish_reason"))
    return response_object(
        response_id,
        body,
        status=status,
        created_at=created_at,
        output=output_items(choice.get("message") or {}, ids, status),
        usage=usage_of(chat.get("usage")),
        incomplete=incomplete,
    )


def failed(
    response_id: str, body: dict[str, Any], message: str, created_at: float, code: str
) -> dict[str, Any]:
    # The spec's ResponseErrorCode is a closed list: anything not a rate limit
    # is reported as a server error, with the gateway's message.
    code = code if code == "rate_limit_exceeded" else "server_error"
    return response_object(
        response_id,
        body,
        status="failed",
        created_at=created_at,
        error={"code": code, "message": message},
    )
