"""What a person sees while a job runs: a Rich progress bar, then a summary table."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pipeline.batch import Summary, run_job
from pipeline.config import JobConfig, Task

console = Console(stderr=True)


def run_with_progress(job: JobConfig, verbose: bool = False) -> Summary:
    """Run ``job`` with a live bar (rows, tokens/s, ETA) and print the summary at the end."""
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

        summary = run_job(job, progress=update, verbose=verbose, on_plan=set_total)
    print_summary(summary)
    return summary


def print_summary(s: Summary) -> None:
    table = Table(title=f"job {s.status}", show_header=False, title_style="bold green" if s.status == "succeeded" else "bold red")
    for key, value in [
        ("output", s.output), ("rows in", f"{s.rows_in:,}"), ("rows out", f"{s.rows_out:,}"),
        ("error rows", f"{s.error_rows:,}"), ("prompt tokens", f"{s.prompt_tokens:,}"),
        ("completion tokens", f"{s.completion_tokens:,}"), ("duplicates / missing", f"{s.duplicates} / {s.missing}"),
        ("skipped (resume)", f"{s.skipped_resume:,}"), ("shards", f"{s.shards:,}"),
        ("wall time", f"{s.wall_time_s:,.1f} s"), ("tokens/s", f"{s.tokens_per_s:,.1f}"),
    ] + ([("scored tokens", f"{s.scored_tokens:,}"),
          ("corpus perplexity", "-" if s.perplexity is None else f"{s.perplexity:,.4g}")] if s.scored_tokens else []):
        table.add_row(key, value)
    console.print(table)
    if s.message:
        console.print(s.message, highlight=False)
