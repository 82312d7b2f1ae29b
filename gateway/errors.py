"""OpenAI-style error objects and the exception handlers that produce them."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from backends.errors import BackendError, UpstreamError

# OpenAI's `type` strings for each status family.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "timeout",
}


class APIError(Exception):
    """An error the client must see as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_backend(exc: BackendError) -> APIError:
    """Translate a backend failure into the error the client sees."""
    if isinstance(exc, UpstreamError) and isinstance(exc.body, dict) and "error" in exc.body:
        err = exc.body["error"]
        if isinstance(err, dict):
            return APIError(
                exc.status,
                str(err.get("message") or exc.message),
                code=_str_or_none(err.get("code")),
                param=_str_or_none(err.get("param")),
                type=_TYPES.get(exc.status) if exc.status >= 500 else None,
            )
    # A failure that names itself (no_replica_available after a hold) keeps its code.
    if exc.code is not None:
        return APIError(exc.status, exc.message, code=exc.code)
    code = {404: "model_not_found", 503: "backend_unavailable", 504: "upstream_timeout"}
    return APIError(exc.status, exc.message, code=code.get(exc.status, "upstream_error"))


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def json_error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return json_error(exc)

    @app.exception_handler(BackendError)
    async def _backend_error(_: Request, exc: BackendError) -> JSONResponse:
        return json_error(from_backend(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        param = ".".join(loc) or None
        msg = first.get("msg", "Invalid request")
        message = f"Invalid value for '{param}': {msg}" if param else msg
        return json_error(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        code = "not_found" if exc.status_code == 404 else None
        return json_error(APIError(exc.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Imported here: the resilience package builds on this module.
        from gateway.resilience.dependencies import is_database_error, unavailable

        if is_database_error(exc):
            # Files, batches, jobs, reports, admin: they need the database; say
            # so with a 503 the client can retry, never a bare 500.
            state = getattr(request.app.state, "bearpaw", None)
            retry = 5
            if state is not None:
                if "dependencies" in state.extras:
                    state.extras["dependencies"].failed("database", exc)
                retry = state.settings.resilience.retry_after_s
            return json_error(unavailable("database", retry))
        return json_error(APIError(500, "The server had an error processing your request."))
