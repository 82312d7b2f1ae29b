"""Helpers shared by the CLI's command groups."""

from __future__ import annotations

import typer
from rich.console import Console
from sqlalchemy.engine import Engine

from gateway.db import get_engine, migrate
from gateway.settings import get_settings

console = Console()
err_console = Console(stderr=True)


def engine() -> Engine:
    settings = get_settings()
    settings.ensure_dirs()
    migrate(settings.db_url)
    return get_engine(settings.db_url)


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)
