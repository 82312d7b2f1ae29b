"""Pydantic models of the Anthropic Messages requests Bearpaw accepts.

Top-level fields the gateway does not act on (service_tier, speed, cache_control,
...) are accepted and ignored, like vLLM's own Anthropic endpoint does, so that
clients sending newer fields keep working. Content blocks and tools are checked
one by one: a block or tool this gateway cannot serve gets a 400 that names it.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import APIError

M = TypeVar("M", bound=BaseModel)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class InputMessage(_Open):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class PromptRequest(_Open):
    """What messages.create and messages.count_tokens share."""

    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


class CountTokensRequest(PromptRequest):
    pass


class MessagesRequest(PromptRequest):
    max_tokens: int = Field(ge=1)
    stream: bool = False
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None


# ---------------------------------------------------------------- content blocks


class TextBlock(_Open):
    type: Literal["text"]
    text: str


class ImageBlock(_Open):
    type: Literal["image"]
    source: dict[str, Any]


class ToolUseBlock(_Open):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(_Open):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None
    is_error: bool = False


class ThinkingBlock(_Open):
    """A thinking block handed back from an earlier turn (dropped, see translate)."""

    type: Literal["thinking", "redacted_thinking"]


Block = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock

_BLOCKS: dict[str, type[BaseModel]] = {
    "text": TextBlock,
    "image": ImageBlock,
    "tool_use": ToolUseBlock,
    "tool_result": ToolResultBlock,
    "thinking": ThinkingBlock,
    "redacted_thinking": ThinkingBlock,
}

# Why each known block type cannot be served: said in the 400 the client gets.
_REFUSED_BLOCKS = {
    "document": "document blocks (PDF and plain-text documents) are not supported",
    "search_result": "search_result blocks are not supported",
    "server_tool_use": "server tools are not available on this gateway",
    "web_search_tool_result": "server tools are not available on this gateway",
    "web_fetch_tool_result": "server tools are not available on this gateway",
    "code_execution_tool_result": "server tools are not available on this gateway",
    "container_upload": "container uploads are not supported",
}


class CustomTool(_Open):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None


def parse_block(raw: Any, where: str) -> Block:
    """One content block, validated; a 400 naming `where` when it is wrong or refused."""
    if not isinstance(raw, dict):
        raise invalid(f"{where}: Input should be an object")
    kind = raw.get("type")
    model = _BLOCKS.get(kind) if isinstance(kind, str) else None
    if model is None:
        reason = _REFUSED_BLOCKS.get(str(kind), f"unknown content block type `{kind}`")
        raise invalid(f"{where}: {reason} by this gateway.")
    return parse(model, raw, where)  # type: ignore[return-value]


def parse_tool(raw: Any, where: str) -> CustomTool:
    """A custom tool; server tools (web search, code execution, ...) are refused by name."""
    if not isinstance(raw, dict):
        raise invalid(f"{where}: Input should be an object")
    kind = raw.get("type")
    if kind not in (None, "custom"):
        raise invalid(
            f"{where}: the server tool `{kind}` ({raw.get('name', 'unnamed')}) is not supported "
            "by this gateway; only custom tools (name, description, input_schema) are."
        )
    return parse(CustomTool, raw, where)


# ------------------------------------------------------------------- validation


def parse(model: type[M], body: Any, where: str = "") -> M:
    """`body` as `model`, or a 400 worded the way Anthropic words it
    (`max_tokens: Field required`)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = [where] if where else []
        path += [str(p) for p in err.get("loc", ()) if not _is_type_tag(p)]
        message = str(err.get("msg", "invalid value"))
        raise invalid(f"{'.'.join(path)}: {message}" if path else message) from None


def _is_type_tag(part: Any) -> bool:
    # Pydantic names the union member it tried (`str`, `list[dict[str,any]]`)
    # in the location; the client never wrote those.
    return isinstance(part, str) and (
        "[" in part or part in ("str", "int", "float", "bool", "list", "dict")
    )


def invalid(message: str) -> APIError:
    return APIError(400, message, type="invalid_request_error")
