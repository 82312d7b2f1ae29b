"""`bearpaw cache ...`: evaluate operating points, purge a tenant's entries."""

from __future__ import annotations

from pathlib import Path

import typer

from cache import store
from cache.eval import evaluate, format_report
from gateway import tenants as svc
from gateway.cli.common import console, engine, fail
from gateway.settings import get_settings

cache_app = typer.Typer(help="The semantic cache.", no_args_is_help=True)


@cache_app.command("eval")
def eval_pairs(
    path: Path = typer.Argument(..., help='JSONL of labeled pairs {"a","b","same"}'),
    split: str = typer.Option(
        "heldout", help="heldout (never seen by the verifier's training), train or all"
    ),
) -> None:
    """Precision/recall/F1 per operating point on labeled pairs, and a recommendation."""
    if not path.exists():
        fail(f"no such file: {path}")
    if split not in ("heldout", "train", "all"):
        fail("--split must be heldout, train or all")
    try:
        report = evaluate(str(path), get_settings().cache, split=split)
    except (ValueError, KeyError) as exc:
        fail(f"{path}: {exc}")
    print(format_report(report))


@cache_app.command("purge")
def purge(tenant: str) -> None:
    """Delete a tenant's cache entries. Running gateways drop them from memory at
    their next sweep (cache.sweep_interval_s); POST /admin/tenants/{t}/cache/purge
    purges a gateway's memory at once."""
    db = engine()
    try:
        t = svc.get_tenant(db, tenant)
    except svc.TenantError as exc:
        fail(str(exc))
    store.create_table(db)
    removed = store.delete_tenant(db, t.id)
    console.print(f"purged {removed} cache entries of tenant {t.name} ({t.id})")
