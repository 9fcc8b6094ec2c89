"""The row contract: an input batch (Arrow) through the engine to output rows (Arrow).

Used by the Ray Data actors and by the Serve replicas (``run --via-serve``), so both paths
produce the same schema, the same per-row errors and the same per-row sampling overrides.
Generation rows on the job's sampling go to the engine as one block (``Engine.encode_many`` and
``complete_many``) and come back as columns; the input's id, prompt and passthrough columns are
reused as they are, so a row costs no Python object beyond its answer.
Each input row gives exactly ``n`` output rows (``sample_index`` 0..n-1), errors included
(one row per input for the embed and score tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import pyarrow as pa
from pydantic import ValidationError

from pipeline.config import ROW_OVERRIDE_FIELDS, SamplingConfig, ScoreConfig, Task, format_validation_error
from pipeline.outputs import Completion, Sample

ID = "__id"  # internal column holding each row's input id (renamed to the id column on write)
PRECISION_KEY = b"gpt2_pipeline_precision"  # block metadata: the dtype its engine ran in, and why

GENERATE_FIELDS = [
    pa.field("sample_index", pa.int32()),
    pa.field("prompt", pa.string()),
    pa.field("generated_text", pa.string()),
    pa.field("token_ids", pa.list_(pa.int32())),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("error", pa.string()),
]
# --logprobs N: per generated token its text, logprob and the top-N alternatives
TOP_LOGPROB = pa.struct([pa.field("token", pa.string()), pa.field("logprob", pa.float64())])
LOGPROBS_FIELD = pa.field("logprobs", pa.list_(pa.struct([
    pa.field("token", pa.string()), pa.field("logprob", pa.float64()), pa.field("top", pa.list_(TOP_LOGPROB)),
])))
SCORE_FIELDS = [
    pa.field("prompt", pa.string()),
    pa.field("prompt_tokens", pa.int32()),   # tokens of the text
    pa.field("scored_tokens", pa.int32()),   # tokens with a log-probability (all but the first, or all)
    pa.field("nll", pa.float64()),           # mean negative log-likelihood per scored token (nats)
    pa.field("perplexity", pa.float64()),    # exp(nll)
    pa.field("error", pa.string()),
]
TOKEN_LOGPROBS_FIELD = pa.field("token_logprobs", pa.list_(pa.float32()))
EMBED_FIELDS = [
    pa.field("prompt", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("error", pa.string()),
]


@dataclass
class RowSpec:
    """What a batch needs to know about the job (picklable; sent to every actor)."""

    task: Task
    prompt_column: str
    sampling: SamplingConfig
    passthrough: list[str] = field(default_factory=list)
    normalize: bool = True
    truncate: bool = False
    id_type: pa.DataType = pa.string()
    passthrough_types: dict[str, pa.DataType] = field(default_factory=dict)
    embedding_dim: int = 0
    score: ScoreConfig = field(default_factory=ScoreConfig)

    def schema(self) -> pa.Schema:
        """The output schema, internal id column first (see ``io.finalize_columns``)."""
        fields = [pa.field(ID, self.id_type)]
        if self.task == Task.generate:
            fields += GENERATE_FIELDS[:-1] + ([LOGPROBS_FIELD] if self.sampling.logprobs is not None else [])
            fields += GENERATE_FIELDS[-1:]
        elif self.task == Task.score:
            fields += SCORE_FIELDS[:-1] + ([TOKEN_LOGPROBS_FIELD] if self.score.token_logprobs else []) + SCORE_FIELDS[-1:]
        else:
            fields += EMBED_FIELDS[:2] + [
                pa.field("embedding", pa.list_(pa.float32(), self.embedding_dim)), EMBED_FIELDS[2]
            ]
        fields += [pa.field(c, self.passthrough_types.get(c, pa.string())) for c in self.passthrough]
        return pa.schema(fields)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return f"invalid_sampling: {format_validation_error(exc)}"
    return str(exc) if str(exc) else type(exc).__name__


async def process_batch(
    engine: Any, batch: pa.Table, spec: RowSpec, priority: int, limit: Optional[contextlib.AbstractAsyncContextManager] = None
) -> pa.Table:
    """Run every row of ``batch`` concurrently through ``engine``; keep row order and ids.

    ``limit`` bounds how many of these rows run at once (the serving path's batch admission).
    """
    if spec.task == Task.generate:
        table = _generation_table(batch, spec, await _completions(engine, batch, spec, priority, limit))
    else:
        table = await _pooled_rows(engine, batch, spec, priority, limit)
    return table.replace_schema_metadata(engine_metadata(engine))


async def _completions(engine: Any, batch: pa.Table, spec: RowSpec, priority: int,
                       limit: Optional[contextlib.AbstractAsyncContextManager]) -> list[Union[Completion, str]]:
    """Each row's completion, or its error text. Rows with the job's sampling go to the engine as
    one block (``Engine.complete_many``); rows that override it, or run under ``limit``, one by one."""
    prompts = batch.column(spec.prompt_column).to_pylist()
    overrides = [c for c in ROW_OVERRIDE_FIELDS if c in batch.column_names]
    if not overrides and limit is None:
        sampling = spec.sampling
        ids = engine.encode_many(prompts, sampling.max_tokens, truncate=spec.truncate, sampling=sampling)
        ok = [i for i, x in enumerate(ids) if not isinstance(x, BaseException)]
        done = iter(await engine.complete_many([ids[i] for i in ok], sampling, priority=priority))
        results = [x if isinstance(x, BaseException) else next(done) for x in ids]
        return [_row_error(r) if isinstance(r, BaseException) else r for r in results]

    values = {c: batch.column(c).to_pylist() for c in overrides}

    async def one(i: int) -> Union[Completion, str]:
        try:
            sampling = spec.sampling.with_overrides({c: values[c][i] for c in overrides})
            ids = engine.encode(prompts[i], sampling.max_tokens, truncate=spec.truncate, sampling=sampling)
            async with limit or contextlib.nullcontext():
                return await engine.complete(ids, sampling, priority=priority)
        except Exception as exc:  # noqa: BLE001 - one bad request must not fail the batch
            return _row_error(exc)

    return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))


def _row_error(exc: BaseException) -> str:
    """A failed row's error text; a dead engine is raised (Ray retries the batch elsewhere)."""
    from pipeline.engine import EngineFatalError, PromptError

    if isinstance(exc, EngineFatalError) or not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, (PromptError, ValidationError, ValueError, TypeError)):
        return _error_text(exc)
    return f"engine_error: {_error_text(exc)}"


def _generation_table(batch: pa.Table, spec: RowSpec, results: list[Union[Completion, str]]) -> pa.Table:
    """Output rows, column by column: ``n`` per input row (``sample_index`` 0..n-1), errors too;
    the id, prompt and passthrough columns are the input's own."""
    n = spec.sampling.n
    rows: list[tuple[int, Optional[Completion], Optional[Sample], Optional[str], int]] = []
    for i, r in enumerate(results):
        if isinstance(r, str):
            rows.extend((i, None, None, r, k) for k in range(n))
        else:
            rows.extend((i, r, s, None, s.index) for s in r.samples)
    columns = {
        "sample_index": [r[4] for r in rows],
        "generated_text": [r[2].text if r[2] else None for r in rows],
        "token_ids": [r[2].token_ids if r[2] else None for r in rows],
        "prompt_tokens": [r[1].prompt_tokens if r[1] else None for r in rows],
        "completion_tokens": [len(r[2].token_ids) if r[2] else None for r in rows],
        "finish_reason": [r[2].finish_reason if r[2] else None for r in rows],
        "error": [r[3] for r in rows],
    }
    if spec.sampling.logprobs is not None:
        columns["logprobs"] = [_logprob_rows(r[2].logprobs) if r[2] else None for r in rows]
    sources = [r[0] for r in rows]  # the input row of each output row
    take = None if sources == list(range(batch.num_rows)) else pa.array(sources, pa.int64())
    prompt = batch.column(spec.prompt_column)
    inputs = {ID: batch.column(ID), "prompt": prompt if pa.types.is_string(prompt.type) or pa.types.is_large_string(
        prompt.type) else pa.nulls(batch.num_rows, pa.string())}
    inputs.update({c: batch.column(c) if c in batch.column_names else pa.nulls(batch.num_rows) for c in spec.passthrough})
    schema = spec.schema()
    arrays = []
    for f in schema:
        if f.name in inputs:
            col = inputs[f.name] if take is None else inputs[f.name].take(take)
            arrays.append(col.cast(f.type))
        else:
            arrays.append(pa.chunked_array([pa.array(columns[f.name], f.type)]))
    return pa.Table.from_arrays(arrays, schema=schema)


async def _pooled_rows(engine: Any, batch: pa.Table, spec: RowSpec, priority: int,
                       limit: Optional[contextlib.AbstractAsyncContextManager]) -> pa.Table:
    """Score and embed rows: one output row per input row, errors included."""
    rows = batch.to_pylist()
    overrides = [c for c in ROW_OVERRIDE_FIELDS if c in batch.column_names]

    async def one(row: dict[str, Any]) -> dict[str, Any]:
        prompt = row.get(spec.prompt_column)
        base = {ID: row[ID], "prompt": prompt if isinstance(prompt, str) else None}
        base.update({c: row.get(c) for c in spec.passthrough})
        try:
            if spec.task == Task.score:
                return await _score_row(engine, prompt, base, spec, priority, limit)
            sampling = spec.sampling.with_overrides({c: row.get(c) for c in overrides})  # its truncation
            ids = engine.encode(prompt, sampling.max_tokens, truncate=spec.truncate, sampling=sampling)
            async with limit or contextlib.nullcontext():
                vec = await engine.embed(ids, normalize=spec.normalize, priority=priority)
            return {**base, "prompt_tokens": len(ids), "embedding": vec, "error": None}
        except Exception as exc:  # noqa: BLE001 - one bad request must not fail the batch
            return {**base, "error": _row_error(exc)}

    return pa.Table.from_pylist(await asyncio.gather(*(one(r) for r in rows)), schema=spec.schema())


def engine_metadata(engine: Any) -> dict[bytes, bytes]:
    """Block metadata saying how the engine that ran a block ran (its dtype and why): the job's
    summary reports it, whichever executor ran the block."""
    return {PRECISION_KEY: json.dumps(engine.precision.to_dict()).encode()}


def block_precision(block: pa.Table) -> dict[str, str]:
    """``engine_metadata``'s dtype and reason, read back from a processed block ({} if absent)."""
    raw = (block.schema.metadata or {}).get(PRECISION_KEY)
    return json.loads(raw) if raw else {}


async def _score_row(engine: Any, prompt: Any, base: dict[str, Any], spec: RowSpec, priority: int,
                     limit: Optional[contextlib.AbstractAsyncContextManager]) -> dict[str, Any]:
    ids = engine.encode(prompt, check_length=False)  # long texts slide a window instead of failing
    async with limit or contextlib.nullcontext():
        scored = await engine.score(ids, stride=spec.score.stride, score_first_token=spec.score.score_first_token,
                                    priority=priority)
    row = {**base, "prompt_tokens": scored.prompt_tokens, "scored_tokens": scored.scored_tokens,
           "nll": scored.nll, "perplexity": scored.perplexity, "error": None}
    if spec.score.token_logprobs:
        row["token_logprobs"] = scored.token_logprobs
    return row


def _logprob_rows(logprobs: Optional[list[Any]]) -> Optional[list[dict[str, Any]]]:
    """Engine ``TokenLogprob``s as the ``logprobs`` column's structs (top sorted best first)."""
    if logprobs is None:
        return None
    return [{"token": t.token, "logprob": t.logprob,
             "top": [{"token": k, "logprob": v} for k, v in sorted(t.top.items(), key=lambda kv: -kv[1])]}
            for t in logprobs]


def perplexity_sums(table: pa.Table) -> tuple[int, float]:
    """Score rows' scored tokens and sum(nll_i * n_i): what corpus perplexity adds up per file."""
    import pyarrow.compute as pc

    ok = table.filter(pc.is_valid(table["nll"]))
    scored = int(pc.sum(ok["scored_tokens"]).as_py() or 0)
    if not scored:
        return 0, 0.0
    return scored, float(pc.sum(pc.multiply(ok["nll"], ok["scored_tokens"].cast(pa.float64()))).as_py())


def perplexity(scored: int, total: float) -> Optional[float]:
    """Token-weighted corpus perplexity exp(sum(nll_i * n_i) / sum(n_i)) from ``perplexity_sums``."""
    if not scored:
        return None
    mean = total / scored
    return math.exp(mean) if mean < 709 else math.inf


def summarize(table: pa.Table) -> dict[str, int]:
    """Counts for progress and the manifest; prompt tokens count once per prompt, not per sample."""
    import pyarrow.compute as pc

    def total(t: pa.Table, col: str) -> int:
        return int(pc.sum(t[col]).as_py() or 0) if col in t.column_names else 0

    firsts = table.filter(pc.equal(table["sample_index"], 0)) if "sample_index" in table.column_names else table
    return {
        "rows": table.num_rows,
        "errors": table.num_rows - table["error"].null_count,
        "prompt_tokens": total(firsts, "prompt_tokens"),
        "completion_tokens": total(table, "completion_tokens"),
    }
