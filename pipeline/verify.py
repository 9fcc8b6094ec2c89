"""A job's verify pass and its summary: the truth about what is in the output folder.

Streams over the output files one at a time: per file, its counts are added up and only its
keys (id, sample index) are kept as Arrow columns for the exact duplicate / missing check.
"""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io
from pipeline.config import JobConfig, Task
from pipeline.records import perplexity, perplexity_sums, summarize


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
    shards: int = 0  # output files
    wall_time_s: float = 0.0  # = phases["verify"]: the job's start to the end of its verify pass
    tokens_per_s: float = 0.0
    scored_tokens: int = 0  # score task: tokens with a log-probability
    perplexity: Optional[float] = None  # score task: exp(sum(nll_i * scored_i) / sum(scored_i))
    message: str = ""
    executor: str = ""  # inline (driver process) or ray-data
    dtype: str = ""  # what the engines ran in (empty when no block ran), and why
    dtype_reason: str = ""
    quantization: str = "none"  # the engines' linear layers: none (the dtype) or int8
    kv_cache_dtype: str = "auto"  # the KV cache's: auto (the dtype) or an fp8 format
    compiled: Optional[bool] = None  # a CPU job's engines compiled the model (not eager), and why
    compile_reason: str = ""
    phases: dict[str, Optional[float]] = field(default_factory=dict)  # seconds from the job's start
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify(fs: Any, folder: str, job: JobConfig, plan: io.InputPlan, status: str, message: str,
           totals: dict[str, int], skipped: int) -> Summary:
    """Scan the output files (and shards still staged): counts, duplicates, missing ids; write
    ``_manifest.json``. ``wall_time_s`` and ``tokens_per_s`` are the caller's."""
    files = io.output_files(fs, folder) + io.committed_shards(fs, folder)
    summary = Summary(status=status, output=job.output, rows_in=plan.total_rows, message=message,
                      skipped_resume=skipped, shards=len(files), deduplicated=plan.deduplicated,
                      quantization=job.engine.quantization, kv_cache_dtype=job.engine.kv_cache_dtype)
    keys = [job.id_column] + (["sample_index"] if job.task == Task.generate else [])
    cols = keys + ["error", "prompt_tokens"] + (["completion_tokens"] if job.task == Task.generate else [])
    cols += ["scored_tokens", "nll"] if job.task == Task.score else []
    stats = {"rows": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}
    scored, nll_total, seen, listing = 0, 0.0, [], []
    for path in files:
        with fs.open_input_file(path) as fh:
            table = pq.read_table(fh, columns=cols)
        for key, value in summarize(table).items():
            stats[key] += value
        if job.task == Task.score:
            n, total = perplexity_sums(table)
            scored, nll_total = scored + n, nll_total + total
        seen.append(table.select(keys))
        listing.append({"file": posixpath.relpath(path, folder), "rows": table.num_rows})
        del table
    if files:
        if job.task == Task.score:
            summary.scored_tokens, summary.perplexity = scored, perplexity(scored, nll_total)
            stats.update(scored_tokens=summary.scored_tokens, perplexity=summary.perplexity)
        io.write_json(fs, folder, io.MANIFEST_FILE, {
            "status": status, **stats, "config": job.model_dump(mode="json"), "shards": listing,
        })
        summary.rows_out, summary.error_rows = stats["rows"], stats["errors"]
        summary.prompt_tokens, summary.completion_tokens = stats["prompt_tokens"], stats["completion_tokens"]
        key_table = pa.concat_tables(seen)
        del seen
        summary.duplicates, distinct = io.sorted_repeats(key_table, keys)
        summary.missing = max(0, plan.total_rows - distinct)
    else:
        summary.missing = plan.total_rows
    if summary.status == "succeeded" and summary.missing:
        summary.status, summary.message = "incomplete", f"{summary.missing} input ids have no output row"
    if summary.status != "succeeded" and not summary.message.endswith("resume"):
        summary.message += f"; rerun with --resume to finish the remaining {summary.missing} rows"
    return summary
