"""Top-level `bearpaw` commands."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import typer

from gateway.cli.common import console, engine, err_console
from gateway.cli.supervisor import Supervisor, reuseport_supported
from gateway.cli.tenants import keys_app, tenants_app
from gateway.settings import Settings, get_settings

app = typer.Typer(
    help="Bearpaw: an OpenAI-compatible LLM gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations up to the latest revision."""
    engine()
    console.print(f"database at latest revision: {get_settings().db_url}")


def worker_env(settings: Settings, host: str, port: int) -> dict[str, str]:
    """The embedded worker's environment: its SLO loop reads this gateway's
    interactive streams unless a gateway URL is configured."""
    env = dict(os.environ)
    if not settings.workers.gateway_url:
        reach = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        if ":" in reach and not reach.startswith("["):
            reach = f"[{reach}]"
        env["BEARPAW_WORKERS__GATEWAY_URL"] = f"http://{reach}:{port}"
    return env


def worker_command(concurrency: int) -> list[str]:
    # Started by module path, so the gateway does not import the workers package.
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "--loglevel",
        "INFO",
        "--concurrency",
        str(concurrency),
    ]


@app.command()
def serve(
    host: str | None = typer.Option(None, help="bind address (BEARPAW_HOST)"),
    port: int | None = typer.Option(None, help="port (BEARPAW_PORT)"),
    worker: bool | None = typer.Option(
        None, "--worker/--no-worker", help="start a Celery worker beside the gateway"
    ),
    processes: int = typer.Option(1, help="gateway processes (uvicorn workers)"),
) -> None:
    """Run the gateway (and, by default, a worker process beside it)."""
    import uvicorn

    settings = get_settings()
    engine()  # migrate before any process starts
    if processes > 1 and not settings.limits.redis_url:
        # Each worker would count on its own: a tenant could get N times its
        # limits, and spend one worker has billed reaches the others only when
        # their cached sum expires (limits.budget_refresh_s).
        err_console.print(
            f"[yellow]warning:[/yellow] --processes {processes} without limits.redis_url: "
            "rate limits and budget spend are counted per process "
            "(set limits.redis_url to share them)"
        )
    # uvicorn re-raises the SIGTERM it drained on; with the default action that
    # would kill this process before the `finally` below stops the worker.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    child = None
    if worker if worker is not None else settings.workers.embedded:
        # Its own session: a Ctrl-C or a group-wide SIGTERM must not reach Celery's
        # pool children before its master (a master whose children die under it
        # hangs in warm shutdown); this process stops the worker as a whole.
        child = subprocess.Popen(
            worker_command(settings.workers.concurrency),
            start_new_session=True,
            env=worker_env(settings, host or settings.host, port or settings.port),
        )
    options = {
        "loop": "uvloop",
        "http": "httptools",
        "log_level": "warning",
        "timeout_graceful_shutdown": 30,
    }
    address = host or settings.host
    try:
        if processes > 1 and reuseport_supported():
            # One socket per worker (gateway/cli/supervisor.py says why).
            status = Supervisor(address, port or settings.port, processes, options).run()
            if status:
                raise typer.Exit(status)
        else:
            uvicorn.run(
                "gateway.main:app",
                host=address,
                port=port or settings.port,
                workers=processes,
                **options,  # type: ignore[arg-type]
            )
    finally:
        if child is not None:
            stop_worker(child)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def stop_worker(child: subprocess.Popen, grace: float = 30.0) -> None:
    """Warm shutdown (running tasks finish), then SIGKILL to the worker's group.

    Killed tasks are not lost: tasks are acknowledged late and idempotent, so the
    broker redelivers them to the next worker.
    """
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=grace)
        return
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    # The master is alive and not reaped, so its group id is still the worker's:
    # master and pool children go together.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


@app.command()
def worker(concurrency: int | None = typer.Option(None)) -> None:
    """Run a Celery worker for async jobs and batches."""
    settings = get_settings()
    engine()
    cmd = worker_command(concurrency or settings.workers.concurrency)
    os.execv(cmd[0], cmd)


def _register_optional_groups() -> None:
    # Command groups of other concerns live in their own modules.
    from gateway.cli import extra_groups

    for name, group in extra_groups.groups():
        app.add_typer(group, name=name)


_register_optional_groups()


if __name__ == "__main__":
    app()
