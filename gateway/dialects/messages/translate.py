"""Messages request → chat completion request, and chat completion → Message.

Both directions are plain functions over dicts: the pipeline only ever sees a
chat completion request, and count_tokens renders the very same chat messages,
so the tokens it counts are the tokens messages.create is billed for.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.dialects.messages.protocol import (
    Block,
    CustomTool,
    ImageBlock,
    MessagesRequest,
    PromptRequest,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    invalid,
    parse_block,
    parse_tool,
)

_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")

# Top-level features that need machinery a self-hosted model does not have.
_REFUSED_FIELDS = {
    "container": "code execution containers are not supported by this gateway.",
    "mcp_servers": "MCP connectors are not supported by this gateway.",
    "context_management": "context management is not supported by this gateway.",
}


# ------------------------------------------------------------------ requests


def prompt_fields(req: PromptRequest) -> dict[str, Any]:
    """The parts of a chat request that make up the prompt: messages, tools and,
    for a final assistant turn (prefill), the flags that continue it."""
    _refuse_unsupported(req)
    messages = _system(req.system)
    for i, message in enumerate(req.messages):
        where = f"messages.{i}.content"
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        blocks = [parse_block(raw, f"{where}.{j}") for j, raw in enumerate(message.content)]
        if message.role == "user":
            messages.extend(_user_turn(blocks, where))
        else:
            messages.append(_assistant_turn(blocks, where))
    fields: dict[str, Any] = {"messages": messages}
    tools = [parse_tool(raw, f"tools.{i}") for i, raw in enumerate(req.tools or [])]
    if tools:
        fields["tools"] = [_chat_tool(tool) for tool in tools]
    if req.messages[-1].role == "assistant":
        # Anthropic continues a final assistant turn rather than starting a new one.
        fields["add_generation_prompt"] = False
        fields["continue_final_message"] = True
    return fields


def to_chat(req: MessagesRequest) -> dict[str, Any]:
    """The chat completion request the pipeline runs for `req`."""
    body: dict[str, Any] = {"model": req.model, **prompt_fields(req), "max_tokens": req.max_tokens}
    body.update(_tool_choice(req, {t["function"]["name"] for t in body.get("tools", [])}))
    if req.stop_sequences:
        body["stop"] = list(req.stop_sequences)
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    user = (req.metadata or {}).get("user_id")
    if user is not None:
        body["user"] = str(user)
    response_format = _response_format(req.output_config)
    if response_format is not None:
        body["response_format"] = response_format
    if req.stream:
        body["stream"] = True
        # Usage on every chunk: message_start carries input_tokens from the first one.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return body


def _refuse_unsupported(req: PromptRequest) -> None:
    for name, reason in _REFUSED_FIELDS.items():
        if (req.model_extra or {}).get(name):
            raise invalid(f"{name}: {reason}")
    thinking = req.thinking or {}
    if thinking and thinking.get("type") != "disabled":
        raise invalid(
            f"thinking: extended thinking (`{thinking.get('type')}`) is not supported by this "
            'gateway; leave `thinking` out or send {"type": "disabled"}.'
        )


def _system(system: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, str):
        text = system
    else:
        blocks = [parse_block(raw, f"system.{i}") for i, raw in enumerate(system)]
        if not all(isinstance(b, TextBlock) for b in blocks):
            raise invalid("system: only text blocks are allowed in the system prompt.")
        text = "\n".join(b.text for b in blocks)  # type: ignore[union-attr]
    return [{"role": "system", "content": text}] if text else []


def _user_turn(blocks: list[Block], where: str) -> list[dict[str, Any]]:
    """Tool results become chat `tool` messages, placed before the rest of the
    turn: chat templates expect them right after the assistant's tool calls."""
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        if isinstance(block, ToolResultBlock):
            results.append(_tool_message(block, f"{where}.{j}"))
        elif isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append(_image_part(block, f"{where}.{j}"))
        elif not isinstance(block, ThinkingBlock):
            raise invalid(f"{where}.{j}: `{block.type}` blocks belong in assistant messages.")
    if parts or not results:
        results.append({"role": "user", "content": _compact(parts)})
    return results


def _assistant_turn(blocks: list[Block], where: str) -> dict[str, Any]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolUseBlock):
            arguments = orjson.dumps(block.input).decode()
            function = {"name": block.name, "arguments": arguments}
            calls.append({"id": block.id, "type": "function", "function": function})
        elif isinstance(block, ThinkingBlock):
            # Thinking from earlier turns is not part of the prompt on
            # Anthropic's side either; this gateway never produces any.
            continue
        else:
            raise invalid(f"{where}.{j}: `{block.type}` blocks are not allowed in assistant turns.")
    # Content stays a string even beside tool calls: chat templates concatenate it.
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_message(block: ToolResultBlock, where: str) -> dict[str, Any]:
    content = block.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        pieces = []
        for k, raw in enumerate(content):
            inner = parse_block(raw, f"{where}.content.{k}")
            if not isinstance(inner, TextBlock):
                raise invalid(
                    f"{where}.content.{k}: only text is supported inside tool_result "
                    f"by this gateway, not `{inner.type}`."
                )
            pieces.append(inner.text)
        text = "\n".join(pieces)
    if block.is_error:
        # Chat has no error flag on tool messages: the model reads it in the text.
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": text}


def _image_part(block: ImageBlock, where: str) -> dict[str, Any]:
    source = block.source
    kind = source.get("type")
    if kind == "base64":
        media = source.get("media_type")
        if media not in _IMAGE_TYPES:
            raise invalid(
                f"{where}.source.media_type: Input should be one of {', '.join(_IMAGE_TYPES)}"
            )
        data = source.get("data")
        if not isinstance(data, str) or not data:
            raise invalid(f"{where}.source.data: Field required")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url:
            raise invalid(f"{where}.source.url: Field required")
    else:
        raise invalid(
            f"{where}.source: image sources of type `{kind}` are not supported by this "
            "gateway; use `base64` or `url`."
        )
    return {"type": "image_url", "image_url": {"url": url}}


def _compact(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    # A lone text part as a plain string: the form every chat template renders.
    if not parts:
        return ""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _chat_tool(tool: CustomTool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _tool_choice(req: MessagesRequest, names: set[str]) -> dict[str, Any]:
    choice = req.tool_choice
    if choice is None:
        return {}
    kind = choice.get("type")
    fields: dict[str, Any] = {}
    if kind == "auto":
        fields["tool_choice"] = "auto"
    elif kind == "any":
        fields["tool_choice"] = "required"
    elif kind == "none":
        fields["tool_choice"] = "none"
    elif kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise invalid("tool_choice.name: Field required")
        if name not in names:
            raise invalid(f"tool_choice.name: no tool named `{name}` is defined in `tools`.")
        fields["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise invalid(
            f"tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none', not {kind!r}"
        )
    if kind in ("any", "tool") and not names:
        raise invalid(f"tool_choice: `{kind}` needs at least one tool in `tools`.")
    if not names:
        return {}  # auto or none without tools: nothing to choose from
    if choice.get("disable_parallel_tool_use"):
        fields["parallel_tool_calls"] = False
    return fields


def _response_format(config: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (config or {}).get("format")
    if not fmt:
        return None
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise invalid("output_config.format: only {type: json_schema, schema: {...}} is supported.")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


# ----------------------------------------------------------------- responses


def message_id(request_id: str) -> str:
    """One id links the message, its usage record and the logs."""
    return "msg_" + request_id.removeprefix("req_")


def stop_reason(
    finish: str | None, matched: Any, stop_sequences: list[str] | None, tool_calls: bool
) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for a chat choice's end.

    vLLM reports a forced tool call (named tool_choice) as finish "stop" with
    tool calls present, and the stop string it matched in the choice's
    `stop_reason`; a stop token id there is not one of the client's sequences."""
    if finish == "length":
        return "max_tokens", None
    if finish == "tool_calls" or tool_calls:
        return "tool_use", None
    if isinstance(matched, str) and matched in (stop_sequences or ()):
        return "stop_sequence", matched
    if finish == "content_filter":
        return "refusal", None
    return "end_turn", None


def usage_block(input_tokens: int, output_tokens: int) -> dict[str, int]:
    # vLLM's prefix cache is free and invisible to billing: nothing to report here.
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def fallback_tool_id(msg_id: str, index: int) -> str:
    # Every backend Bearpaw knows names its tool calls; this is for one that does not.
    return f"toolu_{msg_id.removeprefix('msg_')}_{index}"


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic's `input` must be; an
    unparsable (truncated) argument string becomes {}."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def to_message(
    chat: dict[str, Any], *, msg_id: str, model: str, stop_sequences: list[str] | None
) -> dict[str, Any]:
    """The Message for a chat completion answer."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    calls = message.get("tool_calls") or []
    for call in calls:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or fallback_tool_id(msg_id, len(content)),
                "name": function.get("name") or "",
                "input": tool_input(function.get("arguments")),
            }
        )
    reason, sequence = stop_reason(
        choice.get("finish_reason"), choice.get("stop_reason"), stop_sequences, bool(calls)
    )
    usage = chat.get("usage") or {}
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_block(
            int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        ),
    }
