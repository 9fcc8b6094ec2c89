"""What a person sees while a job runs: a Rich progress bar, then a summary table."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pipeline.batch import ALREADY_COMPLETE, Summary, run_job
from pipeline.config import ConfigError, JobConfig, Task

console = Console(stderr=True)


LOG_FILE = "_job.log"


@contextmanager
def logs_to_file(verbose: bool) -> Iterator[Optional[str]]:
    """Send everything written to this process's stdout/stderr (Ray's and vLLM's logs, its
    engine processes included) to a temp file; the console keeps the terminal. Yields the file.

    Off with ``--verbose``, and when stderr is not a real file descriptor (e.g. under a test runner).
    """
    try:
        real = not verbose and sys.stderr.fileno() == 2 and sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        real = False
    if not real:
        yield None
        return
    fd, path = tempfile.mkstemp(prefix="gpt2-pipeline-", suffix=".log")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    console.file = terminal
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)
        console.file = sys.stderr
        terminal.close()


def _keep_log(path: Optional[str], output: str) -> Optional[str]:
    """Move the job's log into its output folder (any filesystem); on failure keep the temp file."""
    if path is None:
        return None
    from pipeline import io

    try:
        fs, folder = io.filesystem(output)
        with open(path, "rb") as src, fs.open_output_stream(f"{folder}/{LOG_FILE}") as dst:
            dst.write(src.read())
    except Exception:  # noqa: BLE001 - the log still matters: say where it is
        return path
    os.remove(path)
    return f"{output.rstrip('/')}/{LOG_FILE}"


def run_with_progress(job: JobConfig, verbose: bool = False) -> Summary:
    """Run ``job`` with a live bar (rows, tokens/s, ETA) and print the summary at the end.

    Ray's and vLLM's logs go to ``_job.log`` in the output folder (``--verbose`` shows them)."""
    with logs_to_file(verbose) as log:
        try:
            summary = _run_with_bar(job, verbose)
        except ConfigError:  # bad input, nothing ran: the one-line error says it all
            if log:
                os.remove(log)
            raise
        except BaseException:
            if log:
                console.print(f"logs: {log}", highlight=False)
            raise
        if summary.message == ALREADY_COMPLETE and log:
            os.remove(log)  # nothing ran: the finished job's own log stays
            log = None
        kept = _keep_log(log, job.output)
    print_summary(summary)
    if kept:
        console.print(f"logs: {kept}", highlight=False)
    return summary


def _run_with_bar(job: JobConfig, verbose: bool) -> Summary:
    per_input = job.sampling.n if job.task == Task.generate else 1
    started = time.monotonic()
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} tok/s"), TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    ) as bar:
        task = bar.add_task("starting engines", total=None, rate="-", errors=0)

        def update(totals: dict[str, int]) -> None:
            tokens = totals["completion_tokens"] if job.task == Task.generate else totals["prompt_tokens"]
            rate = tokens / max(time.monotonic() - started, 1e-6)
            bar.update(task, description=str(Task(job.task).value), completed=totals["rows"], rate=f"{rate:,.0f}", errors=totals["errors"])

        def set_total(rows_in: int) -> None:
            bar.update(task, total=rows_in * per_input)

        return run_job(job, progress=update, verbose=verbose, on_plan=set_total)


def _phases(phases: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in phases.items() if v is not None)


def print_summary(s: Summary) -> None:
    table = Table(title=f"job {s.status}", show_header=False, title_style="bold green" if s.status == "succeeded" else "bold red")
    for key, value in [
        ("output", s.output), ("rows in", f"{s.rows_in:,}"), ("rows out", f"{s.rows_out:,}"),
        ("error rows", f"{s.error_rows:,}"), ("prompt tokens", f"{s.prompt_tokens:,}"),
        ("completion tokens", f"{s.completion_tokens:,}"), ("duplicates / missing", f"{s.duplicates} / {s.missing}"),
        ("skipped (resume)", f"{s.skipped_resume:,}"), *([("deduplicated", f"{s.deduplicated:,}")] if s.deduplicated else []), ("shards", f"{s.shards:,}"),
        ("wall time", f"{s.wall_time_s:,.1f} s"), ("tokens/s", f"{s.tokens_per_s:,.1f}"),
        ("executor", s.executor), ("phases (s from start)", _phases(s.phases)),
    ] + ([("scored tokens", f"{s.scored_tokens:,}"),
          ("corpus perplexity", "-" if s.perplexity is None else f"{s.perplexity:,.4g}")] if s.scored_tokens else []):
        table.add_row(key, value)
    console.print(table)
    if s.message:
        console.print(s.message, highlight=False)
