"""Bearer-key authentication as FastAPI dependencies."""

from __future__ import annotations

import hmac
import time
from typing import Annotated, Any

from fastapi import Depends, Request

from gateway.caller import Caller
from gateway.errors import APIError
from gateway.resilience.dependencies import DATABASE_ERRORS, unavailable
from gateway.tenants import authenticate, hash_key


class KeyCache:
    """Memory of key lookups (the key's tenant settings included), so the hot
    path does not hit the database per request and keeps serving while the
    database is down.

    A lookup is trusted for `ttl` seconds: revocations and settings changes made
    through another process reach this one within that bound. Past it the key
    is looked up again; if the database cannot answer, the last answer stands
    for up to `stale` seconds (stale-if-error)."""

    def __init__(self, ttl: float = 2.0, stale: float = 86400.0) -> None:
        self.ttl = ttl
        self.stale = stale
        self._entries: dict[str, tuple[float, Caller | None]] = {}

    def get(self, digest: str) -> tuple[bool, Caller | None]:
        """(fresh, caller): a fresh answer, or (False, None) to look it up."""
        item = self._entries.get(digest)
        if item is None or item[0] + self.ttl < time.monotonic():
            return False, None
        return True, item[1]

    def stale_get(self, digest: str) -> tuple[bool, Caller | None]:
        """(known, caller) from a lookup up to `stale` seconds old."""
        item = self._entries.get(digest)
        if item is None or item[0] + self.stale < time.monotonic():
            return False, None
        return True, item[1]

    def put(self, digest: str, caller: Caller | None) -> None:
        if len(self._entries) > 100_000:
            self._entries.clear()
        self._entries[digest] = (time.monotonic(), caller)

    def clear(self) -> None:
        self._entries.clear()


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="missing_api_key",
        )
    return token.strip()


async def require_caller(request: Request) -> Caller:
    return await caller_for_secret(request, _bearer(request))


async def caller_for_secret(request: Request, secret: str) -> Caller:
    """The caller a key belongs to (cached), or 401 in OpenAI's shape."""
    state = request.app.state.bearpaw
    digest = hash_key(secret)
    found, caller = state.key_cache.get(digest)
    if not found:
        caller = await _look_up(state, secret, digest)
    if caller is None:
        raise APIError(
            401,
            f"Incorrect API key provided: {secret[:6]}****. "
            "Create a key with `bearpaw keys create`.",
            code="invalid_api_key",
        )
    return caller


async def _look_up(state: Any, secret: str, digest: str) -> Caller | None:
    deps = state.extras.get("dependencies")
    if deps is not None and deps.is_down("database"):
        # Known down: answer from memory without a connect attempt per request.
        return _stale_or_unavailable(state, digest, None)
    try:
        pair = await state.run_sync(authenticate, state.engine, secret)
    except DATABASE_ERRORS as exc:
        if deps is not None:
            deps.failed("database", exc)
        return _stale_or_unavailable(state, digest, exc)
    caller = Caller.of(*pair) if pair else None
    state.key_cache.put(digest, caller)
    return caller


def _stale_or_unavailable(state: Any, digest: str, exc: Exception | None) -> Caller | None:
    known, caller = state.key_cache.stale_get(digest)
    if known:
        return caller
    # A key this process has not seen cannot be checked without the database.
    raise unavailable(
        "database", state.settings.resilience.retry_after_s, "cannot verify a new API key"
    ) from exc


async def require_admin(request: Request) -> None:
    secret = _bearer(request)
    admin = request.app.state.bearpaw.settings.admin_key
    if not admin:
        raise APIError(
            403, "The admin API is disabled: set BEARPAW_ADMIN_KEY.", code="admin_disabled"
        )
    if not hmac.compare_digest(secret.encode(), admin.encode()):
        raise APIError(401, "Incorrect admin key provided.", code="invalid_api_key")


CallerDep = Annotated[Caller, Depends(require_caller)]
AdminDep = Depends(require_admin)
