"""Bearer-key authentication as FastAPI dependencies."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import Depends, Request

from gateway.caller import Caller
from gateway.errors import APIError
from gateway.tenants import authenticate, hash_key


class KeyCache:
    """Short-lived memory of key lookups, so the hot path does not hit the
    database per request. Revocation through this process is immediate; through
    another process it takes at most `ttl` seconds."""

    def __init__(self, ttl: float = 2.0) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Caller | None]] = {}

    def get(self, digest: str) -> tuple[bool, Caller | None]:
        item = self._entries.get(digest)
        if item is None or item[0] < time.monotonic():
            return False, None
        return True, item[1]

    def put(self, digest: str, caller: Caller | None) -> None:
        if len(self._entries) > 100_000:
            self._entries.clear()
        self._entries[digest] = (time.monotonic() + self.ttl, caller)

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
        pair = await state.run_sync(authenticate, state.engine, secret)
        caller = Caller.of(*pair) if pair else None
        state.key_cache.put(digest, caller)
    if caller is None:
        raise APIError(
            401,
            f"Incorrect API key provided: {secret[:6]}****. "
            "Create a key with `bearpaw keys create`.",
            code="invalid_api_key",
        )
    return caller


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
