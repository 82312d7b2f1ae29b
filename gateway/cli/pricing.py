"""`bearpaw pricing ...`: the price book and calibrating self-hosted prices."""

from __future__ import annotations

import asyncio
import json

import typer
from rich.table import Table

from gateway.calibrate import calibrate
from gateway.cli.common import console, fail
from gateway.pricing import PriceBook
from gateway.settings import get_settings

pricing_app = typer.Typer(help="Prices per model.", no_args_is_help=True)


@pricing_app.command("show")
def show() -> None:
    """The effective price book (USD per 1M tokens), derived prices included."""
    book = PriceBook(get_settings().prices)
    table = Table(title="price book, USD per 1M tokens")
    for column in ("model", "input", "output", "cached input", "batch discount", "derived from"):
        table.add_column(column)
    for name, p in book.table().items():
        source = (
            f"${p.gpu_hourly_usd:g}/h at {p.tokens_per_second:g} tok/s" if p.self_hosted else ""
        )
        table.add_row(
            name,
            f"{p.input:.4f}",
            f"{p.output:.4f}",
            "-" if p.cached_input is None else f"{p.cached_input:.4f}",
            f"{p.batch_discount:.0%}",
            source,
        )
    console.print(table)


@pricing_app.command("calibrate")
def calibrate_cmd(
    model: str = typer.Option(..., "--model", "-m", help="public model name"),
    gpu_hourly_usd: float = typer.Option(2.0, help="what one replica's GPU costs per hour"),
    concurrency: int = typer.Option(8, help="requests in flight per replica"),
    requests: int = typer.Option(32, help="requests per measurement"),
    max_tokens: int = typer.Option(128, help="output tokens per decode request"),
    prefill_words: int = typer.Option(200, help="prompt length of prefill requests"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Measure the live backend's throughput and derive $/1M tokens from the GPU's cost."""
    settings = get_settings()
    try:
        result = asyncio.run(
            calibrate(settings.backends, model, requests, concurrency, max_tokens, prefill_words)
        )
    except (LookupError, RuntimeError) as exc:
        fail(str(exc))
        return
    prices = result.prices(gpu_hourly_usd)
    if as_json:
        payload = {
            "model": model,
            "replicas": result.replicas,
            "concurrency": concurrency,
            "tokens_per_second": result.tokens_per_second,
            "prompt_tokens_per_second": result.prompt_tokens_per_second,
            "gpu_hourly_usd": gpu_hourly_usd,
            "output_usd_per_1m": prices["output"],
            "input_usd_per_1m": prices["input"],
            "failures": result.decode.failures + result.prefill.failures,
            "yaml": result.yaml_snippet(gpu_hourly_usd),
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    d, p = result.decode, result.prefill
    console.print(
        f"[bold]{model}[/bold]: {result.replicas} replica(s), {concurrency} in flight each\n"
        f"decode:  {d.requests} requests, {d.completion_tokens} output tokens in "
        f"{d.seconds:.2f}s -> {result.tokens_per_second:.1f} tok/s per replica\n"
        f"prefill: {p.requests} requests, {p.prompt_tokens} prompt tokens in "
        f"{p.seconds:.2f}s -> {result.prompt_tokens_per_second:.1f} tok/s per replica\n"
        f"at ${gpu_hourly_usd:g}/GPU-hour: output ${prices['output']:.4f} / 1M tokens, "
        f"input ${prices['input']:.4f} / 1M tokens"
    )
    if d.failures or p.failures:
        console.print(f"[yellow]{d.failures + p.failures} request(s) failed[/yellow]")
    console.print("\nPaste into the price book (BEARPAW_CONFIG):\n")
    console.print(result.yaml_snippet(gpu_hourly_usd), markup=False, highlight=False)
