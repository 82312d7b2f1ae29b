"""Command groups registered on `bearpaw` besides tenants/keys/db."""

from __future__ import annotations

import typer


def groups() -> list[tuple[str, typer.Typer]]:
    from gateway.cli.backends import backends_app
    from gateway.cli.batch import batch_app
    from gateway.cli.cache import cache_app
    from gateway.cli.pricing import pricing_app
    from gateway.cli.report import report_app

    found: list[tuple[str, typer.Typer]] = [("report", report_app), ("pricing", pricing_app)]
    found.append(("batch", batch_app))
    found.append(("backends", backends_app))
    found.append(("cache", cache_app))
    return found
