"""`bearpaw tenants ...` and `bearpaw keys ...`."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from cache.bound import parse_max_error
from gateway import tenants as svc
from gateway.cli.common import console, engine, fail
from gateway.db.ids import unix

tenants_app = typer.Typer(help="Create and inspect tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)


@tenants_app.command("create")
def create_tenant(
    name: str,
    tier: str = typer.Option("standard", help="interactive | standard | batch"),
    rpm: int | None = typer.Option(None, help="requests per minute"),
    tpm: int | None = typer.Option(None, help="tokens per minute"),
    budget: float | None = typer.Option(None, help="monthly budget, USD"),
    soft_budget: bool = typer.Option(False, help="warn instead of refusing over budget"),
    cache: bool = typer.Option(True, help="use the semantic cache"),
    cache_sampling: bool = typer.Option(False, help="cache answers of sampled requests"),
    cache_point: str = typer.Option("balanced", help="strict | balanced | aggressive"),
    cache_max_error: str | None = typer.Option(
        None, help="wrong-hit bound δ for semantic hits, e.g. 0.02, or a preset name"
    ),
) -> None:
    """Create a tenant."""
    try:
        t = svc.create_tenant(
            engine(),
            name,
            tier=tier,
            rpm_limit=rpm,
            tpm_limit=tpm,
            monthly_budget_usd=budget,
            budget_hard=not soft_budget,
            cache_enabled=cache,
            cache_allow_sampling=cache_sampling,
            cache_operating_point=cache_point,
            cache_max_error=_max_error(cache_max_error),
        )
    except svc.TenantError as exc:
        fail(str(exc))
    console.print(f"created tenant [bold]{t.name}[/bold] ({t.id})")


def _max_error(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_max_error(value)
    except ValueError as exc:
        fail(f"--cache-max-error: {exc}")


@tenants_app.command("update")
def update_tenant(
    ref: str,
    tier: str | None = typer.Option(None),
    rpm: int | None = typer.Option(None),
    tpm: int | None = typer.Option(None),
    budget: float | None = typer.Option(None),
    cache_point: str | None = typer.Option(None),
    cache_max_error: str | None = typer.Option(None, help="δ, e.g. 0.02, or a preset name"),
) -> None:
    """Change a tenant's tier, limits, budget or cache operating point."""
    fields = {
        "tier": tier,
        "rpm_limit": rpm,
        "tpm_limit": tpm,
        "monthly_budget_usd": budget,
        "cache_operating_point": cache_point,
        "cache_max_error": _max_error(cache_max_error),
    }
    try:
        t = svc.update_tenant(engine(), ref, **{k: v for k, v in fields.items() if v is not None})
    except svc.TenantError as exc:
        fail(str(exc))
    console.print(f"updated tenant [bold]{t.name}[/bold] ({t.id})")


@tenants_app.command("list")
def list_tenants(as_json: bool = typer.Option(False, "--json")) -> None:
    """List tenants."""
    rows = svc.list_tenants(engine())
    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return
    table = Table("id", "name", "tier", "rpm", "tpm", "budget $", "cache")
    for t in rows:
        table.add_row(
            t.id,
            t.name,
            t.tier,
            str(t.rpm_limit or "-"),
            str(t.tpm_limit or "-"),
            str(t.monthly_budget_usd or "-"),
            t.cache_operating_point if t.cache_enabled else "off",
        )
    console.print(table)


@keys_app.command("create")
def create_key(
    tenant: str,
    name: str = typer.Option("", help="a label for the key"),
    rpm: int | None = typer.Option(None, help="per-key requests per minute"),
    tpm: int | None = typer.Option(None, help="per-key tokens per minute"),
) -> None:
    """Create an API key. The secret is printed once and never stored."""
    try:
        issued = svc.create_key(engine(), tenant, name, rpm, tpm)
    except svc.TenantError as exc:
        fail(str(exc))
    console.print(f"key id: {issued.key.id}", highlight=False)
    console.print("secret (shown once, store it now):", highlight=False)
    print(issued.secret)


@keys_app.command("list")
def list_keys(
    tenant: str | None = typer.Option(None), as_json: bool = typer.Option(False, "--json")
) -> None:
    """List keys (prefixes only; secrets are not stored)."""
    try:
        rows = svc.list_keys(engine(), tenant)
    except svc.TenantError as exc:
        fail(str(exc))
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": k.id,
                        "tenant_id": k.tenant_id,
                        "name": k.name,
                        "prefix": k.prefix,
                        "revoked_at": unix(k.revoked_at),
                    }
                    for k in rows
                ],
                indent=2,
            )
        )
        return
    table = Table("id", "tenant", "name", "prefix", "status")
    for k in rows:
        status = "revoked" if k.revoked_at else "active"
        table.add_row(k.id, k.tenant_id, k.name, k.prefix + "…", status)
    console.print(table)


@keys_app.command("revoke")
def revoke_key(key_id: str) -> None:
    """Revoke a key (gateways stop accepting it within seconds)."""
    try:
        svc.revoke_key(engine(), key_id)
    except svc.TenantError as exc:
        fail(str(exc))
    console.print(f"revoked {key_id}")
