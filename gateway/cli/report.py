"""`bearpaw report`: usage and cost per tenant, model or day, from the usage records."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import typer
from rich.table import Table

from gateway.cli.common import console, engine, fail
from gateway.reports import format_table, parse_group_by, usage_report

report_app = typer.Typer(
    help="Usage and cost reports.", invoke_without_command=True, no_args_is_help=False
)

_RELATIVE = re.compile(r"^(\d+)([dh])$")


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    """`7d`, `12h`, an ISO date or datetime (UTC unless it says otherwise), or
    `month` for the start of the current month."""
    now = now or datetime.now(UTC)
    if value is None:
        return None
    if value == "month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    match = _RELATIVE.match(value)
    if match:
        n, unit = int(match.group(1)), match.group(2)
        return now - (timedelta(days=n) if unit == "d" else timedelta(hours=n))
    ts = datetime.fromisoformat(value)
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


@report_app.callback()
def report(
    group_by: str = typer.Option(
        "tenant",
        "--group-by",
        "-g",
        help="tenant, model, day, key, source, endpoint; comma-separated",
    ),
    format: str = typer.Option("table", "--format", "-f", help="table | json | csv"),
    tenant: str | None = typer.Option(None, help="only this tenant (id or name)"),
    since: str | None = typer.Option(
        "month", help="start: 7d, 12h, an ISO date, or month (the default)"
    ),
    until: str | None = typer.Option(None, help="end (exclusive), same forms as --since"),
) -> None:
    """Tokens, cost, cost avoided by the cache and batch savings."""
    if format not in ("table", "json", "csv"):
        fail("--format must be table, json or csv")
    try:
        groups = parse_group_by(group_by)
        start, end = parse_since(since), parse_since(until)
    except ValueError as exc:
        fail(str(exc))
        return
    result = usage_report(engine(), groups, tenant, start, end)
    if format == "json":
        typer.echo(json.dumps(result.as_dict(), indent=2))
    elif format == "csv":
        typer.echo(result.to_csv(), nl=False)
    else:
        rows = format_table(result)
        title = f"usage since {start:%Y-%m-%d %H:%M} UTC" if start else "usage, all time"
        table = Table(title=title)
        for i, column in enumerate(rows[0]):
            table.add_column(column, justify="left" if i < len(groups) else "right")
        for i, row in enumerate(rows[1:], start=1):
            table.add_row(*row, end_section=i == len(rows) - 2)
        console.print(table)
