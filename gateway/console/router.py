"""The console's routes under /admin, and its two exception handlers."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from gateway.console import (
    auth_routes,
    batches_routes,
    cache_routes,
    fleet_routes,
    requests_routes,
    session,
    spend_routes,
    tenants_routes,
)
from gateway.console.render import page

router = APIRouter(tags=["console"], include_in_schema=False)
for part in (
    auth_routes,
    tenants_routes,
    spend_routes,
    requests_routes,
    cache_routes,
    batches_routes,
    fleet_routes,
):
    # The prefix goes on each part: the overview's path is the bare prefix.
    router.include_router(part.router, prefix="/admin")


async def _sign_in_first(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, session.SignInRequired)
    return RedirectResponse("/admin/login?" + urlencode({"next": exc.next_url}), status_code=303)


async def _csrf_rejected(request: Request, exc: Exception) -> Response:
    return page(
        request,
        "message.html",
        "",
        403,
        title="Forbidden",
        message="This form was not accepted: its security token is missing or stale "
        "(or you are signed out). Reload the page and try again.",
        back="/admin",
    )


def install(app: FastAPI) -> None:
    """Mounts the console on the gateway app."""
    app.include_router(router)
    app.add_exception_handler(session.SignInRequired, _sign_in_first)
    app.add_exception_handler(session.CsrfRejected, _csrf_rejected)
