"""The offline job: plan the input, run its slices through engines, commit shards, verify.

1. plan: list and check the input (every format, duplicate ids) before any engine starts;
   resume drops ids already committed.
2. run: one slice of ``batch_size`` rows is one block. The inline executor (``inline.py``: one
   in-process engine, or ``--via-serve``) or the Ray Data executor (``ray_executor.py``: an actor
   pool of engines across a cluster) runs every block through the row contract
   (``records.process_batch``).
3. commit: each result block is written as one content-addressed shard in ``_staging/``
   (``shards.py``: temp name + rename), so a retried block rewrites the same file: exactly once
   per id, whichever executor ran it. The driver compacts committed shards into output files of
   ``target_file_mb`` / ``max_rows_per_file`` as the job goes (``compact.py``).

After the stream ends, a verify pass over the output files counts rows, errors, tokens and
duplicate / missing ids, and writes ``_manifest.json``, ``_summary.json`` and ``_SUCCESS``.
Resuming a finished job (``_SUCCESS`` and the same fingerprint) reads its summary back: no
engine, no Ray.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import compact, io
from pipeline.config import ConfigError, Executor, InputFormat, JobConfig, Task
from pipeline.records import RowSpec
from pipeline.shards import INLINE_MIN_BLOCKS, RecentRowGroups, blocks_per_replica, commit_block, group_slices, read_items
from pipeline.verify import Summary, verify

logger = logging.getLogger(__name__)
ALREADY_COMPLETE = "already complete: nothing to run"  # the message of a finished job's resume
LEAD_ROWS = 8  # --via-serve: the first slice's rows, run alone so a warm fleet commits a shard at once


class JobAborted(RuntimeError):
    """The job stopped early (error-rate bound); committed shards are kept."""


def _slices(plan: io.InputPlan, size: int, lead: Optional[int] = None,
            done: Optional[pa.ChunkedArray] = None) -> list[dict[str, Any]]:
    """Slices of ``size`` rows (``lead``: the first one has that many rows instead). ``done``: one
    flag per input row (plan order), true where a previous run committed the row's id; fully done
    slices are left out, partly done ones drop those rows."""
    out = []
    pos = 0  # the fragment's first row in plan order
    for fr in plan.fragments:
        dropped = plan.dropped.get(fr.name, [])
        start = 0
        while start < fr.rows:
            length = min(lead if lead and not out else size, fr.rows - start)
            lo = fr.offset + start
            drop = [i - lo for i in dropped[bisect_left(dropped, lo):bisect_left(dropped, lo + length)]]
            if done is not None:
                flags = done.slice(pos + start, length)
                count = pc.sum(flags).as_py() or 0
                if count == length:
                    start += length
                    continue
                if count:
                    drop = sorted(set(drop).union(np.flatnonzero(flags.to_numpy()).tolist()))
            out.append({"fragment": asdict(fr), "start": start, "length": length, "drop": drop})
            start += length
        pos += fr.rows
    return out


def _done_flags(plan: io.InputPlan, done: pa.Array) -> pa.ChunkedArray:
    """One pass: is each input row's id committed? (One hash set of ``done`` for all rows.)"""
    ids = pa.chunked_array([ids for _, ids in io.file_ids(plan)], plan.id_type)
    return pc.is_in(ids, value_set=done)


def _finished(job: JobConfig, fingerprint: dict[str, Any]) -> Optional["Summary"]:
    """A finished job's summary (``_SUCCESS``, same fingerprint), else None: nothing to run."""
    fs, folder = io.filesystem(job.output)
    if io.read_json(fs, folder, io.SUCCESS_FILE) is None:
        return None
    previous = io.read_json(fs, folder, io.JOB_FILE) or {}
    saved = io.read_json(fs, folder, io.SUMMARY_FILE)
    if previous.get("fingerprint") != json.loads(json.dumps(fingerprint, default=str)) or not saved:
        return None
    summary = Summary(**{k: v for k, v in saved.items() if k in Summary.__dataclass_fields__})
    summary.skipped_resume, summary.message = summary.rows_in, ALREADY_COMPLETE
    return summary


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
    plan = io.plan_input(job.input, job.prompt_column, job.id_column, job.passthrough, job.input_format,
                         job.dedupe, check_ids=False)
    if job.via_serve is None:
        from pipeline.models import ModelNotFoundError

        try:  # fail fast; build a built-in or download a hub id (pinned to its commit) before actors start
            job = job.model_copy(update={"engine": pinned(job.engine)})
        except ModelNotFoundError as exc:
            raise ConfigError(str(exc)) from None
        if job.task == Task.generate.value and job.sampling.checked_by_engine:
            _check_sampling(job)  # plain sampling values need no model: the engine's start is not held up
    fingerprint = {**job.fingerprint(), "input": plan.fingerprint}
    if job.resume and (finished := _finished(job, fingerprint)) is not None:
        return finished
    io.find_duplicates(plan, job.dedupe)
    fs, folder = io.prepare_output(job.output, job.overwrite, job.resume)
    if job.resume:
        _check_resume(fs, folder, job, fingerprint)
        compact.recover(fs, folder)
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
    job, compiled = _compile_choice(job, plan.total_rows)
    batch_urls = _batch_urls(plan)
    # A fresh job's inline engine comes up while the input is read; a resumed one only if rows remain.
    runner = _start_inline(job, spec, clock, batch_urls) if executor == Executor.inline and not job.resume else None
    compactor = compact.Compactor(fs, folder, job.target_file_mb * 1024 * 1024, job.max_rows_per_file)
    precision: dict[str, str] = {}  # the dtype the engines ran in, and why (from the blocks)
    try:
        done = io.committed_ids(fs, folder, job.id_column) if job.resume else None
        skipped = 0 if done is None else len(done)
        flags = None if done is None else _done_flags(plan, done.cast(plan.id_type))
        del done
        if on_plan:
            on_plan(plan.total_rows - skipped)
        for path in io.committed_shards(fs, folder):  # an earlier run's commits join the next output file
            compactor.add(posixpath.basename(path))
        # A warm fleet (--via-serve) first runs a small slice alone: the first shard lands at once.
        lead = LEAD_ROWS if job.via_serve is not None and LEAD_ROWS < job.batch_size else None
        slices = _slices(plan, job.batch_size, lead, flags)
        del flags
        if slices and runner is None and executor == Executor.inline:
            runner = _start_inline(job, spec, clock, batch_urls)
        write = {"fs": fs, "folder": folder, "id_column": job.id_column, "metadata": meta}
        if not slices:
            stream: Iterator[dict] = iter(())
        elif runner is not None:
            # a warm fleet gets slices one by one (online requests keep their turn); an engine of
            # this process gets blocks of consecutive slices, as the Ray Data executor does
            groups = ([[s] for s in slices] if job.via_serve is not None
                      else group_slices(slices, job.batch_size, job.engine.replicas, INLINE_MIN_BLOCKS))
            blocks = blocks_per_replica(job.engine.max_num_seqs, len(groups[0]) * job.batch_size)
            recent = RecentRowGroups()
            stream = runner.run(
                groups, lambda items: read_items(items, plan.fs, plan.schema, job.id_column, recent),
                lambda block: commit_block(block, **write, stop=runner.stopping), in_flight=blocks * job.engine.replicas,
                lead=lead is not None,
            )
        else:
            from pipeline import ray_executor

            stream = ray_executor.stream(job, spec, plan, slices, write, verbose, clock, batch_urls)
        status, message, totals = _consume(stream, job, plan, progress, clock, compactor, precision)
    finally:
        if runner is not None:
            runner.close()
        _seal(compactor)
    if runner is not None and runner.ready_at is not None:
        clock.marks.setdefault("engine_ready", round(runner.ready_at - clock.start, 3))
    summary = verify(fs, folder, job, plan, status, message, totals, skipped)
    clock.mark("verify")
    summary.wall_time_s = clock.marks["verify"]  # one clock: the job's wall time is its last phase mark
    produced = totals["completion_tokens"] if job.task == Task.generate else totals["prompt_tokens"]
    summary.tokens_per_s = round(produced / summary.wall_time_s, 1) if summary.wall_time_s > 0 else 0.0
    summary.executor, summary.phases, summary.versions = executor.value, clock.phases(), versions()
    summary.dtype, summary.dtype_reason = precision.get("dtype", ""), precision.get("dtype_reason", "")
    if compiled is not None:
        summary.compiled, summary.compile_reason = not compiled.enforce_eager, compiled.reason
    io.write_json(fs, folder, io.SUMMARY_FILE, summary.to_dict())
    if summary.status == "succeeded" and job.writes_openai_batch:
        from pipeline.openai_batch import write_results

        write_results(fs, folder, plan, job)  # before _SUCCESS: a kill in between reruns it on resume
    if summary.status == "succeeded":
        io.write_json(fs, folder, io.SUCCESS_FILE, {"rows": summary.rows_out, "shards": summary.shards})
        compact.remove_staging(fs, folder)
        io.remove_staged_input(fs, folder)  # a **/*.parquet glob over the output finds the output only
    return summary


def _compile_choice(job: JobConfig, rows: int) -> tuple[JobConfig, Any]:
    """A generation job's engines: compiled or eager by the job's size (``engine/compiled.py``);
    a compile is set in the job's engine config, which every executor hands its engines."""
    if job.via_serve is not None or job.task != Task.generate:
        return job, None
    from pipeline.engine.compiled import job_compile
    from pipeline.models import resolve_model

    samples = max(job.sampling.n, job.sampling.best_of or 1)
    folder = resolve_model(job.engine.model, job.engine.revision, job.engine.offline)
    choice = job_compile(job.engine, folder, rows * job.sampling.max_tokens * samples)
    if job.engine.enforce_eager is None and not choice.enforce_eager and not job.engine.gpus_per_replica:
        # only a CPU compile changes the engine's settings (so a warm eager engine is still the same one)
        job = job.model_copy(update={"engine": job.engine.model_copy(update={"enforce_eager": False})})
    return job, choice


def _seal(compactor: compact.Compactor) -> None:
    """Make every committed row visible in an output file, however the run ended."""
    try:
        compactor.seal()
    except Exception:  # noqa: BLE001 - the shards stay staged; --resume compacts them
        logger.exception("compacting the last output file failed")
        compactor.close()


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
             progress: Optional[Callable[[dict[str, int]], None]], clock: _Clock,
             compactor: compact.Compactor, precision: dict[str, str]) -> tuple[str, str, dict[str, int]]:
    """Add up the shards' stats as they commit, compact them into output files (``precision``:
    filled with the engines' dtype and why); stop on Ctrl-C or past the error-rate bound."""
    totals = {"rows": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "inputs": 0, "shards": 0}
    status, message = "succeeded", ""
    try:
        for stats in stream:
            for key in ("rows", "errors", "prompt_tokens", "completion_tokens", "inputs"):
                totals[key] += int(stats[key])
            totals["shards"] += 1
            compactor.add(stats["shard"])
            clock.marks.setdefault("first_shard", round(time.monotonic() - clock.start, 3))
            clock.mark("last_shard")
            if stats.get("dtype"):
                precision.update(dtype=stats["dtype"], dtype_reason=stats.get("dtype_reason", ""))
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


def _check_sampling(job: JobConfig) -> None:
    """The job's sampling values as vLLM's engine would check them (token ids against the
    vocabulary, the structured-output constraint compiled), before any engine starts."""
    from pipeline.engine.decoding import check_job_sampling
    from pipeline.models import resolve_model

    try:
        check_job_sampling(job.sampling, resolve_model(job.engine.model, job.engine.revision, job.engine.offline))
    except ValueError as exc:
        raise ConfigError(f"sampling: {exc}") from None


def _embedding_dim(job: JobConfig) -> int:
    import json

    from pipeline.models import resolve_model

    cfg = json.loads((resolve_model(job.engine.model, job.engine.revision, job.engine.offline) / "config.json").read_text())
    return int(cfg.get("n_embd") or cfg.get("hidden_size"))


def _json(data: Any) -> bytes:
    return json.dumps(data, default=str).encode()
