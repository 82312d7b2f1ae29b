"""Alembic environment: migrations run against the URL the gateway configured."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlmodel import SQLModel

import gateway.db  # noqa: F401  (registers the gateway's tables)
import gateway.db.all_tables  # noqa: F401  (registers tables of every package)

target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    cfg = context.config
    connectable = engine_from_config(
        cfg.get_section(cfg.config_ini_section) or {},
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
        url=cfg.get_main_option("sqlalchemy.url"),
    )
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
