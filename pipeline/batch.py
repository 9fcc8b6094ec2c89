"""The offline job: plan the input, run its slices through engines, commit shards, verify.

1. plan: list and check the input (every format, duplicate ids) before any engine starts;
   resume drops ids already committed.
2. run: one slice of ``batch_size`` rows is one block. The inline executor (``inline.py``: one
   in-process engine, or ``--via-serve``) or the Ray Data executor (``ray_executor.py``: an actor
   pool of engines across a cluster) runs every block through the row contract
   (``records.process_batch``).
3. commit: each result block is written as one content-addressed shard (temp name + rename), so a
   retried block rewrites the same file: exactly once per id, whichever executor ran it.

After the stream ends, a verify pass over committed shards counts rows, errors, tokens and
duplicate / missing ids, and writes ``_manifest.json``, ``_summary.json`` and ``_SUCCESS``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import io
from pipeline.config import ConfigError, Executor, InputFormat, JobConfig, Task
from pipeline.records import ID, RowSpec, corpus_perplexity, summarize

logger = logging.getLogger(__name__)
HOLD_ENV = "GPT2_PIPELINE_HOLD_AFTER_SHARDS"
READY_KEY = b"gpt2_pipeline_engine_ready"  # block metadata: when the engine that ran it was ready (unix s)
MIN_BLOCKS_PER_REPLICA = 4
LEAD_ROWS = 8  # --via-serve: the first slice's rows, run alone so a warm fleet commits a shard at once
MAX_BLOCKS_PER_REPLICA = 32


def blocks_per_replica(max_num_seqs: int, batch_size: int) -> int:
    """Blocks each replica runs at once: enough rows to fill the engine's batch, plus one block
    already inside when another finishes, so the paged-attention scheduler never drains."""
    return max(MIN_BLOCKS_PER_REPLICA, min(MAX_BLOCKS_PER_REPLICA, -(-max_num_seqs // batch_size) + 1))


class JobAborted(RuntimeError):
    """The job stopped early (error-rate bound); committed shards are kept."""


@dataclass
class Summary:
    status: str
    output: str
    rows_in: int
    rows_out: int = 0
    error_rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    duplicates: int = 0
    missing: int = 0
    skipped_resume: int = 0
    deduplicated: int = 0
    shards: int = 0
    wall_time_s: float = 0.0
    tokens_per_s: float = 0.0
    scored_tokens: int = 0  # score task: tokens with a log-probability
    perplexity: Optional[float] = None  # score task: exp(sum(nll_i * scored_i) / sum(scored_i))
    message: str = ""
    executor: str = ""  # inline (driver process) or ray-data
    phases: dict[str, Optional[float]] = field(default_factory=dict)  # seconds from the job's start
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_items(items: list[dict], fs: Any, schema: pa.Schema, id_column: str, done: Optional[pa.Array]) -> pa.Table:
    """The rows of some slices, less the ids a previous run committed (``done``)."""
    tables = []
    for item in items:
        t = io.read_fragment(fs, io.Fragment(**item["fragment"]), schema, id_column).slice(item["start"], item["length"])
        if item.get("drop"):  # --dedupe first: later rows of a repeated id
            dropped = set(item["drop"])
            t = t.filter(pa.array([i not in dropped for i in range(t.num_rows)]))
        if done is not None:
            t = t.filter(pc.invert(pc.is_in(t[ID], value_set=done)))
        tables.append(t)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def commit_block(block: pa.Table, fs: Any, folder: str, id_column: str, metadata: dict,
                 stop: Optional[threading.Event] = None) -> dict[str, Any]:
    """Write one processed block as a shard; its stats for progress (and when its engine was ready)."""
    ready = (block.schema.metadata or {}).get(READY_KEY)
    block = block.replace_schema_metadata(None)
    _hold(fs, folder, stop)
    name = io.write_shard(fs, folder, block, id_column, metadata)
    stats = summarize(block)
    stats["inputs"] = len(pc.unique(block[ID]))
    return {"shard": name, **stats, "engine_ready": float(ready) if ready else None}


def _hold(fs: Any, folder: str, stop: Optional[threading.Event]) -> None:
    """Test hook: with $GPT2_PIPELINE_HOLD_AFTER_SHARDS=N, writes wait while N shards are committed,
    so fault tests interrupt a job in a known state instead of racing it. Off unless set.
    ``stop`` (inline executor) ends the wait when the job ends: nothing is written after it."""
    limit = os.environ.get(HOLD_ENV)
    while limit and len(io.committed_shards(fs, folder)) >= int(limit):
        if stop is not None and stop.wait(0.1):
            raise RuntimeError("the job stopped")
        time.sleep(0 if stop is not None else 0.1)


def _slices(plan: io.InputPlan, size: int, lead: Optional[int] = None) -> list[dict[str, Any]]:
    """Slices of ``size`` rows (``lead``: the first one has that many rows instead)."""
    out = []
    for fr in plan.fragments:
        dropped = plan.dropped.get(fr.name, [])
        start = 0
        while start < fr.rows:
            length = min(lead if lead and not out else size, fr.rows - start)
            lo = fr.offset + start
            drop = [i - lo for i in dropped[bisect_left(dropped, lo):bisect_left(dropped, lo + length)]]
            out.append({"fragment": asdict(fr), "start": start, "length": length, "drop": drop})
            start += length
    return out


def _check_resume(fs: Any, folder: str, job: JobConfig, fingerprint: dict[str, Any]) -> None:
    previous = io.read_json(fs, folder, io.JOB_FILE)
    if previous is None:
        return
    if previous.get("fingerprint") != fingerprint and not job.force:
        changed = sorted(k for k in fingerprint if previous.get("fingerprint", {}).get(k) != fingerprint[k])
        raise ConfigError(
            f"cannot resume: the job differs from the one that wrote {job.output!r} "
            f"(changed: {', '.join(changed) or 'input'}); pass --force to continue anyway"
        )


def run_job(
    job: JobConfig,
    progress: Optional[Callable[[dict[str, int]], None]] = None,
    verbose: bool = False,
    on_plan: Optional[Callable[[int], None]] = None,
) -> Summary:
    """Run a bulk job to the end. Raises ConfigError for bad input before any engine starts.

    ``on_plan(rows_to_do)`` is called once the input is planned; ``progress(totals)`` per shard.
    """
    from pipeline.models import pinned
    from pipeline.runtime import ray_address, versions

    clock = _Clock()
    plan = io.plan_input(job.input, job.prompt_column, job.id_column, job.passthrough, job.input_format, job.dedupe)
    if job.via_serve is None:
        from pipeline.models import ModelNotFoundError

        try:  # fail fast; build a built-in or download a hub id (pinned to its commit) before actors start
            job = job.model_copy(update={"engine": pinned(job.engine)})
        except ModelNotFoundError as exc:
            raise ConfigError(str(exc)) from None
    fs, folder = io.prepare_output(job.output, job.overwrite, job.resume)
    fingerprint = {**job.fingerprint(), "input": plan.fingerprint}
    if job.resume:
        _check_resume(fs, folder, job, fingerprint)
        io.remove_temp_files(fs, folder)
    clock.mark("input_plan")
    io.write_json(fs, folder, io.JOB_FILE, {"fingerprint": fingerprint, "config": job.model_dump(mode="json")})
    io.stage_input(plan, fs, folder)  # JSONL / CSV / OpenAI Batch: read as Parquet from here on

    spec = RowSpec(
        task=job.task, prompt_column=job.prompt_column, sampling=job.sampling, passthrough=job.passthrough,
        normalize=job.normalize, truncate=job.engine.truncate, id_type=plan.id_type,
        passthrough_types={c: plan.schema.field(c).type for c in job.passthrough},
        embedding_dim=_embedding_dim(job) if job.task == Task.embed else 0, score=job.score,
    )
    meta = {io.METADATA_KEY: _json({"job": fingerprint, "model": job.engine.model, "versions": versions()})}
    executor = job.resolved_executor(embedded=ray_address(job.address) is None)
    batch_urls = _batch_urls(plan)
    runner = _start_inline(job, spec, clock, batch_urls) if executor == Executor.inline else None
    try:
        done = io.committed_ids(fs, folder, job.id_column) if job.resume else None
        skipped = 0 if done is None else len(done)
        done = None if done is None else done.cast(plan.id_type)
        if on_plan:
            on_plan(plan.total_rows - skipped)
        # A warm fleet (--via-serve) first runs a small slice alone: the first shard lands at once.
        lead = LEAD_ROWS if job.via_serve is not None and LEAD_ROWS < job.batch_size else None
        slices = _slices(plan, job.batch_size, lead)
        blocks = blocks_per_replica(job.engine.max_num_seqs, job.batch_size)
        write = {"fs": fs, "folder": folder, "id_column": job.id_column, "metadata": meta}
        if runner is not None:
            stream = runner.run(
                ([item] for item in slices), lambda items: read_items(items, plan.fs, plan.schema, job.id_column, done),
                lambda block: commit_block(block, **write, stop=runner.stopping), in_flight=blocks * job.engine.replicas,
                lead=lead is not None,
            )
        else:
            from pipeline import ray_executor

            stream = ray_executor.stream(job, spec, plan, slices, done, write, verbose, clock, batch_urls)
        start = time.monotonic()
        status, message, totals = _consume(stream, job, plan, progress, clock)
    finally:
        if runner is not None:
            runner.close()
    wall = time.monotonic() - start
    if runner is not None and runner.ready_at is not None:
        clock.marks.setdefault("engine_ready", round(runner.ready_at - clock.start, 3))
    summary = _verify(fs, folder, job, plan, status, message, wall, totals, skipped)
    clock.mark("verify")
    summary.executor, summary.phases, summary.versions = executor.value, clock.phases(), versions()
    io.write_json(fs, folder, io.SUMMARY_FILE, summary.to_dict())
    if summary.status == "succeeded" and job.writes_openai_batch:
        from pipeline.openai_batch import write_results

        write_results(fs, folder, plan, job)  # before _SUCCESS: a kill in between reruns it on resume
    if summary.status == "succeeded":
        io.write_json(fs, folder, io.SUCCESS_FILE, {"rows": summary.rows_out, "shards": summary.shards})
    return summary


def _batch_urls(plan: io.InputPlan) -> Optional[list[str]]:
    """An OpenAI Batch file's endpoints (rows are requests answered like the endpoint), else None."""
    if plan.format != InputFormat.openai_batch:
        return None
    from pipeline.openai_batch import urls

    return urls(plan)


class _Clock:
    """Phase marks in seconds since the job started: where a job's time goes."""

    PHASES = ("input_plan", "ray_start", "engine_ready", "first_shard", "last_shard", "verify")

    def __init__(self) -> None:
        self.start, self.start_unix = time.monotonic(), time.time()
        self.marks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        self.marks[phase] = round(time.monotonic() - self.start, 3)

    def phases(self) -> dict[str, Optional[float]]:
        return {p: self.marks.get(p) for p in self.PHASES}


def _start_inline(job: JobConfig, spec: RowSpec, clock: _Clock, batch_urls: Optional[list[str]]) -> Any:
    """The inline executor: the engine (or the Serve handle) comes up while the job is prepared."""
    from pipeline.inline import InlineRunner, engine_processor, serve_processor

    if batch_urls is not None and job.via_serve is None:
        from pipeline.openai_batch import inline_processor

        return InlineRunner(inline_processor(job.engine, batch_urls))
    if job.via_serve is None:
        return InlineRunner(engine_processor(job.engine, spec))
    from ray import serve

    from pipeline.runtime import init_ray

    try:
        init_ray(job.address or "auto")  # --via-serve joins the cluster that runs the Serve app
        serve.get_app_handle(job.via_serve)
    except Exception as exc:  # noqa: BLE001 - no cluster, or no such app: say so before anything runs
        raise ConfigError(f"--via-serve {job.via_serve!r}: no running Serve application of that name "
                          f"({type(exc).__name__}: {exc}); start one with `gpt2-pipeline serve --name {job.via_serve}`") from None
    clock.mark("ray_start")
    if batch_urls is not None:  # request lines: the replicas answer them as their endpoints do
        from pipeline import openai_batch

        return InlineRunner(openai_batch.serve_processor(job.via_serve, job.output))
    return InlineRunner(serve_processor(job.via_serve, spec, job.output))


def _consume(stream: Iterator[dict], job: JobConfig, plan: io.InputPlan,
             progress: Optional[Callable[[dict[str, int]], None]], clock: _Clock) -> tuple[str, str, dict[str, int]]:
    """Add up the shards' stats as they commit; stop on Ctrl-C or past the error-rate bound."""
    totals = {"rows": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "inputs": 0, "shards": 0}
    status, message = "succeeded", ""
    try:
        for stats in stream:
            for key in ("rows", "errors", "prompt_tokens", "completion_tokens", "inputs"):
                totals[key] += int(stats[key])
            totals["shards"] += 1
            clock.marks.setdefault("first_shard", round(time.monotonic() - clock.start, 3))
            clock.mark("last_shard")
            if stats.get("engine_ready"):
                ready = round(stats["engine_ready"] - clock.start_unix, 3)
                clock.marks["engine_ready"] = min(ready, clock.marks.get("engine_ready", ready))
            if progress:
                progress(dict(totals))
            share = totals["errors"] / totals["rows"] if totals["rows"] else 0.0
            if job.max_error_rate is not None and totals["inputs"] >= min(plan.total_rows, 20) and share > job.max_error_rate:
                raise JobAborted(
                    f"error share {share:.1%} is over --max-error-rate {job.max_error_rate:.1%} "
                    f"after {totals['rows']} rows; committed shards are kept"
                )
    except KeyboardInterrupt:
        status, message = "interrupted", "stopped by the user"
    except JobAborted as exc:
        status, message = "aborted", str(exc)
    except Exception as exc:  # e.g. the inline engine died: keep what is committed, say how to go on
        logger.exception("job failed")
        status, message = "failed", f"{type(exc).__name__}: {exc}"
    return status, message, totals


def _verify(fs: Any, folder: str, job: JobConfig, plan: io.InputPlan, status: str, message: str,
            wall: float, totals: dict[str, int], skipped: int) -> Summary:
    """Scan committed shards: the truth about what is in the output (including earlier runs)."""
    import pyarrow.dataset as pads

    files = io.committed_shards(fs, folder)
    summary = Summary(status=status, output=job.output, rows_in=plan.total_rows, message=message,
                      skipped_resume=skipped, shards=len(files), wall_time_s=round(wall, 3),
                      deduplicated=plan.deduplicated)
    if files:
        cols = [job.id_column, "error", "prompt_tokens"] + (["completion_tokens", "sample_index"] if job.task == Task.generate else [])
        cols += ["scored_tokens", "nll"] if job.task == Task.score else []
        dataset = pads.dataset(files, filesystem=fs, format="parquet")
        table = dataset.to_table(columns=cols)
        stats = summarize(table)
        if job.task == Task.score:
            summary.scored_tokens, summary.perplexity = corpus_perplexity(table)
            stats.update(scored_tokens=summary.scored_tokens, perplexity=summary.perplexity)
        io.write_json(fs, folder, io.MANIFEST_FILE, {
            "status": status, **stats, "config": job.model_dump(mode="json"),
            "shards": [{"file": f.path.rsplit("/", 1)[-1], "rows": f.metadata.num_rows} for f in dataset.get_fragments()],
        })
        summary.rows_out, summary.error_rows = stats["rows"], stats["errors"]
        summary.prompt_tokens, summary.completion_tokens = stats["prompt_tokens"], stats["completion_tokens"]
        keys = [job.id_column] + (["sample_index"] if job.task == Task.generate else [])
        distinct = table.group_by(keys).aggregate([]).num_rows
        summary.duplicates = table.num_rows - distinct
        summary.missing = max(0, plan.total_rows - len(pc.unique(table[job.id_column])))
    else:
        summary.missing = plan.total_rows
    produced = totals["completion_tokens"] if job.task == Task.generate else totals["prompt_tokens"]
    summary.tokens_per_s = round(produced / wall, 1) if wall > 0 else 0.0
    if summary.status == "succeeded" and summary.missing:
        summary.status, summary.message = "incomplete", f"{summary.missing} input ids have no output row"
    if summary.status != "succeeded" and not summary.message.endswith("resume"):
        summary.message += f"; rerun with --resume to finish the remaining {summary.missing} rows"
    return summary


def _embedding_dim(job: JobConfig) -> int:
    import json

    from pipeline.models import resolve_model

    cfg = json.loads((resolve_model(job.engine.model, job.engine.revision, job.engine.offline) / "config.json").read_text())
    return int(cfg.get("n_embd") or cfg.get("hidden_size"))


def _json(data: Any) -> bytes:
    import json

    return json.dumps(data, default=str).encode()
