"""Runs OpenAI Batch API batches on a Serve application's replicas: one runner per application.

The runner is a named Ray actor (``runner``): every replica gets the same one, so exactly one
process drives each batch and is the only writer of batch state. A batch is a bulk job
(``batch.run_job``) over its input file with ``via_serve``: slices go to the replicas, which
answer each request line with ``openai_batch.BatchAnswerer`` at batch priority (the code
``run --input-format openai-batch`` uses), and every slice commits one content-addressed shard.

Sharing the fleet: batches start in creation order (FIFO), ``BatchAPIConfig.concurrent`` at once;
all of them and ``run --via-serve`` jobs share each replica's batch slots
(``ServeConfig.max_batch_in_flight``; ``max_batch_in_flight_online`` while online requests are in
flight: ``admission.BatchSlots``) while online requests keep their priority.

Durable: state is a file in storage, written atomically at every step. A new runner (``serve``
restarted on the same storage, or the runner's replica replaced) queues every unfinished batch
again; its job resumes from the committed shards, so each ``custom_id`` is answered once.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline import io
from pipeline.batch import JobAborted, run_job
from pipeline.config import JobConfig, ServeConfig, window_seconds
from pipeline.formats import BATCH_ID, batch_line
from pipeline.openai_batch import answer_line, missing_line
from pipeline.serving.batch_objects import (
    MAX_ERRORS, BatchError, BatchErrors, BatchStatus, RequestCounts, StoredBatch, StoredFile, derived_file_id, now,
)
from pipeline.serving.batch_store import BatchStore

logger = logging.getLogger(__name__)
NAMESPACE = "gpt2-pipeline"
JOB_ATTEMPTS = 4  # a job that fails (a replica died mid-slice) resumes this often before the batch fails
RETRY_PAUSE_S = 5.0  # times the attempt number: Serve replaces a dead replica in the meantime
ENDED = {"cancel": (BatchStatus.cancelled, "batch_cancelled", "The batch was cancelled before this request ran."),
         "expire": (BatchStatus.expired, "batch_expired",
                    "This request could not be executed before the completion window expired.")}


def runner(cfg: ServeConfig) -> Any:
    """The application's runner actor (created by the first replica that asks)."""
    import ray

    actor = ray.remote(BatchRunner).options(name=f"batches:{cfg.name}", namespace=NAMESPACE, get_if_exists=True,
                                            num_cpus=0, max_restarts=0)
    return actor.remote(cfg)


def expires_at(created_at: int, window: str) -> int:
    return created_at + window_seconds(window)


class BatchRunner:
    def __init__(self, cfg: ServeConfig):
        self.cfg, self.limits = cfg, cfg.batches
        self.store = BatchStore(cfg.batches.storage_uri())
        self.lock = threading.Lock()  # state writes: the loop (create, cancel) and job threads (progress)
        self.stops: dict[str, str] = {}  # batch id -> "cancel" | "expire": read by its job thread
        self.running: set[str] = set()
        self.queue: Optional[asyncio.Queue] = None

    async def start(self) -> None:
        """Queue every unfinished batch in storage (oldest first) and start the workers; idempotent."""
        if self.queue is not None:
            return
        self.queue = asyncio.Queue()
        for batch in sorted(self.store.batches(), key=lambda b: (b.created_at, b.id)):
            if not BatchStatus(batch.status).finished:
                self.queue.put_nowait(batch.id)
        for _ in range(self.limits.concurrent):
            asyncio.create_task(self._worker())

    async def create(self, batch_json: str) -> None:
        await self.start()
        batch = StoredBatch.model_validate_json(batch_json)
        self.store.put_batch(batch)
        self.queue.put_nowait(batch.id)

    async def cancel(self, batch_id: str, owner: str) -> str:
        """Mark it cancelling; its job stops at the next committed slice, keeping what is done."""
        await self.start()
        with self.lock:
            batch = self.store.get_batch(batch_id, owner)
            if batch.status in (BatchStatus.validating, BatchStatus.in_progress):
                batch.status, batch.cancelling_at = BatchStatus.cancelling, now()
                self.store.put_batch(batch)
        if batch.status == BatchStatus.cancelling:
            self.stops[batch_id] = "cancel"
            if batch_id not in self.running:  # still queued: finish it now, not when its turn comes
                self.running.add(batch_id)
                asyncio.create_task(self._drive(batch_id))
        return batch.public().model_dump_json()

    async def _worker(self) -> None:
        while True:
            batch_id = await self.queue.get()
            if batch_id in self.running:
                continue
            self.running.add(batch_id)
            await self._drive(batch_id)

    async def _drive(self, batch_id: str) -> None:
        try:
            await asyncio.to_thread(self._run, batch_id)
        except Exception as exc:  # noqa: BLE001 - storage trouble: say so on the batch, keep the runner
            logger.exception("batch %s failed", batch_id)
            self._update(batch_id, status=BatchStatus.failed, failed_at=now(), errors=BatchErrors(
                data=[BatchError(code="server_error", message=f"{type(exc).__name__}: {exc}")]))
        finally:
            self.running.discard(batch_id)

    # ---- one batch, in a worker thread -----------------------------------------------------
    def _run(self, batch_id: str) -> None:
        batch = self.store.get_batch(batch_id)
        if BatchStatus(batch.status).finished:
            return
        if batch.status == BatchStatus.cancelling:
            self.stops[batch_id] = "cancel"
        if batch.expires_at is not None and now() >= batch.expires_at and batch_id not in self.stops:
            self.stops[batch_id] = "expire"
        if batch.status == BatchStatus.validating and batch_id not in self.stops:
            errors, total = self._validate(batch)
            if errors:
                self._update(batch_id, status=BatchStatus.failed, failed_at=now(), errors=BatchErrors(data=errors))
                return
            batch = self._update(batch_id, status=BatchStatus.in_progress, in_progress_at=now(),
                                 request_counts=RequestCounts(total=total))
        if batch.status == BatchStatus.in_progress:
            message = ""
            for attempt in range(JOB_ATTEMPTS):
                if attempt:
                    logger.warning("batch %s: job failed (%s); resuming it", batch_id, message)
                    self._pause(batch_id, RETRY_PAUSE_S * attempt)
                if batch_id in self.stops:
                    break
                summary = self._job(batch)
                message = "" if summary.status == "succeeded" else summary.message
                if not message:
                    break
            if message and batch_id not in self.stops:
                self._update(batch_id, status=BatchStatus.failed, failed_at=now(),
                             errors=BatchErrors(data=[BatchError(code="job_failed", message=message[:2000])]))
                return
        self._finalize(batch_id, self.stops.pop(batch_id, None))

    def _pause(self, batch_id: str, seconds: float) -> None:
        """Wait before a retry; a cancel or expiry ends the wait."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and batch_id not in self.stops:
            time.sleep(0.2)

    def _validate(self, batch: StoredBatch) -> tuple[list[BatchError], int]:
        """Stream the input file: line-numbered errors (up to ``MAX_ERRORS``) and the request count."""
        errors: list[BatchError] = []
        seen: set[str] = set()
        total = 0
        try:
            self.store.get_file(batch.input_file_id, batch.owner)
            lines: Iterator[bytes] = self.store.lines(batch.input_file_id)
        except Exception:  # noqa: BLE001 - deleted since the batch was created
            return [BatchError(code="invalid_file", message=f"input file {batch.input_file_id} no longer exists")], 0
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            total += 1
            if len(errors) >= MAX_ERRORS:
                continue
            try:
                custom_id, url, _ = batch_line(raw)
            except ValueError as exc:
                errors.append(BatchError(code="invalid_request", line=n, message=str(exc)))
                continue
            if url != batch.endpoint:
                errors.append(BatchError(code="mismatched_endpoint", line=n, param="url",
                                         message=f"url {url!r} differs from the batch's endpoint {batch.endpoint!r}"))
            if custom_id in seen:
                errors.append(BatchError(code="duplicate_custom_id", line=n, param="custom_id",
                                         message=f"custom_id {custom_id!r} is used by an earlier line"))
            seen.add(custom_id)
        if total == 0:
            errors.append(BatchError(code="empty_file", message="the input file holds no requests"))
        if total > self.limits.max_requests:
            errors.append(BatchError(code="too_many_requests",
                                     message=f"{total} requests; a batch may hold at most {self.limits.max_requests}"))
        return errors, total

    def _job(self, batch: StoredBatch) -> Any:
        """The batch's bulk job through the replicas; resumes from committed shards."""
        job = JobConfig(input=self.store.content_uri(batch.input_file_id), output=self.store.job_uri(batch.id),
                        input_format="openai-batch", output_format="parquet", via_serve=self.cfg.name,
                        batch_size=self.limits.batch_size, resume=True, executor="inline", engine=self.cfg.engine)
        base = self._answered(batch.id)
        total = batch.request_counts.total

        def progress(totals: dict[str, int]) -> None:
            done = base[0] + totals["rows"] - totals["errors"], base[1] + totals["errors"]
            self._update(batch.id, request_counts=RequestCounts(completed=done[0], failed=done[1], total=total))
            if batch.expires_at is not None and now() >= batch.expires_at:
                self.stops.setdefault(batch.id, "expire")
            if batch.id in self.stops:
                raise JobAborted(f"batch {self.stops[batch.id]}")

        return run_job(job, progress=progress)

    def _answered(self, batch_id: str) -> tuple[int, int]:
        """(answered 200, answered otherwise) in the committed shards."""
        table = self._answers(batch_id, ["status_code"])
        ok = (pc.sum(pc.equal(table["status_code"], 200)).as_py() or 0) if table.num_rows else 0
        return ok, table.num_rows - ok

    def _answers(self, batch_id: str, columns: list[str]) -> pa.Table:
        """Committed answers (output files and staged shards), one row per request: a staged shard
        that a sealed file already holds (a crash between the two steps of a seal) counts once."""
        import numpy as np
        import pyarrow.dataset as pads

        fs, folder = self.store.fs, self.store.job_folder(batch_id)
        files = io.output_files(fs, folder) + io.committed_shards(fs, folder)
        if not files:
            return pa.table({c: pa.array([], pa.string() if c != "status_code" else pa.int32()) for c in columns})
        table = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=list(dict.fromkeys([BATCH_ID, *columns])))
        _, first = np.unique(table[BATCH_ID].to_numpy(zero_copy_only=False), return_index=True)
        return table.take(pa.array(np.sort(first))).select(columns)

    # ---- results ------------------------------------------------------------------------------
    def _finalize(self, batch_id: str, stop: Optional[str]) -> None:
        """Write the output (200s) and error (the rest) files in input order, then the final state.
        Requests never run (cancel, expiry) go to the error file with OpenAI's code for why."""
        if stop is None:
            self._update(batch_id, status=BatchStatus.finalizing, finalizing_at=now())
        final, code, message = ENDED.get(stop, (BatchStatus.completed, "", ""))
        batch = self.store.get_batch(batch_id)
        answers = self._answers(batch_id, [BATCH_ID, "status_code", "batch_request_id", "request_id", "body"])
        files, counts = {}, {"output": 0, "error": 0}
        streams = {role: self.store.open_temp(self.store.file_content(derived_file_id(batch_id, role)))
                   for role in counts}
        try:
            for ids in self._input_ids(batch):
                where = pc.index_in(ids, value_set=answers[BATCH_ID])
                rows = answers.take(where.fill_null(0)).to_pylist() if answers.num_rows else [None] * len(ids)
                out: dict[str, list[str]] = {"output": [], "error": []}
                for custom_id, found, row in zip(ids.to_pylist(), where.is_valid().to_pylist(), rows):
                    if found:
                        out["output" if row["status_code"] == 200 else "error"].append(answer_line(row))
                    else:
                        out["error"].append(missing_line(custom_id, code or "batch_failed", message or "no answer"))
                for role, lines in out.items():
                    counts[role] += len(lines)
                    streams[role][1].write("".join(lines).encode())
        finally:
            for _, stream in streams.values():
                stream.close()
        for role, (tmp, _) in streams.items():
            file_id = derived_file_id(batch_id, role)
            if not counts[role]:
                self.store.discard(tmp)
                continue
            self.store.commit(tmp, self.store.file_content(file_id))
            size = self.store.fs.get_file_info(self.store.file_content(file_id)).size
            self.store.write_json(self.store.file_meta(file_id), StoredFile(
                id=file_id, bytes=size, created_at=now(), filename=f"{batch_id}_{role}.jsonl",
                purpose="batch_output", owner=batch.owner))
            files[role] = file_id
        self._update(batch_id, status=final, **{f"{final.value}_at": now()},
                     output_file_id=files.get("output"), error_file_id=files.get("error"),
                     request_counts=RequestCounts(completed=counts["output"], failed=counts["error"],
                                                  total=batch.request_counts.total or counts["output"] + counts["error"]))

    def _input_ids(self, batch: StoredBatch) -> Iterator[pa.Array]:
        """The custom_ids in input order, in chunks: from the staged input, else from the file."""
        import pyarrow.parquet as pq

        fs, folder = self.store.fs, posixpath.join(self.store.job_folder(batch.id), "_input")
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        staged = sorted(i.path for i in infos if i.is_file and i.path.endswith(".parquet") and not i.base_name.startswith("."))
        if staged:
            for path in staged:
                with fs.open_input_file(path) as fh:
                    for chunk in pq.ParquetFile(fh).iter_batches(batch_size=4096, columns=[BATCH_ID]):
                        yield chunk.column(0)
            return
        ids: list[str] = []
        for raw in self.store.lines(batch.input_file_id):
            try:
                ids.append(batch_line(raw)[0])
            except ValueError:
                continue
            if len(ids) == 4096:
                yield pa.array(ids, pa.string())
                ids = []
        if ids:
            yield pa.array(ids, pa.string())

    def _update(self, batch_id: str, **changes: Any) -> StoredBatch:
        with self.lock:
            batch = self.store.get_batch(batch_id)
            if BatchStatus(batch.status).finished:
                return batch
            if batch.status == BatchStatus.cancelling and changes.get("status") in (BatchStatus.in_progress, BatchStatus.finalizing):
                changes.pop("status")
            for key, value in changes.items():
                setattr(batch, key, value)
            self.store.put_batch(batch)
            return batch

