"""OpenAI Batch files (and ``vllm run-batch`` files) as bulk jobs.

Each request line becomes one row (id = ``custom_id``). Engine actors answer a row exactly as the
HTTP endpoint answers the same body: the endpoint code (``endpoint.api`` + ``endpoint.protocol``)
validates the body and builds the response, and ``endpoint.errors`` maps failures to the
endpoint's status and error JSON. A refused body is a row with that status, never a failed job.

Rows go to content-addressed Parquet shards like any job (resume, verify and the manifest are
unchanged); when the job succeeds, ``write_results`` turns the committed shards into the OpenAI
Batch output JSONL, in input order, written atomically.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import io
from pipeline.config import EngineConfig, JobConfig, ServeConfig, Task
from pipeline.formats import BATCH_ID
from pipeline.records import ID

COMPLETIONS, EMBEDDINGS = "/v1/completions", "/v1/embeddings"
RESULTS_FILE = "_results.jsonl"  # '_': Parquet readers of the output folder skip it
MAX_PROMPTS = ServeConfig.model_fields["max_prompts_per_request"].default

SCHEMA_FIELDS = [
    pa.field("sample_index", pa.int32()),  # always 0: one answer per request (keeps verify's keys)
    pa.field("url", pa.string()),
    pa.field("status_code", pa.int32()),
    pa.field("batch_request_id", pa.string()),
    pa.field("request_id", pa.string()),
    pa.field("body", pa.string()),  # the endpoint's JSON answer (response or error), as text
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("error", pa.string()),  # the error message when status_code != 200
]


def schema() -> pa.Schema:
    return pa.schema([pa.field(ID, pa.string())] + SCHEMA_FIELDS)


def urls(plan: io.InputPlan) -> list[str]:
    """The endpoints a planned batch file uses (each actor starts one engine per endpoint)."""
    found = set()
    for _, table in plan.staged:
        found.update(pc.unique(table["url"]).to_pylist())
    return sorted(found)


class BatchAnswerer:
    """Answers request rows: a generation engine for /v1/completions and a pooling engine for
    /v1/embeddings (each present only if the file uses it, as a Serve replica holds both)."""

    def __init__(self, name: str, engine: Any, embedder: Any, limit: Any = None):
        self.name, self.engine, self.embedder = name, engine, embedder
        self.limit = limit  # bounds rows inside the engines (a Serve replica's ``BatchSlots``)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        import asyncio

        async def one(r: dict[str, Any]) -> dict[str, Any]:
            if self.limit is None:
                return await self.answer(r[ID], r["url"], r["body"])
            async with self.limit:
                return await self.answer(r[ID], r["url"], r["body"])

        rows = await asyncio.gather(*(one(r) for r in batch.to_pylist()))
        return pa.Table.from_pylist(rows, schema=schema())

    async def answer(self, custom_id: str, url: str, body: str) -> dict[str, Any]:
        """One request line: what the endpoint at ``url`` answers for ``body``."""
        from pydantic import ValidationError

        from pipeline.endpoint import api, errors
        from pipeline.endpoint.metrics import Meter
        from pipeline.endpoint.protocol import CompletionRequest, EmbeddingRequest
        from pipeline.engine import PRIORITY_BATCH, EngineFatalError

        row: dict[str, Any] = {ID: custom_id, "sample_index": 0, "url": url, "batch_request_id": f"batch_req_{uuid.uuid4().hex}",
                               "request_id": f"req_{uuid.uuid4().hex}", "prompt_tokens": None, "completion_tokens": None}
        meter = Meter(None, url.rsplit("/", 1)[-1])
        try:
            model = CompletionRequest if url == COMPLETIONS else EmbeddingRequest
            try:
                req = model.model_validate_json(body)
            except ValidationError as exc:
                raise errors.invalid_request(exc.errors()) from None
            api.check_model(self.name, req.model)
            if isinstance(req, CompletionRequest):
                if req.stream:
                    raise errors.APIError(400, "stream is not supported in batch requests", "stream")
                job = api.prepare(self.engine, req, MAX_PROMPTS)
                resp = await api.complete(self.engine, req, job, self.name, PRIORITY_BATCH, meter)
            else:
                resp = await api.embed(self.embedder, req, self.name, MAX_PROMPTS, PRIORITY_BATCH, meter)
        except EngineFatalError:
            raise  # the replica is gone: Ray retries the block on a new actor
        except Exception as exc:
            err = errors.describe(exc)
            return {**row, "status_code": err.status, "error": err.message,
                    "body": json.dumps(errors.error_body(err.status, err.message, err.param, err.code))}
        usage = resp.usage
        return {**row, "status_code": 200, "error": None, "body": json.dumps(resp.model_dump(mode="json")),
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": usage.completion_tokens if usage else None}


class BatchRequestActor(BatchAnswerer):
    """The Ray Data executor's answerer (in its ``BatchActor``): starts the engines the file's urls need."""

    def __init__(self, engine_config: EngineConfig, urls: list[str]):
        from pipeline.engine import Engine

        both = COMPLETIONS in urls and EMBEDDINGS in urls  # then they split the GPUs' memory
        super().__init__(engine_config.name,
                         Engine(engine_config, Task.generate, colocated=both, in_process=True) if COMPLETIONS in urls else None,
                         Engine(engine_config, Task.embed, colocated=both, in_process=True) if EMBEDDINGS in urls else None)


def inline_processor(engine_config: EngineConfig, urls: list[str]) -> Any:
    """The inline executor's processor: the same answers from the process's warm engines."""
    from pipeline.inline import discard_engine, warm_engine

    async def make() -> Any:
        answerer = BatchAnswerer(
            engine_config.name,
            warm_engine(engine_config, Task.generate) if COMPLETIONS in urls else None,
            warm_engine(engine_config, Task.embed) if EMBEDDINGS in urls else None,
        )

        def release(failed: bool) -> None:
            for engine in (answerer.engine, answerer.embedder):
                if failed and engine is not None:
                    discard_engine(engine)

        return answerer, release

    return make


def serve_processor(app_name: str, job_id: str) -> Any:
    """Send each block to a running Serve application's replicas, which answer it with their
    own engines at batch priority (``LLMServer.answer_requests``: the same ``BatchAnswerer``)."""

    async def make() -> Any:
        from ray import serve

        handle = serve.get_app_handle(app_name)

        async def process(table: pa.Table) -> pa.Table:
            return await handle.answer_requests.remote(table, job_id)

        return process, lambda failed: None

    return make


def write_results(fs: Any, folder: str, plan: io.InputPlan, job: JobConfig) -> str:
    """The OpenAI Batch output JSONL from the committed shards, one line per request in input
    order, written to a temp name and renamed (also to ``job.results`` if given). Returns its path."""
    import pyarrow.dataset as pads

    order = []
    for name, table in plan.staged:
        ids = table[BATCH_ID]
        dropped = set(plan.dropped.get(name, ()))
        order.append(ids.filter(pa.array([i not in dropped for i in range(len(ids))])) if dropped else ids)
    wanted = pa.chunked_array(order, pa.string()).combine_chunks()
    files = io.output_files(fs, folder)
    cols = [BATCH_ID, "status_code", "batch_request_id", "request_id", "body"]
    answers = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=cols)
    where = pc.index_in(wanted, value_set=answers[BATCH_ID])
    if where.null_count:
        raise RuntimeError(f"{where.null_count} requests have no committed answer")
    answers = answers.take(where)
    path = posixpath.join(folder, RESULTS_FILE)
    _write_lines(fs, path, answers)
    if job.results:
        out_fs, out_path = io.filesystem(job.results)
        _write_lines(out_fs, out_path, answers)
    return path


def _write_lines(fs: Any, path: str, answers: pa.Table) -> None:
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with fs.open_output_stream(tmp) as out:
        for batch in answers.to_batches(max_chunksize=4096):
            out.write("".join(answer_line(r) for r in batch.to_pylist()).encode())
    fs.move(tmp, path)


def answer_line(r: dict[str, Any]) -> str:
    """One OpenAI Batch output line for an answered row (``body`` is the endpoint's JSON text)."""
    head = json.dumps({"id": r["batch_request_id"], "custom_id": r[BATCH_ID]})[:-1]
    response = f'{{"status_code": {r["status_code"]}, "request_id": {json.dumps(r["request_id"])}, "body": {r["body"]}}}'
    return f'{head}, "response": {response}, "error": null}}\n'


def missing_line(custom_id: str, code: str, message: str) -> str:
    """The line for a request that was never run (its batch was cancelled or expired first)."""
    return json.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
                       "error": {"code": code, "message": message}}) + "\n"
