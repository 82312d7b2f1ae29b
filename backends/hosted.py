"""Hosted providers through litellm: when to use them, and calling them.

A model's ``hosted`` provider serves three roles, decided by ``choose_target``:
the only backend of a model without replicas; *overflow* (``overflow=True``)
when every replica is down or the least loaded one has a long vLLM queue; and
*fallback* once replicas are down past the hold or retries ran out.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

import orjson

from backends.config import ModelConfig
from backends.errors import BackendError, UpstreamError, UpstreamTimeout
from backends.upstream import UpstreamResponse, UpstreamStream

HOSTED_PREFIX = "hosted:"


class Target(StrEnum):
    REPLICA = "replica"
    HOSTED = "hosted"
    HOLD = "hold"
    FAIL = "fail"


def choose_target(
    config: ModelConfig,
    *,
    has_replicas: bool,
    any_ready: bool,
    best_waiting: float | None,
    overflow_waiting: float,
    held: bool = False,
) -> Target:
    """Where a request for ``config`` goes, given the state of its replicas.

    ``best_waiting`` is the vLLM queue length of the replica routing picked
    (None when its metrics are stale: an unknown queue is not a full one).
    ``held`` says the request already waited ``hold_seconds``.
    """
    hosted = config.hosted is not None
    if not has_replicas and hosted:
        return Target.HOSTED
    if any_ready:
        threshold = (
            config.overflow_waiting if config.overflow_waiting is not None else overflow_waiting
        )
        if hosted and config.overflow and best_waiting is not None and best_waiting > threshold:
            return Target.HOSTED
        return Target.REPLICA
    if hosted and config.overflow:
        return Target.HOSTED
    if config.hold_seconds > 0 and not held:
        return Target.HOLD
    if hosted:
        return Target.HOSTED
    return Target.FAIL


def _load_litellm() -> Any:
    # Deferred: importing litellm takes seconds and, unless told otherwise,
    # fetches a price map from the internet; most deployments never go hosted.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    return litellm


def _to_dict(result: Any) -> dict[str, Any]:
    if isinstance(result, dict):
        return result
    dump = getattr(result, "model_dump", None)
    if dump is not None:
        return dump(exclude_none=False)
    return dict(result)


def _map_exception(exc: Exception, replica: str) -> BackendError:
    if isinstance(exc, BackendError):
        return exc
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    if status == 408 or "Timeout" in name:
        return UpstreamTimeout(f"Hosted provider timed out: {exc}")
    if not isinstance(status, int) or status < 400:
        status = 502
    message = str(getattr(exc, "message", None) or exc)
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "api_error",
            "param": None,
            "code": getattr(exc, "code", None),
        }
    }
    return UpstreamError(message, status=status, body=body, replica=replica)


class HostedProvider:
    """Calls litellm for OpenAI-shaped requests; the functions are injectable for tests."""

    def __init__(
        self,
        *,
        completion: Callable[..., Awaitable[Any]] | None = None,
        text_completion: Callable[..., Awaitable[Any]] | None = None,
        embedding: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        self._functions: dict[str, Callable[..., Awaitable[Any]] | None] = {
            "/chat/completions": completion,
            "/completions": text_completion,
            "/embeddings": embedding,
        }

    def _function(self, path: str, replica: str) -> Callable[..., Awaitable[Any]]:
        if path not in self._functions:
            raise UpstreamError(
                f"Path {path} is not supported by hosted providers.", status=400, replica=replica
            )
        function = self._functions[path]
        if function is None:
            litellm = _load_litellm()
            function = {
                "/chat/completions": litellm.acompletion,
                "/completions": litellm.atext_completion,
                "/embeddings": litellm.aembedding,
            }[path]
            self._functions[path] = function
        return function

    @staticmethod
    def _arguments(config: ModelConfig, body: dict[str, Any], timeout: float | None) -> dict:
        arguments = {key: value for key, value in body.items() if key != "model"}
        arguments["model"] = config.hosted
        # Clients may send vLLM-only sampling fields; let litellm drop what the
        # provider does not take instead of failing the request.
        arguments["drop_params"] = True
        if config.hosted_api_key:
            arguments["api_key"] = config.hosted_api_key
        if config.hosted_api_base:
            arguments["api_base"] = config.hosted_api_base
        if timeout is not None:
            arguments["timeout"] = timeout
        return arguments

    async def request(
        self, config: ModelConfig, path: str, body: dict[str, Any], timeout: float | None = None
    ) -> UpstreamResponse:
        replica = HOSTED_PREFIX + str(config.hosted)
        function = self._function(path, replica)
        arguments = self._arguments(config, body, timeout)
        arguments.pop("stream", None)
        arguments.pop("stream_options", None)
        try:
            result = await function(**arguments)
        except Exception as exc:
            raise _map_exception(exc, replica) from exc
        return UpstreamResponse(status=200, body=_to_dict(result), replica=replica, headers={})

    async def stream(
        self, config: ModelConfig, path: str, body: dict[str, Any], timeout: float | None = None
    ) -> UpstreamStream:
        replica = HOSTED_PREFIX + str(config.hosted)
        if path == "/embeddings":
            raise UpstreamError("Embeddings cannot be streamed.", status=400, replica=replica)
        function = self._function(path, replica)
        arguments = self._arguments(config, body, timeout)
        arguments["stream"] = True
        try:
            chunks = await function(**arguments)
        except Exception as exc:
            raise _map_exception(exc, replica) from exc
        iterator = chunks.__aiter__()
        done = False

        async def next_event() -> bytes | None:
            nonlocal done
            if done:
                return None
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                done = True
                return b"data: [DONE]\n\n"
            except Exception as exc:
                raise _map_exception(exc, replica) from exc
            return b"data: " + orjson.dumps(_to_dict(chunk)) + b"\n\n"

        async def close(ok: bool) -> None:
            closer = getattr(chunks, "aclose", None)
            if closer is not None:
                try:
                    await closer()
                except Exception:  # closing is best effort; the answer is over
                    pass

        # Read the first chunk now, like replica streams, so a provider failing
        # up front is an error the caller can still turn into a status code.
        try:
            first = await next_event()
        except BaseException:
            await close(False)
            raise
        return UpstreamStream(replica, next_event, close, first=first)
