"""files, batches, batch lines, async jobs

Revision ID: 0003
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _indexes(table: str, *columns: str) -> None:
    with op.batch_alter_table(table) as batch_op:
        for column in columns:
            batch_op.create_index(batch_op.f(f"ix_{table}_{column}"), [column], unique=False)


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", AutoString(), nullable=False),
        sa.Column("tenant_id", AutoString(), nullable=False),
        sa.Column("filename", AutoString(), nullable=False),
        sa.Column("purpose", AutoString(), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    _indexes("files", "created_at", "tenant_id")
    op.create_table(
        "file_contents",
        sa.Column("file_id", AutoString(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["file_id"], ["files.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("file_id"),
    )
    op.create_table(
        "batches",
        sa.Column("id", AutoString(), nullable=False),
        sa.Column("tenant_id", AutoString(), nullable=False),
        sa.Column("caller", sa.JSON(), nullable=False),
        sa.Column("endpoint", AutoString(), nullable=False),
        sa.Column("input_file_id", AutoString(), nullable=False),
        sa.Column("completion_window", AutoString(), nullable=False),
        sa.Column("status", AutoString(), nullable=False),
        sa.Column("model", AutoString(), nullable=True),
        sa.Column("output_file_id", AutoString(), nullable=True),
        sa.Column("error_file_id", AutoString(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("batch_metadata", sa.JSON(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("in_progress_at", UTCDateTime(), nullable=True),
        sa.Column("finalizing_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("failed_at", UTCDateTime(), nullable=True),
        sa.Column("expired_at", UTCDateTime(), nullable=True),
        sa.Column("cancelling_at", UTCDateTime(), nullable=True),
        sa.Column("cancelled_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    _indexes("batches", "created_at", "status", "tenant_id")
    op.create_table(
        "batch_lines",
        sa.Column("batch_id", AutoString(), nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("custom_id", AutoString(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("status", AutoString(), nullable=False),
        sa.Column("claimed_by", AutoString(), nullable=True),
        sa.Column("claimed_until", UTCDateTime(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("batch_id", "line_no"),
        sa.UniqueConstraint("batch_id", "custom_id", name="uq_batch_lines_custom_id"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", AutoString(), nullable=False),
        sa.Column("tenant_id", AutoString(), nullable=False),
        sa.Column("request_id", AutoString(), nullable=False),
        sa.Column("caller", sa.JSON(), nullable=False),
        sa.Column("endpoint", AutoString(), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("cache_control", AutoString(), nullable=False),
        sa.Column("status", AutoString(), nullable=False),
        sa.Column("claimed_until", UTCDateTime(), nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.JSON(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    _indexes("jobs", "created_at", "status", "tenant_id")


def downgrade() -> None:
    for table, columns in (
        ("jobs", ("created_at", "status", "tenant_id")),
        ("batch_lines", ()),
        ("batches", ("created_at", "status", "tenant_id")),
        ("file_contents", ()),
        ("files", ("created_at", "tenant_id")),
    ):
        if columns:
            with op.batch_alter_table(table) as batch_op:
                for column in columns:
                    batch_op.drop_index(batch_op.f(f"ix_{table}_{column}"))
        op.drop_table(table)
