"""Batches and their lines in the database: the one place that moves a batch
through validating -> in_progress -> finalizing -> completed | failed |
expired | cancelling -> cancelled, used by the routes and by the workers.

Every write transaction starts with its conditional UPDATE, so that two
workers racing on one batch (a redelivered task, a recovery sweep) settle it
in the database: a line is answered once, a batch is finalized once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import func, or_, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from gateway.batch_input import parse_input
from gateway.caller import Caller
from gateway.db.batches import Batch, BatchLine
from gateway.db.files import FileContent
from gateway.db.ids import new_id, unix, utcnow
from gateway.errors import APIError
from gateway.file_store import get_file, new_file
from gateway.protocol import BATCH_URLS

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
FINAL = ("completed", "failed", "expired", "cancelled")
# Line states that end in the error file, and what they say there.
UNRUN = {
    "expired": (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
    "cancelled": ("batch_cancelled", "This request was not executed: the batch was cancelled."),
}


# ---------------------------------------------------------------- objects
@dataclass(frozen=True)
class LineCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


def line_counts(engine: Engine, batch_id: str) -> LineCounts:
    with Session(engine) as s:
        rows = s.exec(
            select(
                BatchLine.status,
                func.count(),
                func.sum(BatchLine.prompt_tokens),
                func.sum(BatchLine.completion_tokens),
            )
            .where(BatchLine.batch_id == batch_id)
            .group_by(BatchLine.status)
        ).all()
    total = completed = failed = tokens_in = tokens_out = 0
    for status, n, p, c in rows:
        total += n
        tokens_in += p or 0
        tokens_out += c or 0
        if status == "done":
            completed += n
        elif status != "pending":
            failed += n
    return LineCounts(total, completed, failed, tokens_in, tokens_out)


def batch_object(batch: Batch, counts: LineCounts) -> dict[str, Any]:
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": unix(batch.created_at),
        "in_progress_at": unix(batch.in_progress_at),
        "expires_at": unix(batch.expires_at),
        "finalizing_at": unix(batch.finalizing_at),
        "completed_at": unix(batch.completed_at),
        "failed_at": unix(batch.failed_at),
        "expired_at": unix(batch.expired_at),
        "cancelling_at": unix(batch.cancelling_at),
        "cancelled_at": unix(batch.cancelled_at),
        "request_counts": {
            "total": counts.total,
            "completed": counts.completed,
            "failed": counts.failed,
        },
        "usage": {
            "input_tokens": counts.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": counts.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": counts.input_tokens + counts.output_tokens,
        },
        "metadata": batch.batch_metadata,
    }


def describe(engine: Engine, batch: Batch) -> dict[str, Any]:
    return batch_object(batch, line_counts(engine, batch.id))


# ------------------------------------------------------------ gateway side
def create_batch(
    engine: Engine,
    caller: Caller,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
) -> Batch:
    if endpoint not in BATCH_URLS:
        raise APIError(
            400,
            f"Invalid value for 'endpoint': '{endpoint}'. Supported values are: "
            + ", ".join(f"'{u}'" for u in BATCH_URLS)
            + ".",
            param="endpoint",
            code="invalid_value",
        )
    if completion_window not in COMPLETION_WINDOWS:
        raise APIError(
            400,
            f"Invalid value for 'completion_window': '{completion_window}'. "
            "Supported values are: '24h'.",
            param="completion_window",
            code="invalid_value",
        )
    if metadata is not None and (
        not isinstance(metadata, dict)
        or len(metadata) > 16
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise APIError(
            400,
            "Invalid 'metadata': at most 16 string keys with string values.",
            param="metadata",
            code="invalid_value",
        )
    try:
        f = get_file(engine, caller.tenant_id, input_file_id)
    except APIError:
        raise APIError(
            400,
            f"Invalid 'input_file_id': '{input_file_id}'. No such file.",
            param="input_file_id",
            code="invalid_value",
        ) from None
    if f.purpose != "batch":
        raise APIError(
            400,
            f"Invalid 'input_file_id': '{input_file_id}'. The file must be uploaded "
            "with purpose 'batch'.",
            param="input_file_id",
            code="invalid_value",
        )
    now = utcnow()
    batch = Batch(
        id=new_id("batch_"),
        tenant_id=caller.tenant_id,
        caller=caller.to_dict(),
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        batch_metadata=metadata,
        created_at=now,
        expires_at=now + COMPLETION_WINDOWS[completion_window],
    )
    with Session(engine, expire_on_commit=False) as s:
        s.add(batch)
        s.commit()
    return batch


def get_batch(engine: Engine, tenant_id: str | None, batch_id: str) -> Batch:
    with Session(engine, expire_on_commit=False) as s:
        batch = s.get(Batch, batch_id)
    if batch is None or (tenant_id is not None and batch.tenant_id != tenant_id):
        raise APIError(404, f"No batch found with id '{batch_id}'.", param="id", code="not_found")
    return batch


def list_batches(
    engine: Engine, tenant_id: str, after: str | None, limit: int
) -> tuple[list[Batch], bool]:
    with Session(engine, expire_on_commit=False) as s:
        query = select(Batch).where(Batch.tenant_id == tenant_id)
        if after:
            anchor = s.get(Batch, after)
            if anchor is not None and anchor.tenant_id == tenant_id:
                query = query.where(
                    (col(Batch.created_at) < anchor.created_at)
                    | ((col(Batch.created_at) == anchor.created_at) & (col(Batch.id) < anchor.id))
                )
        query = query.order_by(col(Batch.created_at).desc(), col(Batch.id).desc())
        rows = list(s.exec(query.limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit


def request_cancel(engine: Engine, tenant_id: str, batch_id: str) -> Batch:
    batch = get_batch(engine, tenant_id, batch_id)
    if batch.status in ("cancelling", "cancelled"):
        return batch
    with Session(engine) as s:
        result = s.exec(  # type: ignore[call-overload]
            update(Batch)
            .where(col(Batch.id) == batch_id, col(Batch.status).in_(("validating", "in_progress")))
            .values(status="cancelling", cancelling_at=utcnow())
        )
        s.commit()
    if result.rowcount != 1:
        batch = get_batch(engine, tenant_id, batch_id)
        raise APIError(
            409,
            f"Cannot cancel a batch with status '{batch.status}'.",
            code="invalid_state",
        )
    return get_batch(engine, tenant_id, batch_id)


# ------------------------------------------------------------- worker side
def active_batch_ids(engine: Engine) -> list[str]:
    with Session(engine) as s:
        return list(s.exec(select(Batch.id).where(col(Batch.status).in_(ACTIVE))).all())


def validate_batch(engine: Engine, batch_id: str, known_model: Callable[[str], bool]) -> str:
    """validating -> in_progress (lines stored) or failed (errors listed).
    Returns the batch's status afterwards."""
    batch = get_batch(engine, None, batch_id)
    if batch.status != "validating":
        return batch.status
    with Session(engine) as s:
        blob = s.get(FileContent, batch.input_file_id)
        content = bytes(blob.content) if blob is not None else b""
    lines, errors = parse_input(content, batch.endpoint, known_model)
    now = utcnow()
    with Session(engine) as s:
        if errors:
            values: dict[str, Any] = {"status": "failed", "failed_at": now, "errors": errors}
        else:
            values = {
                "status": "in_progress",
                "in_progress_at": now,
                "model": str(lines[0].body.get("model")),
                "total": len(lines),
            }
        result = s.exec(  # type: ignore[call-overload]
            update(Batch)
            .where(col(Batch.id) == batch_id, col(Batch.status) == "validating")
            .values(**values)
        )
        if result.rowcount != 1:
            s.rollback()
            return get_batch(engine, None, batch_id).status
        if not errors:
            s.add_all(
                BatchLine(
                    batch_id=batch_id,
                    line_no=line.line_no,
                    custom_id=line.custom_id,
                    body=orjson.dumps(line.body).decode(),
                )
                for line in lines
            )
        s.commit()
    return values["status"]


def claim_lines(
    engine: Engine, batch_id: str, owner: str, limit: int, claim_seconds: float
) -> list[BatchLine]:
    """Pending lines nobody holds a live claim on, now claimed by `owner`."""
    if limit <= 0:
        return []
    now = utcnow()
    free = or_(col(BatchLine.claimed_until).is_(None), col(BatchLine.claimed_until) < now)
    with Session(engine, expire_on_commit=False) as s:
        candidates = list(
            s.exec(
                select(BatchLine.line_no)
                .where(BatchLine.batch_id == batch_id, BatchLine.status == "pending", free)
                .order_by(col(BatchLine.line_no))
                .limit(limit)
            ).all()
        )
        s.commit()  # end the read: the claim below must start its own write transaction
        if not candidates:
            return []
        s.exec(  # type: ignore[call-overload]
            update(BatchLine)
            .where(
                col(BatchLine.batch_id) == batch_id,
                col(BatchLine.line_no).in_(candidates),
                col(BatchLine.status) == "pending",
                free,
            )
            .values(claimed_by=owner, claimed_until=now + timedelta(seconds=claim_seconds))
        )
        s.commit()
        return list(
            s.exec(
                select(BatchLine)
                .where(
                    BatchLine.batch_id == batch_id,
                    col(BatchLine.line_no).in_(candidates),
                    BatchLine.claimed_by == owner,
                    BatchLine.status == "pending",
                )
                .order_by(col(BatchLine.line_no))
            ).all()
        )


def pending_claim_ends(engine: Engine, batch_id: str) -> float | None:
    """Seconds until the earliest live claim on a pending line runs out; None
    when no pending line is left."""
    with Session(engine) as s:
        rows = s.exec(
            select(BatchLine.claimed_until).where(
                BatchLine.batch_id == batch_id, BatchLine.status == "pending"
            )
        ).all()
    if not rows:
        return None
    now = utcnow()
    waits = [(until - now).total_seconds() if until else 0.0 for until in rows]
    return max(0.0, min(waits))


def output_line(batch_id: str, line: BatchLine, status_code: int, body: Any) -> dict[str, Any]:
    return {
        "id": line_request_output_id(batch_id, line.line_no),
        "custom_id": line.custom_id,
        "response": {
            "status_code": status_code,
            "request_id": line_request_id(batch_id, line.line_no),
            "body": body,
        },
        "error": None,
    }


def line_request_id(batch_id: str, line_no: int) -> str:
    """Stable per line: a line run twice (after a worker died) is metered once."""
    return f"{batch_id}:{line_no}"


def line_request_output_id(batch_id: str, line_no: int) -> str:
    digest = hashlib.blake2b(f"{batch_id}:{line_no}".encode(), digest_size=12).hexdigest()
    return f"batch_req_{digest}"


def finish_line(
    engine: Engine,
    batch_id: str,
    line: BatchLine,
    status_code: int,
    body: Any,
    usage: dict[str, Any] | None,
) -> bool:
    """Stores a line's answer and marks it done/failed in one transaction;
    False when the line was already answered (or expired/cancelled)."""
    result_line = output_line(batch_id, line, status_code, body)
    usage = usage or {}
    with Session(engine) as s:
        result = s.exec(  # type: ignore[call-overload]
            update(BatchLine)
            .where(
                col(BatchLine.batch_id) == batch_id,
                col(BatchLine.line_no) == line.line_no,
                col(BatchLine.status) == "pending",
            )
            .values(
                status="done" if status_code < 400 else "failed",
                result=orjson.dumps(result_line).decode(),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                finished_at=utcnow(),
            )
        )
        s.commit()
        return result.rowcount == 1


def mark_finalizing(engine: Engine, batch_id: str) -> bool:
    with Session(engine) as s:
        result = s.exec(  # type: ignore[call-overload]
            update(Batch)
            .where(col(Batch.id) == batch_id, col(Batch.status) == "in_progress")
            .values(status="finalizing", finalizing_at=utcnow())
        )
        s.commit()
        return result.rowcount == 1


def finalize(engine: Engine, batch_id: str, outcome: str) -> bool:
    """Ends the batch as `outcome` (completed | expired | cancelled): unrun
    lines are marked so, and the output and error files are built from the
    line rows, all in one transaction. False when another worker did it."""
    came_from = {
        "completed": ("finalizing",),
        "expired": ("in_progress", "finalizing"),
        "cancelled": ("cancelling",),
    }[outcome]
    now = utcnow()
    with Session(engine, expire_on_commit=False) as s:
        claimed = s.exec(  # type: ignore[call-overload]
            update(Batch)
            .where(col(Batch.id) == batch_id, col(Batch.status).in_(came_from))
            .values(status=outcome, **{f"{outcome}_at": now})
        )
        if claimed.rowcount != 1:
            s.rollback()
            return False
        if outcome != "completed":
            s.exec(  # type: ignore[call-overload]
                update(BatchLine)
                .where(col(BatchLine.batch_id) == batch_id, col(BatchLine.status) == "pending")
                .values(status=outcome, finished_at=now)
            )
        batch = s.get(Batch, batch_id)
        assert batch is not None
        lines = s.exec(
            select(BatchLine).where(BatchLine.batch_id == batch_id).order_by(col(BatchLine.line_no))
        ).all()
        output: list[bytes] = []
        errors: list[bytes] = []
        for line in lines:
            if line.status == "done":
                output.append(line.result.encode() if line.result else b"")
            elif line.status == "failed":
                errors.append(line.result.encode() if line.result else b"")
            else:
                code, message = UNRUN.get(line.status, UNRUN["expired"])
                errors.append(
                    orjson.dumps(
                        {
                            "id": line_request_output_id(batch_id, line.line_no),
                            "custom_id": line.custom_id,
                            "response": None,
                            "error": {"code": code, "message": message},
                        }
                    )
                )
        for kind, rows in (("output", output), ("error", errors)):
            if not rows:
                continue
            f, blob = new_file(
                batch.tenant_id,
                f"{batch_id}_{kind}.jsonl",
                "batch_output",
                b"\n".join(rows) + b"\n",
            )
            s.add(f)
            s.flush()
            s.add(blob)
            setattr(batch, f"{kind}_file_id", f.id)
        batch.completed = len(output)
        batch.failed = len(errors)
        s.add(batch)
        s.commit()
        return True
