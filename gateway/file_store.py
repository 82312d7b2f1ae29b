"""Files of the OpenAI Files API, kept in the database (see db/files.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, delete, select

from gateway.db.files import FileContent, StoredFile
from gateway.db.ids import new_id, unix
from gateway.errors import APIError

# Purposes a client may upload with; Bearpaw only acts on `batch` files but
# accepts the others so that SDK code written against OpenAI does not break.
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


def file_object(f: StoredFile) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": unix(f.created_at),
        "expires_at": unix(f.expires_at),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
    }


def new_file(
    tenant_id: str, filename: str, purpose: str, content: bytes
) -> tuple[StoredFile, FileContent]:
    """Rows for a file, to be added in the caller's transaction."""
    f = StoredFile(
        id=new_id("file-"),
        tenant_id=tenant_id,
        filename=filename,
        purpose=purpose,
        bytes=len(content),
    )
    return f, FileContent(file_id=f.id, content=content)


def create_file(
    engine: Engine, tenant_id: str, filename: str, purpose: str, content: bytes
) -> StoredFile:
    f, blob = new_file(tenant_id, filename, purpose, content)
    with Session(engine, expire_on_commit=False) as s:
        s.add(f)
        s.flush()  # the file row first: the content row refers to it
        s.add(blob)
        s.commit()
    return f


def get_file(engine: Engine, tenant_id: str, file_id: str) -> StoredFile:
    with Session(engine, expire_on_commit=False) as s:
        f = s.get(StoredFile, file_id)
    if f is None or f.tenant_id != tenant_id:
        raise APIError(404, f"No such File object: {file_id}", param="id", code="not_found")
    return f


def file_content(engine: Engine, tenant_id: str, file_id: str) -> tuple[StoredFile, bytes]:
    f = get_file(engine, tenant_id, file_id)
    with Session(engine) as s:
        blob = s.get(FileContent, file_id)
        content = bytes(blob.content) if blob is not None else b""
    return f, content


def list_files(
    engine: Engine,
    tenant_id: str,
    purpose: str | None,
    limit: int,
    order: str,
    after: str | None,
) -> tuple[list[StoredFile], bool]:
    newest_first = order != "asc"
    with Session(engine, expire_on_commit=False) as s:
        query = select(StoredFile).where(StoredFile.tenant_id == tenant_id)
        if purpose:
            query = query.where(StoredFile.purpose == purpose)
        if after:
            anchor = s.get(StoredFile, after)
            if anchor is not None and anchor.tenant_id == tenant_id:
                # Ties on created_at are broken by id, so paging never skips a file.
                key = (anchor.created_at, anchor.id)
                if newest_first:
                    query = query.where(
                        (col(StoredFile.created_at) < key[0])
                        | ((col(StoredFile.created_at) == key[0]) & (col(StoredFile.id) < key[1]))
                    )
                else:
                    query = query.where(
                        (col(StoredFile.created_at) > key[0])
                        | ((col(StoredFile.created_at) == key[0]) & (col(StoredFile.id) > key[1]))
                    )
        if newest_first:
            query = query.order_by(col(StoredFile.created_at).desc(), col(StoredFile.id).desc())
        else:
            query = query.order_by(col(StoredFile.created_at), col(StoredFile.id))
        rows = list(s.exec(query.limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit


def delete_file(engine: Engine, tenant_id: str, file_id: str) -> None:
    get_file(engine, tenant_id, file_id)
    with Session(engine) as s:
        s.exec(delete(FileContent).where(col(FileContent.file_id) == file_id))  # type: ignore[call-overload]
        s.exec(delete(StoredFile).where(col(StoredFile.id) == file_id))  # type: ignore[call-overload]
        s.commit()
