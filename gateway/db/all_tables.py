"""Imports every module that defines a table, for Alembic and create_all."""

import cache.calibration  # noqa: F401  (the cache's verdict counts; migration 0005)
import cache.store  # noqa: F401  (the semantic cache's table; migration 0002)
import gateway.db.batches  # noqa: F401
import gateway.db.files  # noqa: F401
import gateway.db.jobs  # noqa: F401
import gateway.db.tenants  # noqa: F401
import gateway.db.usage  # noqa: F401
import gateway.dialects.responses.store  # noqa: F401  (Responses state; migration 0004)
