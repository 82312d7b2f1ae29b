"""cache wrong-hit bound: tenants.cache_max_error and the shared verdict counts
(table defined in cache/calibration.py)

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.add_column(sa.Column("cache_max_error", sa.Float(), nullable=True))
    op.create_table(
        "cache_calibration",
        sa.Column("tenant", AutoString(length=255), nullable=False),
        sa.Column("model", AutoString(length=255), nullable=False),
        sa.Column("scorer", AutoString(length=128), nullable=False),
        sa.Column("bin_floor", sa.Integer(), nullable=False),
        sa.Column("lookups", sa.Integer(), nullable=False),
        sa.Column("verdicts", sa.Integer(), nullable=False),
        sa.Column("wrong", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "model", "scorer", "bin_floor"),
    )


def downgrade() -> None:
    op.drop_table("cache_calibration")
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.drop_column("cache_max_error")
