"""The row contract: an input batch (Arrow) through the engine to output rows (Arrow).

Used by the Ray Data actors and by the Serve replicas (``run --via-serve``), so both paths
produce the same schema, the same per-row errors and the same per-row sampling overrides.
Each input row gives exactly ``n`` output rows (``sample_index`` 0..n-1), errors included
(one row per input for the embed and score tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
from pydantic import ValidationError

from pipeline.config import ROW_OVERRIDE_FIELDS, SamplingConfig, ScoreConfig, Task, format_validation_error

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
    engine: Any, batch: pa.Table, spec: RowSpec, priority: int, limit: Optional[asyncio.Semaphore] = None
) -> pa.Table:
    """Run every row of ``batch`` concurrently through ``engine``; keep row order and ids.

    ``limit`` bounds how many of these rows run at once (the serving path's batch admission).
    """
    from pipeline.engine import EngineFatalError, PromptError

    rows = batch.to_pylist()
    overrides = [c for c in ROW_OVERRIDE_FIELDS if c in batch.column_names]

    async def one(row: dict[str, Any]) -> list[dict[str, Any]]:
        prompt = row.get(spec.prompt_column)
        base = {ID: row[ID], "prompt": prompt if isinstance(prompt, str) else None}
        base.update({c: row.get(c) for c in spec.passthrough})
        try:
            if spec.task == Task.score:
                return [await _score_row(engine, prompt, base, spec, priority, limit)]
            sampling = spec.sampling.with_overrides({c: row.get(c) for c in overrides})
            ids = engine.encode(prompt, sampling.max_tokens, truncate=spec.truncate, sampling=sampling)
            async with limit or contextlib.nullcontext():
                if spec.task == Task.embed:
                    vec = await engine.embed(ids, normalize=spec.normalize, priority=priority)
                    return [{**base, "prompt_tokens": len(ids), "embedding": vec, "error": None}]
                done = await engine.complete(ids, sampling, priority=priority)
            return [
                {**base, "sample_index": s.index, "generated_text": s.text, "token_ids": s.token_ids,
                 "prompt_tokens": done.prompt_tokens, "completion_tokens": len(s.token_ids),
                 "finish_reason": s.finish_reason, "error": None, "logprobs": _logprob_rows(s.logprobs)}
                for s in done.samples
            ]
        except EngineFatalError:
            raise  # the replica is gone: let Ray retry the batch elsewhere
        except (PromptError, ValidationError, ValueError, TypeError) as exc:
            err = _error_text(exc)
        except Exception as exc:  # one bad request must not fail the batch
            err = f"engine_error: {_error_text(exc)}"
        if spec.task == Task.embed:
            return [{**base, "prompt_tokens": None, "embedding": None, "error": err}]
        if spec.task == Task.score:
            return [{**base, "error": err}]
        n = spec.sampling.n
        return [{**base, "sample_index": i, "error": err} for i in range(n)]

    results = await asyncio.gather(*(one(r) for r in rows))
    out = [r for group in results for r in group]
    return pa.Table.from_pylist(out, schema=spec.schema()).replace_schema_metadata(engine_metadata(engine))


def engine_metadata(engine: Any) -> dict[bytes, bytes]:
    """Block metadata saying how the engine that ran a block ran (its dtype and why): the job's
    summary reports it, whichever executor ran the block."""
    return {PRECISION_KEY: json.dumps(engine.precision.to_dict()).encode()}


def block_precision(block: pa.Table) -> dict[str, str]:
    """``engine_metadata``'s dtype and reason, read back from a processed block ({} if absent)."""
    raw = (block.schema.metadata or {}).get(PRECISION_KEY)
    return json.loads(raw) if raw else {}


async def _score_row(engine: Any, prompt: Any, base: dict[str, Any], spec: RowSpec, priority: int,
                     limit: Optional[asyncio.Semaphore]) -> dict[str, Any]:
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
