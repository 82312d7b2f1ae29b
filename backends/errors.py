"""Failures the backend layer reports to its caller.

Every error carries the HTTP status the gateway should answer with, so the
gateway maps them to OpenAI error objects without knowing why they happened.
"""

from __future__ import annotations

from typing import Any


class BackendError(Exception):
    """Base class: ``status`` is the HTTP status to return, ``message`` the text."""

    status: int = 502
    error_type: str = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error object for this failure."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": None,
                "code": self.code,
            }
        }


class ModelNotFound(BackendError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.")
        self.model = model


class NoReplicaAvailable(BackendError):
    status = 503
    error_type = "service_unavailable"
    code = "no_replica_available"

    def __init__(self, model: str, message: str | None = None) -> None:
        super().__init__(message or f"No backend replica is available for model `{model}`.")
        self.model = model


class UpstreamTimeout(BackendError):
    status = 504
    error_type = "timeout"
    code = "upstream_timeout"


class UpstreamError(BackendError):
    """The upstream answered with an error (or broke) and it was not retried away.

    ``body`` is the upstream's OpenAI error JSON when it sent one, so a 4xx such
    as vLLM's "prompt too long" reaches the client unchanged.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        body: dict[str, Any] | None = None,
        replica: str | None = None,
    ) -> None:
        super().__init__(message, status=status)
        self.body: dict[str, Any] = body if body is not None else {}
        self.replica = replica

    def to_openai(self) -> dict[str, Any]:
        # Pass an OpenAI-shaped upstream error through untouched; anything else
        # (e.g. vLLM's bare {"error": "Unauthorized"}) is wrapped.
        error = self.body.get("error")
        if isinstance(error, dict) and "message" in error:
            return self.body
        return super().to_openai()


def error_from_upstream(
    status: int, body: dict[str, Any] | None, replica: str | None = None
) -> UpstreamError:
    """Build an UpstreamError from an upstream status and its decoded JSON body."""
    message = f"Upstream returned HTTP {status}."
    if body:
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
        elif isinstance(error, str):
            message = error
        elif isinstance(body.get("message"), str):
            message = body["message"]
    err = UpstreamError(message, status=status, body=body, replica=replica)
    if 400 <= status < 500:
        err.error_type = "invalid_request_error"
    return err
