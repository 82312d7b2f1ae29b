"""vLLM's endpoints beyond the OpenAI API, passed through the one pipeline.

JSON: POST /v1/rerank, /rerank, /v2/rerank, /v1/score, /score, /tokenize and
/detokenize. Multipart uploads: POST /v1/audio/transcriptions and
/v1/audio/translations, whose form is forwarded byte for byte. Each request is
authenticated, admitted, routed and metered like a chat completion (endpoint
named after it in usage records); a model that cannot serve it gets a 400
naming the model and the capability (gateway/capabilities.py).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from backends.pool import ReplicaPool
from gateway.auth import require_caller
from gateway.errors import APIError
from gateway.pipeline import Call
from gateway.protocol import ENDPOINTS, Upload
from gateway.requests import read_body, read_json, validate
from gateway.routes.inference import _until_disconnect, to_response

router = APIRouter(tags=["passthrough"])


async def _json(request: Request, endpoint: str) -> Response:
    caller = await require_caller(request)
    state = request.app.state.bearpaw
    call = Call(endpoint=endpoint, body={}, caller=caller, request_id=request.state.request_id)
    try:
        call.body = await read_json(request, state.settings.max_body_bytes)
        _default_model(call.body, state.pool)
        validate(ENDPOINTS[endpoint].request, call.body)
        if endpoint == "tokenize":
            _one_input(call.body)
    except APIError as exc:
        # Malformed requests are metered too: every request leaves one record.
        await state.pipeline.reject(call, exc)
        raise
    return to_response(await _until_disconnect(request, state.pipeline.run(call)))


async def _upload(request: Request, endpoint: str) -> Response:
    caller = await require_caller(request)
    state = request.app.state.bearpaw
    call = Call(endpoint=endpoint, body={}, caller=caller, request_id=request.state.request_id)
    try:
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise APIError(
                400,
                "This endpoint takes a multipart/form-data upload with the fields "
                "`file` and `model`.",
                code="invalid_content_type",
            )
        content = await read_body(request, state.settings.max_body_bytes, "a multipart form")
        call.body = await _form_fields(request, content)
        _default_model(call.body, state.pool)
        validate(ENDPOINTS[endpoint].request, call.body)
    except APIError as exc:
        await state.pipeline.reject(call, exc)
        raise
    # The pipeline reads the model (routing, metering) and the prompt (admission);
    # form values are all strings, so the others (`stream`: "false") stay in the
    # raw form only, where the backend reads them.
    fields = {name: call.body[name] for name in ("model", "file", "prompt") if name in call.body}
    call.body = Upload(fields, content, content_type)
    return to_response(await _until_disconnect(request, state.pipeline.run(call)))


def _default_model(body: dict[str, Any], pool: ReplicaPool) -> None:
    """vLLM lets clients leave `model` out of these endpoints, since it serves
    one; so does the gateway while it serves exactly one (otherwise validation
    reports the missing parameter)."""
    if body.get("model"):
        return
    served = {pool.resolve(name) for name in pool.model_names()}
    if len(served) == 1:
        body["model"] = served.pop()


def _one_input(body: dict[str, Any]) -> None:
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise APIError(
            400,
            "Send exactly one of 'prompt' (text) or 'messages' (a chat) to tokenize.",
            param="prompt",
            code="missing_required_parameter",
        )


async def _form_fields(request: Request, content: bytes) -> dict[str, Any]:
    """The form's text fields, and each file part's file name, for validation
    and metering (the bytes forwarded are `content`, untouched)."""

    async def once() -> AsyncGenerator[bytes, None]:
        yield content

    try:
        form = await MultiPartParser(request.headers, once()).parse()
    except MultiPartException as exc:
        raise APIError(
            400, f"The multipart form could not be read: {exc.message}", code="invalid_multipart"
        ) from None
    fields: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            item = (value.filename or name) if isinstance(value, UploadFile) else value
            if name not in fields:
                fields[name] = item
            elif isinstance(fields[name], list):
                fields[name].append(item)
            else:
                fields[name] = [fields[name], item]
    finally:
        await form.close()
    return fields


# Authentication is awaited in the handlers (as in routes/inference.py) so that
# an unauthenticated request is refused before its body is read.


@router.post("/v1/rerank")
@router.post("/rerank")
@router.post("/v2/rerank")
async def rerank(request: Request) -> Response:
    return await _json(request, "rerank")


@router.post("/v1/score")
@router.post("/score")
async def score(request: Request) -> Response:
    return await _json(request, "score")


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    return await _json(request, "tokenize")


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    return await _json(request, "detokenize")


@router.post("/v1/audio/transcriptions")
async def audio_transcriptions(request: Request) -> Response:
    return await _upload(request, "audio.transcriptions")


@router.post("/v1/audio/translations")
async def audio_translations(request: Request) -> Response:
    return await _upload(request, "audio.translations")
