"""Responses state, owned by the gateway: one row per stored response, per tenant.

A conversation never depends on which replica or which gateway process
answered an earlier turn: `previous_response_id` is read from here. Each row
keeps the items of the turns before it (`context_items`) beside its own input
and output, so continuing a chain of any length is one primary-key read.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, delete, update
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, col

from gateway.db.ids import utcnow

FINAL = ("completed", "incomplete", "failed", "cancelled")


class StoredResponse(SQLModel, table=True):
    __tablename__ = "responses"

    id: str = Field(primary_key=True)
    tenant_id: str = Field(index=True)
    # The request that created it: its usage record carries the same id.
    request_id: str = Field(unique=True)
    previous_response_id: str | None = None
    model: str
    # queued | in_progress | completed | incomplete | failed | cancelled
    status: str = Field(index=True)
    background: bool = False
    context_items: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    input_items: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    response: dict = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, index=True)
    completed_at: datetime | None = None

    def as_object(self) -> dict[str, Any]:
        return {**self.response, "status": self.status}

    def conversation(self) -> list[dict[str, Any]]:
        """Every item up to and including this response's output: the history
        of a response that names this one as its previous response."""
        return [*self.context_items, *self.input_items, *self.response.get("output", [])]


def get(engine: Engine, tenant_id: str, response_id: str) -> StoredResponse | None:
    with Session(engine, expire_on_commit=False) as s:
        row = s.get(StoredResponse, response_id)
    if row is None or row.tenant_id != tenant_id:
        return None  # another tenant's id is indistinguishable from a missing one
    return row


def insert(engine: Engine, row: StoredResponse) -> None:
    with Session(engine, expire_on_commit=False) as s:
        s.add(row)
        s.commit()


def finish(engine: Engine, response_id: str, response: dict[str, Any], *, only_if: str) -> bool:
    """Stores the final object unless the row left status `only_if` meanwhile
    (a background response cancelled while it ran keeps `cancelled`)."""
    with Session(engine) as s:
        result = s.exec(  # type: ignore[call-overload]
            update(StoredResponse)
            .where(col(StoredResponse.id) == response_id, col(StoredResponse.status) == only_if)
            .values(status=response["status"], response=response, completed_at=utcnow())
        )
        s.commit()
        return result.rowcount == 1


def move(engine: Engine, response_id: str, to: str, *, from_: tuple[str, ...]) -> bool:
    with Session(engine) as s:
        values: dict[str, Any] = {"status": to}
        if to in FINAL:
            values["completed_at"] = utcnow()
        result = s.exec(  # type: ignore[call-overload]
            update(StoredResponse)
            .where(col(StoredResponse.id) == response_id, col(StoredResponse.status).in_(from_))
            .values(**values)
        )
        s.commit()
        return result.rowcount == 1


def remove(engine: Engine, tenant_id: str, response_id: str) -> bool:
    with Session(engine) as s:
        result = s.exec(  # type: ignore[call-overload]
            delete(StoredResponse).where(
                col(StoredResponse.id) == response_id,
                col(StoredResponse.tenant_id) == tenant_id,
            )
        )
        s.commit()
        return result.rowcount == 1
