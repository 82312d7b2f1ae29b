"""Imports every module that defines a table, for Alembic and create_all."""

import gateway.db.batches  # noqa: F401
import gateway.db.files  # noqa: F401
import gateway.db.jobs  # noqa: F401
import gateway.db.tenants  # noqa: F401
import gateway.db.usage  # noqa: F401
