"""Reading and checking a batch input file (JSONL of BatchRequestInput).

A file with any bad line fails the whole batch before a single request runs,
as OpenAI does; each problem is reported as a BatchError
{code, message, param, line} in the batch's `errors.data`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from gateway.dialects.responses.protocol import ResponsesRequest, refusal
from gateway.protocol import BATCH_URLS, ENDPOINTS

# OpenAI stops listing after this many problems; so do we.
MAX_ERRORS = 100
MAX_LINES = 50_000


@dataclass(frozen=True)
class InputLine:
    line_no: int  # 1-based, counting every line of the file
    custom_id: str
    body: dict[str, Any]


def batch_error(code: str, message: str, param: str | None, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def parse_input(
    content: bytes, endpoint: str, known_model: Callable[[str], bool]
) -> tuple[list[InputLine], list[dict[str, Any]]]:
    """The file's requests, and its problems (an empty list when it is good)."""
    lines: list[InputLine] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    name = BATCH_URLS[endpoint]
    request_model = ResponsesRequest if name == "responses" else ENDPOINTS[name][1]

    for line_no, raw in enumerate(content.splitlines(), start=1):
        if len(errors) >= MAX_ERRORS:
            break
        if not raw.strip():
            continue
        problem = _check_line(raw, line_no, endpoint, request_model, known_model, seen)
        if isinstance(problem, InputLine):
            lines.append(problem)
        else:
            errors.append(problem)

    if not lines and not errors:
        errors.append(batch_error("empty_file", "The batch input file is empty.", None, None))
    elif len(lines) > MAX_LINES:
        errors.append(
            batch_error(
                "too_many_requests",
                f"The batch input file has more than the maximum of {MAX_LINES} requests.",
                None,
                None,
            )
        )
    return lines, errors


def _check_line(
    raw: bytes,
    line_no: int,
    endpoint: str,
    request_model: Any,
    known_model: Callable[[str], bool],
    seen: set[str],
) -> InputLine | dict[str, Any]:
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        item = None
    if not isinstance(item, dict):
        return batch_error(
            "invalid_json_line", "This line is not parseable as valid JSON.", None, line_no
        )
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _missing("custom_id", line_no)
    method = item.get("method")
    if method is None:
        return _missing("method", line_no)
    if method != "POST":
        return batch_error(
            "invalid_method",
            "The HTTP method provided for this request is not supported. Only POST is supported.",
            "method",
            line_no,
        )
    url = item.get("url")
    if url is None:
        return _missing("url", line_no)
    if url != endpoint:
        return batch_error(
            "invalid_url",
            "The URL provided for this request does not match the batch endpoint.",
            "url",
            line_no,
        )
    body = item.get("body")
    if body is None:
        return _missing("body", line_no)
    if not isinstance(body, dict):
        return batch_error(
            "invalid_request", "The request body must be a JSON object.", "body", line_no
        )
    try:
        request_model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        return batch_error(
            "invalid_request",
            f"Invalid value for 'body.{loc}': {err.get('msg')}" if loc else str(err.get("msg")),
            f"body.{loc}" if loc else "body",
            line_no,
        )
    if request_model is ResponsesRequest:
        problem = refusal(body)
        if problem is None and body.get("background"):
            problem_message = "Background responses are not supported in the Batch API."
            return batch_error("invalid_request", problem_message, "body.background", line_no)
        if problem is not None:
            param = f"body.{problem.param}" if problem.param else "body"
            return batch_error("invalid_request", problem.message, param, line_no)
    if body.get("stream"):
        return batch_error(
            "invalid_request",
            "Streaming is not supported in the Batch API.",
            "body.stream",
            line_no,
        )
    model = str(body.get("model"))
    if not known_model(model):
        return batch_error(
            "model_not_found",
            f"The provided model '{model}' is not supported by the Batch API.",
            "body.model",
            line_no,
        )
    if custom_id in seen:
        return batch_error(
            "duplicate_custom_id",
            "The custom_id for this request is a duplicate of another request. "
            "The custom_id parameter must be unique for each request in a batch.",
            "custom_id",
            line_no,
        )
    seen.add(custom_id)
    return InputLine(line_no, custom_id, body)


def _missing(param: str, line_no: int) -> dict[str, Any]:
    return batch_error(
        "missing_required_parameter", f"Missing required parameter: '{param}'.", param, line_no
    )
