"""/v1/files: upload, list, retrieve, content, delete (OpenAI Files API)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from gateway.auth import CallerDep
from gateway.errors import APIError
from gateway.file_store import (
    UPLOAD_PURPOSES,
    create_file,
    delete_file,
    file_content,
    file_object,
    get_file,
    list_files,
)

router = APIRouter(prefix="/v1", tags=["files"])


@router.post("/files")
async def upload(request: Request, caller: CallerDep) -> dict[str, Any]:
    state = request.app.state.bearpaw
    limit = state.settings.max_file_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise _too_large(limit)
    try:
        form = await request.form(max_part_size=limit)
    except Exception:  # malformed or non-multipart bodies
        raise APIError(
            400,
            "The request must be multipart/form-data with a 'file' and a 'purpose'.",
            code="invalid_request",
        ) from None
    upload_file = form.get("file")
    purpose = form.get("purpose")
    if not isinstance(upload_file, UploadFile):
        raise APIError(
            400,
            "Missing required parameter: 'file'.",
            param="file",
            code="missing_required_parameter",
        )
    if not isinstance(purpose, str) or not purpose:
        raise APIError(
            400,
            "Missing required parameter: 'purpose'.",
            param="purpose",
            code="missing_required_parameter",
        )
    if purpose not in UPLOAD_PURPOSES:
        raise APIError(
            400,
            f"'{purpose}' is not one of {list(UPLOAD_PURPOSES)} - 'purpose'",
            param="purpose",
            code="invalid_value",
        )
    content = await upload_file.read()
    if len(content) > limit:
        raise _too_large(limit)
    filename = upload_file.filename or "upload"
    if purpose == "batch":
        _check_batch_upload(filename, content)
    f = await state.run_sync(
        create_file, state.engine, caller.tenant_id, filename, purpose, content
    )
    return file_object(f)


def _check_batch_upload(filename: str, content: bytes) -> None:
    # Line-level problems are the batch's to report (errors.data with line
    # numbers); here only what makes the file unusable as a whole.
    if not filename.endswith(".jsonl"):
        raise APIError(
            400,
            "Invalid file format for Batch API. Must be .jsonl",
            param="file",
            code="invalid_file_format",
        )
    if not content.strip():
        raise APIError(400, "File is empty.", param="file", code="empty_file")
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(
            400, "The file must be UTF-8 encoded JSONL.", param="file", code="invalid_file_format"
        ) from None


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The file is larger than the limit of {limit} bytes.",
        param="file",
        code="file_too_large",
    )


@router.get("/files")
async def list_(
    request: Request,
    caller: CallerDep,
    purpose: str | None = None,
    limit: int = Query(10_000, ge=1, le=10_000),
    order: str = Query("desc", pattern="^(asc|desc)$"),
    after: str | None = None,
) -> dict[str, Any]:
    state = request.app.state.bearpaw
    rows, more = await state.run_sync(
        list_files, state.engine, caller.tenant_id, purpose, limit, order, after
    )
    data = [file_object(f) for f in rows]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


@router.get("/files/{file_id}")
async def retrieve(request: Request, caller: CallerDep, file_id: str) -> dict[str, Any]:
    state = request.app.state.bearpaw
    return file_object(await state.run_sync(get_file, state.engine, caller.tenant_id, file_id))


@router.get("/files/{file_id}/content")
async def content(request: Request, caller: CallerDep, file_id: str) -> Response:
    state = request.app.state.bearpaw
    f, data = await state.run_sync(file_content, state.engine, caller.tenant_id, file_id)
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"content-disposition": f'attachment; filename="{f.filename}"'},
    )


@router.delete("/files/{file_id}")
async def delete(request: Request, caller: CallerDep, file_id: str) -> dict[str, Any]:
    state = request.app.state.bearpaw
    await state.run_sync(delete_file, state.engine, caller.tenant_id, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
