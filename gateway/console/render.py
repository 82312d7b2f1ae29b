"""Jinja2 rendering for console pages: one environment, a few number filters."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from gateway.console import session

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"

NAV = (
    ("home", "/admin", "Overview"),
    ("tenants", "/admin/console/tenants", "Tenants & keys"),
    ("spend", "/admin/console/spend", "Spend"),
    ("requests", "/admin/console/requests", "Request log"),
    ("cache", "/admin/console/cache", "Cache"),
    ("batches", "/admin/console/batches", "Batches & jobs"),
    ("fleet", "/admin/console/fleet", "Fleet"),
)


def _money(value: float | None) -> str:
    if value is None:
        return "–"
    return f"${value:,.6f}" if abs(value) < 1 else f"${value:,.4f}"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:,}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def when(value: datetime | float | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _host(url: str | None) -> str:
    """A replica URL without its scheme and /v1, to keep log rows narrow."""
    if not url:
        return "–"
    short = url.split("://", 1)[-1]
    return short.removesuffix("/").removesuffix("/v1")


_env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(money=_money, num=_num, pct=_pct, when=when, host=_host)


def page(
    request: Request, template: str, active: str, status_code: int = 200, **ctx: Any
) -> HTMLResponse:
    """A signed-in page: the layout needs the CSRF token for its sign-out form."""
    current = session.current(request)
    token = session.csrf_token(request, current) if current else ""
    html = _env.get_template(template).render(
        nav=NAV,
        active=active,
        csrf=token,
        csrf_field=session.CSRF_FIELD,
        signed_in=current is not None,
        svg=Markup,
        **ctx,
    )
    return HTMLResponse(html, status_code=status_code, headers={"cache-control": "no-store"})
