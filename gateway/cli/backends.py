"""`bearpaw backends ...`: launch and supervise vLLM replicas, inspect the pool config."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal

import typer
from rich.table import Table

from backends.launch import LaunchProfile, Supervisor, build_command, check_gpu_shares
from gateway.cli.common import console, fail
from gateway.settings import get_settings

backends_app = typer.Typer(help="Inference backends: launch profiles and replicas.")


def _profiles(names: list[str]) -> list[LaunchProfile]:
    profiles = get_settings().launch
    if not profiles:
        fail("no launch profiles: add a `launch:` list to the file named by BEARPAW_CONFIG")
    if names:
        unknown = set(names) - {p.name for p in profiles}
        if unknown:
            fail(f"unknown profile(s): {', '.join(sorted(unknown))}")
        profiles = [p for p in profiles if p.name in names]
    try:
        check_gpu_shares(profiles)
    except ValueError as exc:
        fail(str(exc))
    return profiles


@backends_app.command("launch")
def launch(
    profile: list[str] = typer.Option([], "--profile", "-p", help="only these profiles"),
    dry_run: bool = typer.Option(False, help="print the commands, start nothing"),
) -> None:
    """Start the vLLM servers of the launch profiles and restart any that crashes."""
    profiles = _profiles(profile)
    for p in profiles:
        console.print(f"[bold]{p.name}[/bold] → {p.base_url}", highlight=False)
        console.print("  " + shlex.join(build_command(p)), highlight=False, soft_wrap=True)
    if dry_run:
        return
    asyncio.run(_supervise(profiles))


async def _supervise(profiles: list[LaunchProfile]) -> None:
    supervisor = Supervisor(profiles)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await supervisor.start()
    waiter = asyncio.create_task(supervisor.wait())
    await stop.wait()
    await supervisor.stop()
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter


@backends_app.command("list")
def list_backends() -> None:
    """Configured models, their replicas and launch profiles."""
    settings = get_settings()
    table = Table("model", "aliases", "replicas", "hosted")
    for m in settings.backends.models:
        table.add_row(
            m.name,
            ", ".join(m.aliases),
            "\n".join(r.url for r in m.replicas),
            m.hosted or "-",
        )
    console.print(table)
    if settings.backends.discover:
        console.print("discovered from: " + ", ".join(settings.backends.discover))
    if settings.launch:
        profiles = Table("profile", "model", "url", "quantization", "gpu share", "max seqs")
        for p in settings.launch:
            profiles.add_row(
                p.name,
                p.model,
                p.base_url,
                p.quantization or "-",
                f"{p.gpu_memory_utilization:g}" if p.gpu_memory_utilization else "0.9",
                str(p.max_num_seqs or "-"),
            )
        console.print(profiles)
