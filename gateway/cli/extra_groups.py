"""Command groups registered on `bearpaw` besides tenants/keys/db."""

from __future__ import annotations

import typer


def groups() -> list[tuple[str, typer.Typer]]:
    found: list[tuple[str, typer.Typer]] = []
    return found
