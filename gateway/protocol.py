"""Pydantic models of the OpenAI requests Bearpaw accepts.

They validate what the gateway must understand and let everything else pass
through untouched (extra="allow"), so new OpenAI or vLLM parameters reach the
backend without a gateway release.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool | None = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _Sampling(_Open):
    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None


class EmbeddingRequest(_Open):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @model_validator(mode="after")
    def _non_empty(self) -> EmbeddingRequest:
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input must not be empty")
        return self


# vLLM's endpoints beyond the OpenAI API, passed through (routes/passthrough.py).
# The gateway checks what it needs (a model to route and meter by) and leaves
# the rest, which vLLM validates itself, to the backend.


class _OneBody(_Open):
    """A request answered with one JSON body: nothing to stream."""

    model: str = Field(min_length=1)
    stream: bool | None = None
    # What TPM admission reads of any body (limits.estimate_tokens), typed so
    # that no endpoint's body can break it.
    prompt: str | list[Any] | None = None
    input: str | list[Any] | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None

    @field_validator("stream")
    @classmethod
    def _not_streamed(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("this endpoint is not streamed through the gateway; omit `stream`")
        return value


class TokenizeRequest(_OneBody):
    # One of the two (vLLM's completion and chat shapes); the route checks it.
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # type: ignore[assignment]


class DetokenizeRequest(_OneBody):
    tokens: list[int]


class RerankRequest(_OneBody):
    query: str | dict[str, Any]  # text, or vLLM's multimodal content
    documents: list[Any] | dict[str, Any]
    top_n: int | None = Field(default=None, ge=0)


class ScoreRequest(_OneBody):
    """vLLM's /score pairs (text_1/text_2, queries/documents, ...): vLLM checks them."""


class AudioRequest(_OneBody):
    """The text fields of a transcription or translation upload; `file` holds the
    uploaded file's name (its bytes stay in the raw form, see `Upload`)."""

    file: str


class Upload(dict[str, Any]):
    """A multipart upload as a pipeline body.

    As a dict it is the form's text fields plus each file's name: what
    validation, admission and metering read. The form itself is `content`
    (with its `content_type`, boundary included), forwarded byte for byte, so
    the backend sees exactly what the client sent.
    """

    def __init__(self, fields: dict[str, Any], content: bytes, content_type: str) -> None:
        super().__init__(fields)
        self.content = content
        self.content_type = content_type


class Endpoint(NamedTuple):
    """Where an endpoint's requests go upstream and what validates them.

    `path` is relative to a replica's OpenAI base URL (`.../v1`), or to its
    server root when `at_root`: vLLM serves /tokenize, /detokenize, /rerank and
    /score beside /v1, not under it. An endpoint's name is also the capability
    (backends.capabilities) a model must have to serve it.
    """

    path: str
    request: type[_Open]
    at_root: bool = False


# Endpoint name -> Endpoint (path on the backend, request model, ...). The same
# table drives routes, async jobs and batch lines so the three accept exactly
# the same input.
ENDPOINTS: dict[str, Endpoint] = {
    "chat.completions": Endpoint("/chat/completions", ChatCompletionRequest),
    "completions": Endpoint("/completions", CompletionRequest),
    "embeddings": Endpoint("/embeddings", EmbeddingRequest),
    "rerank": Endpoint("/rerank", RerankRequest, at_root=True),
    "score": Endpoint("/score", ScoreRequest, at_root=True),
    "tokenize": Endpoint("/tokenize", TokenizeRequest, at_root=True),
    "detokenize": Endpoint("/detokenize", DetokenizeRequest, at_root=True),
    "audio.transcriptions": Endpoint("/audio/transcriptions", AudioRequest),
    "audio.translations": Endpoint("/audio/translations", AudioRequest),
}

# OpenAI Batch API `url` values -> endpoint names.
BATCH_URLS = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
