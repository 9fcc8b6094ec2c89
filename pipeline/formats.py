"""Text input formats: JSONL, CSV and OpenAI Batch request files, parsed into Arrow tables.

Each file is read once at planning time with pyarrow's readers (the ones Ray Data's
``read_json`` / ``read_csv`` use) and later staged as Parquet in the output folder
(``io.stage_input``), so read slices, derived ids, resume and the input fingerprint work the same
for every format. A malformed file is a ``ConfigError`` naming the file and the 1-based line.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson

from pipeline.config import ConfigError, InputFormat

EXTENSIONS = {
    InputFormat.parquet: (".parquet", ".pq"),
    InputFormat.jsonl: (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz"),
    InputFormat.csv: (".csv", ".csv.gz"),
    InputFormat.openai_batch: (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
}
# What an OpenAI Batch line may ask for, and the columns its staged table has.
BATCH_URLS = ("/v1/completions", "/v1/embeddings")
BATCH_ID = "custom_id"
BATCH_COLUMNS = (BATCH_ID, "url", "body")


def format_of(path: str) -> Optional[InputFormat]:
    """The format a file extension implies (openai-batch is never implied: it is also .jsonl)."""
    lower = path.lower()
    for fmt in (InputFormat.parquet, InputFormat.jsonl, InputFormat.csv):
        if lower.endswith(EXTENSIONS[fmt]):
            return fmt
    return None


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole file, decompressed if its name ends in .gz (pyarrow detects the codec)."""
    try:
        with fs.open_input_stream(path, compression="detect") as fh:
            return fh.read()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"cannot read {path!r}: {exc}") from None


def parse(data: bytes, fmt: InputFormat, name: str, prompt_column: str) -> pa.Table:
    """One text file as a table. Raises ConfigError '<name> line <n>: <what is wrong>'."""
    if fmt == InputFormat.openai_batch:
        return _parse_batch(data, name)
    if fmt == InputFormat.jsonl:
        read: Callable[[bytes], pa.Table] = lambda b: pajson.read_json(pa.BufferReader(b))
    else:
        convert = pacsv.ConvertOptions(column_types={prompt_column: pa.string()})  # "1" stays a prompt text
        read = lambda b: pacsv.read_csv(pa.BufferReader(b), convert_options=convert)
    if not data.strip():
        raise ConfigError(f"{name} is empty")
    try:
        return read(data)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        line, why = _first_bad_line(data, read, fmt)
        raise ConfigError(f"{name} line {line}: {why or _arrow_message(exc)}") from None


def _arrow_message(exc: Exception) -> str:
    msg = str(exc).split("\n")[0]
    return msg.rsplit(" in row ", 1)[0]  # pyarrow's row numbers are per block: the line number replaces them


def _first_bad_line(data: bytes, read: Callable[[bytes], pa.Table], fmt: InputFormat) -> tuple[int, str]:
    """Only on failure: the 1-based line where the file stops parsing, and why if JSON says so.

    Bisects on line prefixes (a prefix of good lines parses), so type changes between lines are
    found as well as syntax errors; O(log lines) parses.
    """
    lines = data.split(b"\n")
    if fmt == InputFormat.jsonl:
        for i, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except ValueError as exc:
                return i, f"not valid JSON ({exc})"
            if not isinstance(value, dict):
                return i, f"not a JSON object (got {type(value).__name__})"
    lo, hi = 0, len(lines)  # prefix of lo lines parses; of hi lines fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            read(b"\n".join(lines[:mid]) + b"\n")
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            hi = mid
    try:
        read(b"\n".join(lines[:hi]) + b"\n")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        return hi, _arrow_message(exc)
    return hi, ""


def _parse_batch(data: bytes, name: str) -> pa.Table:
    """OpenAI Batch lines: {custom_id, method: POST, url, body}; the body stays JSON text, checked
    later by the endpoint's own request model (a bad body is a 400 answer, not a failed job)."""
    cols: dict[str, list[Any]] = {c: [] for c in BATCH_COLUMNS}
    for i, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            custom_id, url, body = batch_line(raw)
        except ValueError as exc:
            raise ConfigError(f"{name} line {i}: {exc}") from None
        cols[BATCH_ID].append(custom_id)
        cols["url"].append(url)
        cols["body"].append(json.dumps(body))
    if not cols[BATCH_ID]:
        raise ConfigError(f"{name} holds no requests")
    return pa.table({c: pa.array(v, pa.string()) for c, v in cols.items()})


def batch_line(raw: bytes) -> tuple[str, str, dict]:
    """One OpenAI Batch request line as (custom_id, url, body); ValueError says what is wrong."""
    try:
        line = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(line, dict):
        raise ValueError("not a JSON object")
    custom_id, method, url, body = (line.get(k) for k in ("custom_id", "method", "url", "body"))
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError(f"custom_id must be a non-empty string, got {custom_id!r}")
    if method != "POST":
        raise ValueError(f"method must be POST, got {method!r}")
    if url not in BATCH_URLS:
        raise ValueError(f"url {url!r} is not supported; use {' or '.join(BATCH_URLS)}")
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object (the request)")
    unknown = sorted(set(line) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}")
    return custom_id, url, body


def staged_name(index: int) -> str:
    return posixpath.join("_input", f"{index:05d}.parquet")
