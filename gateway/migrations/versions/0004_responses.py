"""responses: the Responses API's stored responses (conversation state)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

INDEXED = ("created_at", "status", "tenant_id")


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", AutoString(), nullable=False),
        sa.Column("tenant_id", AutoString(), nullable=False),
        sa.Column("request_id", AutoString(), nullable=False),
        sa.Column("previous_response_id", AutoString(), nullable=True),
        sa.Column("model", AutoString(), nullable=False),
        sa.Column("status", AutoString(), nullable=False),
        sa.Column("background", sa.Boolean(), nullable=False),
        sa.Column("context_items", sa.JSON(), nullable=False),
        sa.Column("input_items", sa.JSON(), nullable=False),
        sa.Column("response", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    with op.batch_alter_table("responses") as batch_op:
        for column in INDEXED:
            batch_op.create_index(batch_op.f(f"ix_responses_{column}"), [column], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("responses") as batch_op:
        for column in INDEXED:
            batch_op.drop_index(batch_op.f(f"ix_responses_{column}"))
    op.drop_table("responses")
