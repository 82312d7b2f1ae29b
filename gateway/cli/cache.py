"""`bearpaw cache ...`: evaluate operating points, simulate the wrong-hit bound,
purge a tenant's entries."""

from __future__ import annotations

from pathlib import Path

import typer

from cache import simulate as sim
from cache import store
from cache.bound import parse_max_error
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


@cache_app.command("simulate")
def simulate(
    path: Path = typer.Argument(..., help='JSONL of labeled pairs {"a","b","same"}'),
    max_error: str = typer.Option(
        "0.02", help="δ: the largest share of wrong semantic hits (or strict|balanced|aggressive)"
    ),
    start: int = typer.Option(0, help="first pair to replay (0-based line number)"),
    limit: int | None = typer.Option(None, help="replay at most this many pairs"),
    seed: int | None = typer.Option(
        None, help="shuffle the replay with this seed (default: file order)"
    ),
    seeds: int = typer.Option(
        1, help="replay in file order and SEEDS-1 shuffles (seeds 1..); print each and the worst"
    ),
    every: int = typer.Option(500, help="print a row every this many lookups"),
    method: str = typer.Option(
        "pooled", help="pooled (the gateway's bound) or stratified (no monotonicity, see docs)"
    ),
    split: str = typer.Option(
        "all", help="all, heldout (every 5th line: unseen by the shipped verifier) or train"
    ),
) -> None:
    """Replay labeled pairs as lookups through the online wrong-hit bound, beside
    the best fixed thresholds chosen in hindsight."""
    if not path.exists():
        fail(f"no such file: {path}")
    try:
        delta = parse_max_error(max_error)
    except ValueError as exc:
        fail(f"--max-error: {exc}")
    if method not in ("stratified", "pooled"):
        fail("--method must be pooled or stratified")
    if split not in ("all", "heldout", "train"):
        fail("--split must be all, heldout or train")
    if start < 0 or (limit is not None and limit <= 0) or every <= 0 or seeds <= 0:
        fail("--start must be >= 0, --limit, --every and --seeds > 0")
    try:
        stream = sim.load_stream(
            str(path), get_settings().cache, start=start, limit=limit, split=split
        )
    except (ValueError, KeyError) as exc:
        fail(f"{path}: {exc}")
    if len(stream.same) == 0:
        fail(f"{path}: no pairs from line {start}")
    print(
        sim.format_report(sim.simulate(stream, delta, seed=seed, every=every, method=method), seed)
    )
    if seeds > 1:
        # The file order (or --seed) above, then shuffles 1 .. seeds-1.
        runs = [(seed, sim.simulate(stream, delta, seed=seed, every=every, method=method))]
        runs += [
            (s, sim.simulate(stream, delta, seed=s, every=every, method=method))
            for s in range(1, seeds)
            if s != seed
        ]
        print(f"\nover {len(runs)} replay orders:")
        print(sim.format_summary(runs))


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
