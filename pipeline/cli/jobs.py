"""Cluster commands: ``submit`` (a spec as a Ray job) and ``jobs list|status|logs|stop``.

The address is ``--address``, else RAY_ADDRESS; without either, ``submit`` runs the spec right
here, exactly like ``run --spec``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import Verbose, _fail, _load, console, out, run_job_cli
from pipeline.cli.jobflags import JOB_FLAGS, job_command, job_overrides, run_args
from pipeline.config import ConfigError

app = typer.Typer()
jobs_app = typer.Typer(help="Ray jobs on a cluster: list, status, logs, stop.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

# Every flag of `run`; --address is submit's own (the dashboard that takes the job).
SUBMIT_FLAGS = tuple(n for n in JOB_FLAGS if n != "address")
JobsAddress = Annotated[Optional[str], typer.Option(
    "--address", help="Ray dashboard / Jobs API URL, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS).")]
JobId = Annotated[str, typer.Argument(help="Submission id (from `submit` or `jobs list`).")]


@app.command()
@job_command(SUBMIT_FLAGS)
def submit(
    spec: Annotated[Path, typer.Argument(help="YAML job spec inside the project folder (e.g. jobs/bulk.yaml).")],
    address: Annotated[Optional[str], typer.Option(
        help="Ray dashboard URL, e.g. http://HEAD:8265 (default: RAY_ADDRESS; neither: run here, like `run`).")] = None,
    *,
    flags: dict,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream the job's logs until it ends; exit 0 only if it succeeded.")] = False,
    submission_id: Annotated[Optional[str], typer.Option(help="Job id to use (default: <spec>-<time>-<random>).")] = None,
    working_dir: Annotated[Optional[Path], typer.Option(help="Folder shipped to the cluster (default: the project folder holding the spec).")] = None,
    verbose: Verbose = False,
) -> None:
    """Submit a job spec to a Ray cluster (Ray Jobs API); flags override the spec, as with `run`
    (every `run` flag; --address is the cluster's dashboard here)."""
    from pipeline import submit as sub

    overrides = job_overrides(flags)
    resolved = sub.resolve_address(address)
    if resolved is None:
        _run_here(spec, overrides, verbose)
        return
    if not spec.is_file():
        _fail(f"spec file {str(spec)!r} does not exist")
    if not verbose:
        sub.quiet_ray_logs()
    try:
        s = sub.submit(spec, resolved, overrides, run_args(flags), working_dir=working_dir,
                       submission_id=submission_id, verbose=verbose)
    except (ConfigError, sub.SubmitError) as exc:
        _fail(str(exc))
    for w in s.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    out.print(s.submission_id, highlight=False)
    console.print(f"submitted to {resolved}: {s.entrypoint}", highlight=False, soft_wrap=True)
    if not follow:
        console.print(f"follow: gpt2-pipeline jobs logs {s.submission_id} --follow --address {resolved}",
                      highlight=False, soft_wrap=True)
        return
    status = sub.follow(s.client, s.submission_id, _write)
    _print_status_line(s.submission_id, status)
    if status != "SUCCEEDED":
        raise typer.Exit(1)


def _run_here(spec: Path, overrides: dict, verbose: bool) -> None:
    """No cluster address: the same code path as `run --spec SPEC` (flags over the spec)."""
    from pipeline.config import JobConfig

    job: JobConfig = _load(JobConfig, spec, overrides)
    console.print("no --address or RAY_ADDRESS: running here, as `gpt2-pipeline run --spec` would", highlight=False)
    run_job_cli(job, verbose)


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def _print_status_line(job_id: str, status: str) -> None:
    colour = "green" if status == "SUCCEEDED" else "red" if status in ("FAILED", "STOPPED") else "yellow"
    console.print(f"job {job_id}: [bold {colour}]{status}[/]", highlight=False)


def _client(address: Optional[str]):
    from pipeline import submit as sub

    resolved = sub.resolve_address(address)
    if resolved is None:
        _fail("no Ray cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    sub.quiet_ray_logs()
    try:
        return sub, sub.connect(resolved), resolved
    except sub.SubmitError as exc:
        _fail(str(exc))


def _details(sub, client, job_id: str, address: str):
    try:
        return sub.info(client, job_id, address)
    except sub.SubmitError as exc:
        _fail(str(exc))


def _time(ms: Optional[int], fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    import time

    return time.strftime(fmt, time.localtime(ms / 1000)) if ms else "-"


@jobs_app.command("list")
def list_(address: JobsAddress = None) -> None:
    """All jobs on the cluster (oldest first) with their status, spec and output."""
    from rich.table import Table

    sub, client, resolved = _client(address)
    table = Table(title=f"jobs on {resolved}")
    table.add_column("id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("started", no_wrap=True)
    table.add_column("spec", overflow="fold")
    table.add_column("output", overflow="fold")
    for j in sub.list_jobs(client):
        meta = j.metadata or {}
        table.add_row(j.submission_id or j.job_id or "-", sub.status_of(j), _time(j.start_time, "%m-%d %H:%M:%S"),
                      meta.get("spec", (j.entrypoint or "")[:60]), meta.get("output", ""))
    out.print(table)


@jobs_app.command()
def status(job_id: JobId, address: JobsAddress = None) -> None:
    """A job's status, message, times, spec and output."""
    sub, client, resolved = _client(address)
    d = _details(sub, client, job_id, resolved)
    meta = d.metadata or {}
    out.print(f"[bold]{job_id}[/]: {sub.status_of(d)}", highlight=False)
    for key, value in [("message", d.message), ("started", _time(d.start_time)), ("ended", _time(d.end_time)),
                       ("spec", meta.get("spec")), ("output", meta.get("output")), ("entrypoint", d.entrypoint)]:
        if value:
            out.print(f"  {key}: {value}", highlight=False)


@jobs_app.command()
def logs(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")] = False,
    address: JobsAddress = None,
) -> None:
    """Print a job's driver logs (progress, summary, errors); --follow streams them."""
    sub, client, resolved = _client(address)
    _details(sub, client, job_id, resolved)
    if not follow:
        _write(client.get_job_logs(job_id))
        return
    _print_status_line(job_id, sub.follow(client, job_id, _write))


@jobs_app.command()
def stop(
    job_id: JobId,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the job has stopped.")] = True,
    address: JobsAddress = None,
) -> None:
    """Stop a running job; committed output shards stay (rerun the spec with --resume to finish)."""
    sub, client, resolved = _client(address)
    d = _details(sub, client, job_id, resolved)
    if not client.stop_job(job_id):  # SIGINT to the driver (see submit.runtime_env), then SIGKILL
        out.print(f"job {job_id} is not running ({sub.status_of(d)})", highlight=False)
        return
    out.print(f"stopping job {job_id}", highlight=False)
    if wait:
        _print_status_line(job_id, sub.wait(client, job_id, timeout=120))
