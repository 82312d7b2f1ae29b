"""`bearpaw batch`: submit a JSONL batch to a running gateway and follow it.

An HTTP client of the gateway like any other (base URL and key from options
or BEARPAW_URL / BEARPAW_API_KEY), so it works against a remote gateway too.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gateway.cli.common import console, fail

batch_app = typer.Typer(help="OpenAI Batch API jobs on a running gateway.", no_args_is_help=True)

FINAL = ("completed", "failed", "expired", "cancelled")
UrlOpt = typer.Option("http://127.0.0.1:8080", "--url", envvar="BEARPAW_URL", help="gateway URL")
KeyOpt = typer.Option(..., "--api-key", envvar="BEARPAW_API_KEY", help="a Bearpaw API key")


def _client(url: str, key: str) -> httpx.Client:
    base = url.rstrip("/").removesuffix("/v1")
    return httpx.Client(
        base_url=f"{base}/v1", headers={"authorization": f"Bearer {key}"}, timeout=300
    )


def _check(resp: httpx.Response) -> dict:
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except Exception:
            message = resp.text
        fail(f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {message}")
    return resp.json()


@batch_app.command("submit")
def submit(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL input file"),
    endpoint: str = typer.Option("/v1/chat/completions", help="the batch's endpoint"),
    wait: bool = typer.Option(False, "--wait", help="follow the batch until it ends"),
    output: Path | None = typer.Option(None, "-o", "--output", help="write the output here"),
    errors: Path | None = typer.Option(None, "--errors", help="write the error file here"),
    url: str = UrlOpt,
    api_key: str = KeyOpt,
) -> None:
    """Upload FILE, create a batch, and (with --wait) show its progress."""
    with _client(url, api_key) as client:
        with file.open("rb") as fh:
            uploaded = _check(
                client.post("/files", files={"file": (file.name, fh)}, data={"purpose": "batch"})
            )
        batch = _check(
            client.post(
                "/batches",
                json={
                    "input_file_id": uploaded["id"],
                    "endpoint": endpoint,
                    "completion_window": "24h",
                },
            )
        )
        console.print(f"batch [bold]{batch['id']}[/bold] ({uploaded['id']}): {batch['status']}")
        if not wait:
            return
        batch = _follow(client, batch)
        _report(client, batch, output, errors)


def _follow(client: httpx.Client, batch: dict) -> dict:
    columns = (
        TextColumn("[bold]{task.fields[status]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("batch", total=None, status=batch["status"], failed=0)
        while batch["status"] not in FINAL:
            time.sleep(1.0)
            batch = _check(client.get(f"/batches/{batch['id']}"))
            counts = batch.get("request_counts") or {}
            progress.update(
                task,
                total=counts.get("total") or None,
                completed=counts.get("completed", 0) + counts.get("failed", 0),
                status=batch["status"],
                failed=counts.get("failed", 0),
            )
    return batch


def _report(client: httpx.Client, batch: dict, output: Path | None, errors: Path | None) -> None:
    counts = batch.get("request_counts") or {}
    console.print(
        f"{batch['status']}: {counts.get('completed', 0)} completed, "
        f"{counts.get('failed', 0)} failed of {counts.get('total', 0)}"
    )
    for item in (batch.get("errors") or {}).get("data") or []:
        console.print(f"  line {item.get('line')}: {item.get('code')}: {item.get('message')}")
    for file_id, target in (
        (batch.get("output_file_id"), output),
        (batch.get("error_file_id"), errors),
    ):
        if file_id and target:
            resp = client.get(f"/files/{file_id}/content")
            _check_ok(resp)
            target.write_bytes(resp.content)
            console.print(f"wrote {target}")
    if batch["status"] != "completed":
        raise typer.Exit(1)


def _check_ok(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        fail(f"download failed: {resp.status_code}")


@batch_app.command("status")
def status(batch_id: str, url: str = UrlOpt, api_key: str = KeyOpt) -> None:
    """Show a batch."""
    with _client(url, api_key) as client:
        console.print_json(data=_check(client.get(f"/batches/{batch_id}")))


@batch_app.command("cancel")
def cancel(batch_id: str, url: str = UrlOpt, api_key: str = KeyOpt) -> None:
    """Cancel a batch (lines in flight finish; the rest are not run)."""
    with _client(url, api_key) as client:
        batch = _check(client.post(f"/batches/{batch_id}/cancel"))
        console.print(f"batch {batch_id}: {batch['status']}")
