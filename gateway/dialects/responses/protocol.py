"""Pydantic models of the Responses API requests Bearpaw accepts.

Like gateway/protocol.py, they check what the translator must understand and
let the rest through (extra="allow"); what a self-hosted deployment cannot do
is refused by name in `refusal()`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Built-in tools that run on OpenAI's servers; a gateway in front of vLLM has
# none of them, so a request naming one gets a 400 instead of a silent no-op.
HOSTED_TOOLS = {
    "web_search": "web search",
    "web_search_preview": "web search",
    "web_search_preview_2025_03_11": "web search",
    "web_search_2025_08_26": "web search",
    "file_search": "file search",
    "computer_use_preview": "computer use",
    "computer_use": "computer use",
    "code_interpreter": "code interpreter",
    "image_generation": "image generation",
    "mcp": "remote MCP",
    "local_shell": "local shell",
    "shell": "shell",
    "apply_patch": "apply patch",
    "custom": "custom (free-form) tools",
}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextParam(_Open):
    format: TextFormat | None = None


class ResponsesRequest(_Open):
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    text: TextParam | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = True
    background: bool | None = False
    stream: bool | None = False
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # OpenAI's limits: 16 pairs, keys up to 64 and values up to 512 characters.
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError("metadata may have at most 16 key-value pairs")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 and values 512 characters")
        return value

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, value: str | list[dict[str, Any]] | None) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        return value


class Refusal(Exception):
    """A well-formed request for something this deployment does not do."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def refusal(body: dict[str, Any]) -> Refusal | None:
    """Why this (already validated) request cannot be served here, if it cannot."""
    for i, tool in enumerate(body.get("tools") or []):
        kind = tool.get("type")
        if kind == "function":
            if not tool.get("name"):
                return Refusal("A function tool needs a `name`.", f"tools[{i}].name")
            continue
        name = HOSTED_TOOLS.get(str(kind), str(kind))
        return Refusal(
            f"The tool type '{kind}' ({name}) is a built-in tool hosted by OpenAI and is not "
            "available on this self-hosted gateway. Describe it as a `function` tool and "
            "run it in your application instead.",
            f"tools[{i}].type",
        )
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") not in ("function", None):
        return Refusal(
            f"tool_choice of type '{choice.get('type')}' is not supported here; "
            "use 'auto', 'none', 'required' or a function.",
            "tool_choice",
        )
    for key, what in (
        ("conversation", "Conversations objects"),
        ("prompt", "stored prompt templates"),
    ):
        if body.get(key) is not None:
            return Refusal(
                f"`{key}` ({what}) is not supported by this gateway; use "
                "`previous_response_id` or send the input items.",
                key,
            )
    if body.get("input") is None:
        return Refusal("Missing required parameter: 'input'.", "input")
    if body.get("background") and body.get("stream"):
        return Refusal(
            "`background: true` cannot be combined with `stream: true` here; create the "
            "response in the background and poll `GET /v1/responses/{id}`.",
            "stream",
        )
    if body.get("background") and body.get("store") is False:
        return Refusal("Background responses must be stored (`store: true`).", "store")
    return None
