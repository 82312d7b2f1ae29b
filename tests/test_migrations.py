"""Alembic migrations build exactly the schema the models describe, on SQLite and
PostgreSQL, and the gateway's tenant/key/usage code runs on both."""

from __future__ import annotations

import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text
from sqlmodel import SQLModel

import gateway.db.all_tables  # noqa: F401
from gateway import tenants
from gateway.db import UsageRecord, get_engine, migrate
from gateway.usage_writer import insert_ignoring_duplicates, record_row

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'bearpaw.db'}"
        return
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{PG}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def test_migrations_match_models(database_url):
    migrate(database_url)
    migrate(database_url)  # idempotent
    engine = create_engine(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        version = conn.execute(text("select version_num from alembic_version")).scalar()
    engine.dispose()
    assert diff == []
    assert version is not None


def test_tenants_keys_and_usage_on_both_databases(database_url):
    migrate(database_url)
    engine = get_engine(database_url)
    t = tenants.create_tenant(engine, "acme", tier="interactive", rpm_limit=5)
    with pytest.raises(tenants.TenantError):
        tenants.create_tenant(engine, "acme")
    issued = tenants.create_key(engine, "acme", "ci")
    key, tenant = tenants.authenticate(engine, issued.secret)
    assert tenant.id == t.id and key.prefix == issued.secret[:10]
    # Only the hash is stored.
    with engine.connect() as conn:
        stored = conn.execute(text("select key_hash from api_keys")).scalar()
    assert issued.secret not in stored
    tenants.revoke_key(engine, key.id)
    assert tenants.authenticate(engine, issued.secret) is None
    # A usage record written twice (a replayed request) is counted once.
    rec = UsageRecord(request_id="req_1", tenant_id=t.id, model="tiny", prompt_tokens=3)
    insert_ignoring_duplicates(engine, [record_row(rec), record_row(rec)])
    insert_ignoring_duplicates(engine, [record_row(rec)])
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from usage_records")).scalar() == 1
    engine.dispose()
