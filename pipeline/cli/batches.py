"""``batches list|show|cancel|download``: the Batch API of a running ``serve``, over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.cli.common import _fail, console, out

app = typer.Typer()
batches_app = typer.Typer(help="OpenAI Batch API batches on a running server: list, show, cancel, download.",
                          no_args_is_help=True)
app.add_typer(batches_app, name="batches")

Url = Annotated[str, typer.Option(help="The server's base URL.", envvar="GPT2_PIPELINE_URL")]
Key = Annotated[Optional[str], typer.Option(envvar="GPT2_PIPELINE_API_KEY", show_envvar=True, help="API key, if the server wants one.")]
BatchId = Annotated[str, typer.Argument(help="The batch id (batch_...).")]


def _call(method: str, url: str, path: str, key: Optional[str], **kwargs: Any) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.request(method, f"{url.rstrip('/')}/v1{path}", headers=headers, timeout=60, **kwargs)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {url}: {exc}")
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:300]
        _fail(f"{r.status_code}: {message}")
    return r


@batches_app.command("list")
def list_batches(url: Url = "http://127.0.0.1:8000", api_key: Key = None,
                 limit: Annotated[int, typer.Option(help="Most batches to show (newest first).")] = 20) -> None:
    """The server's batches, newest first."""
    from rich.table import Table

    data = _call("GET", url, "/batches", api_key, params={"limit": limit}).json()["data"]
    table = Table("id", "status", "endpoint", "done", "failed", "total", "created")
    for b in data:
        counts = b["request_counts"]
        table.add_row(b["id"], b["status"], b["endpoint"], str(counts["completed"]), str(counts["failed"]),
                      str(counts["total"]), _when(b["created_at"]))
    from rich.console import Console

    (out if out.is_terminal else Console(width=160)).print(table)  # whole rows in a pipe too


@batches_app.command()
def show(batch_id: BatchId, url: Url = "http://127.0.0.1:8000", api_key: Key = None) -> None:
    """One batch as JSON (OpenAI's Batch object)."""
    out.print_json(json.dumps(_call("GET", url, f"/batches/{batch_id}", api_key).json()))


@batches_app.command()
def cancel(batch_id: BatchId, url: Url = "http://127.0.0.1:8000", api_key: Key = None) -> None:
    """Stop a batch: running requests finish, the rest go to its error file as batch_cancelled."""
    batch = _call("POST", url, f"/batches/{batch_id}/cancel", api_key).json()
    out.print(f"{batch['id']}: {batch['status']}", highlight=False)


@batches_app.command()
def download(batch_id: BatchId, url: Url = "http://127.0.0.1:8000", api_key: Key = None,
             output: Annotated[Path, typer.Option("--output", "-o", help="Folder for <batch>_output.jsonl and <batch>_error.jsonl.")] = Path(".")) -> None:
    """Save a finished batch's output and error files (OpenAI's line format, input order)."""
    import httpx

    batch = _call("GET", url, f"/batches/{batch_id}", api_key).json()
    files = {role: batch[f"{role}_file_id"] for role in ("output", "error") if batch.get(f"{role}_file_id")}
    if not files:
        _fail(f"batch {batch_id} is {batch['status']} and has no result files yet")
    output.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for role, file_id in files.items():
        target = output / f"{batch['id']}_{role}.jsonl"
        with httpx.stream("GET", f"{url.rstrip('/')}/v1/files/{file_id}/content", headers=headers, timeout=60) as r:
            if r.status_code >= 400:
                _fail(f"{r.status_code} downloading {file_id}")
            with target.open("wb") as fh:
                for chunk in r.iter_bytes():
                    fh.write(chunk)
        console.print(f"{role}: {target}", highlight=False)


def _when(ts: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
