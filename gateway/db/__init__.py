"""Database tables and engine. Importing this package registers every table."""

from gateway.db.engine import get_engine, migrate, session_scope
from gateway.db.tenants import ApiKey, Tenant
from gateway.db.usage import UsageRecord

__all__ = ["ApiKey", "Tenant", "UsageRecord", "get_engine", "migrate", "session_scope"]
