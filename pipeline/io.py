"""Parquet in and out: plan the input (before any engine starts; JSONL/CSV/OpenAI Batch files are
parsed by ``pipeline.formats`` and staged as Parquet), read it as row groups,
write output shards atomically, and keep the manifest that resume and readers rely on.

Paths may be local, ``file://``, or any URI pyarrow's filesystems take (s3://, gs://, ...).
"""

from __future__ import annotations

import fnmatch
import os
import hashlib
import json
import posixpath
import uuid
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import formats
from pipeline.config import ROW_OVERRIDE_FIELDS, ConfigError, Dedupe, InputFormat
from pipeline.records import ID

SHARD_PREFIX = "part-"
STAGING = "_staging"  # small commits, hidden from readers until compacted (compact.py)
JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
SUMMARY_FILE = "_summary.json"
SUCCESS_FILE = "_SUCCESS"
METADATA_KEY = b"gpt2_pipeline"
_GLOB = set("*?[")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), posixpath.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError, OSError) as exc:
        raise ConfigError(f"cannot open {uri!r}: {exc}") from None


@dataclass(frozen=True)
class Fragment:
    """One row group of one input file: the unit a read task handles."""

    path: str
    name: str  # path relative to the input root; part of derived ids
    row_group: int
    offset: int  # index of the row group's first row in its file
    rows: int


@dataclass
class InputPlan:
    fs: pafs.FileSystem
    fragments: list[Fragment]
    schema: pa.Schema
    total_rows: int  # distinct ids to answer (rows dropped by dedupe are not counted)
    fingerprint: str
    format: InputFormat = InputFormat.parquet
    id_column: str = "id"
    staged: list[tuple[str, pa.Table]] = field(default_factory=list)  # text inputs, until stage_input
    dropped: dict[str, list[int]] = field(default_factory=dict)  # file name -> row indices dedupe drops
    deduplicated: int = 0

    has_id_column: bool = True

    @property
    def id_type(self) -> pa.DataType:
        return self.schema.field(ID).type


def _list_files(fs: pafs.FileSystem, path: str, uri: str, fmt: InputFormat) -> tuple[list[str], str, InputFormat]:
    """The input files, their root, and their format (``auto``: from the extensions found)."""
    if any(ch in _GLOB for ch in path):
        root = path[: min(path.index(ch) for ch in _GLOB if ch in path)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        depth = path.count("/")  # '*' stays within one folder; '**' may cross folders
        files = sorted(
            i.path for i in infos
            if i.is_file and fnmatch.fnmatchcase(i.path, path) and ("**" in path or i.path.count("/") == depth)
        )
        if not files:
            raise ConfigError(f"no files match {uri!r}")
        return files, root, _one_format(files, fmt, uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        return [path], posixpath.dirname(path), _one_format([path], fmt, uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    visible = sorted(
        i.path for i in infos
        if i.is_file and not any(part.startswith(("_", ".")) for part in posixpath.relpath(i.path, path).split("/"))
    )
    if fmt == InputFormat.auto:  # a folder takes the files of the one format it holds
        found = {formats.format_of(f) for f in visible} - {None}
        if len(found) > 1:
            names = ", ".join(sorted(InputFormat(f).value for f in found))
            raise ConfigError(f"input folder {uri!r} holds {names} files; pass --input-format to pick one")
        fmt = found.pop() if found else InputFormat.parquet
    files = [f for f in visible if f.lower().endswith(formats.EXTENSIONS[fmt])]
    if not files:
        raise ConfigError(f"input folder {uri!r} holds no {formats.EXTENSIONS[fmt][0]} files")
    return files, path, fmt


def _one_format(files: list[str], fmt: InputFormat, uri: str) -> InputFormat:
    if fmt != InputFormat.auto:
        return fmt
    found = {formats.format_of(f) for f in files}
    if found == {None}:
        return InputFormat.parquet  # no known extension: Parquet, as before (a clear error if it is not)
    if len(found) > 1:
        raise ConfigError(f"{uri!r} matches files of several formats; pass --input-format to pick one")
    return found.pop() or InputFormat.parquet


def plan_input(uri: str, prompt_column: str, id_column: str, passthrough: list[str],
               input_format: InputFormat | str = InputFormat.auto, dedupe: Dedupe | str = Dedupe.refuse,
               check_ids: bool = True) -> InputPlan:
    """List files, check columns and types, count rows, find duplicate ids. Raises ConfigError.

    Parquet: only metadata and the id column are read. Text formats are parsed whole (errors
    carry the line number); their tables wait in ``plan.staged`` until ``stage_input``.
    ``check_ids=False``: leave the duplicate-id check to a later ``find_duplicates(plan, dedupe)``.
    """
    fs, path = filesystem(uri)
    files, root, fmt = _list_files(fs, path, uri, InputFormat(input_format))
    if fmt == InputFormat.openai_batch:
        prompt_column, id_column, passthrough = "body", formats.BATCH_ID, ["url"]
    fragments: list[Fragment] = []
    staged: list[tuple[str, pa.Table]] = []
    schema: Optional[pa.Schema] = None
    digest = hashlib.sha256()
    for f in files:
        name = posixpath.relpath(f, root)
        if fmt == InputFormat.parquet:
            try:
                with fs.open_input_file(f) as fh:
                    meta = pq.ParquetFile(fh).metadata
            except (pa.ArrowInvalid, OSError) as exc:
                raise ConfigError(f"{f!r} is not a readable Parquet file: {exc}") from None
            file_schema = meta.schema.to_arrow_schema()
            offset = 0
            for rg in range(meta.num_row_groups):
                rows = meta.row_group(rg).num_rows
                if rows:
                    fragments.append(Fragment(f, name, rg, offset, rows))
                offset += rows
            digest.update(f"{name}:{meta.num_rows}:{meta.serialized_size}\n".encode())
        else:
            data = formats.read_bytes(fs, f)
            table = formats.parse(data, fmt, name, prompt_column)
            staged.append((name, table))
            file_schema = table.schema
            digest.update(f"{name}:{table.num_rows}:{hashlib.sha256(data).hexdigest()}\n".encode())
        if schema is None:
            schema = file_schema
            missing = [c for c in [prompt_column, *passthrough] if c not in schema.names]
            if missing:
                hint = " (an OpenAI Batch file? pass --input-format openai-batch)" if "custom_id" in schema.names else ""
                raise ConfigError(
                    f"input has no column {', '.join(map(repr, missing))}; its columns are: {', '.join(schema.names)}{hint}"
                )
        elif prompt_column not in file_schema.names:
            raise ConfigError(f"{f!r} has no column {prompt_column!r}; its columns are: {', '.join(file_schema.names)}")
    assert schema is not None  # _list_files returns at least one file
    id_type = schema.field(id_column).type if id_column in schema.names else pa.string()
    if pa.types.is_floating(id_type) or pa.types.is_nested(id_type):
        raise ConfigError(f"id column {id_column!r} has type {id_type}; use integers or strings")
    fields = [pa.field(ID, id_type)] + [schema.field(c) for c in dict.fromkeys([prompt_column, *passthrough])]
    fields += [schema.field(c) for c in ROW_OVERRIDE_FIELDS if c in schema.names and c not in passthrough]
    total = sum(fr.rows for fr in fragments) + sum(t.num_rows for _, t in staged)
    plan = InputPlan(fs, fragments, pa.schema(fields), total, digest.hexdigest()[:16], fmt, id_column, staged,
                     has_id_column=id_column in schema.names)
    if check_ids:
        find_duplicates(plan, dedupe)
    return plan


def file_ids(plan: InputPlan) -> Iterator[tuple[str, pa.Array]]:
    """(name, ids) per input file with rows, in input order (the order of ``plan.fragments``):
    only the id column is read, or the ids are derived (``<file>#<row>``)."""
    if plan.staged:
        for name, t in plan.staged:
            ids = t[plan.id_column] if plan.id_column in t.column_names else derived_ids(name, 0, t.num_rows)
            yield name, ids.cast(plan.id_type).combine_chunks()
        return
    files = {fr.path: (fr.name, fr.offset + fr.rows) for fr in plan.fragments}  # in order; rows: the last end
    for path, (name, rows) in files.items():
        if not plan.has_id_column:
            yield name, derived_ids(name, 0, rows)
            continue
        with plan.fs.open_input_file(path) as fh:
            table = pq.read_table(fh, columns=[plan.id_column])
        yield name, table[plan.id_column].cast(plan.id_type).combine_chunks()


def sorted_repeats(table: pa.Table, keys: list[str]) -> tuple[int, int]:
    """Exact, by sorting (a third of a hash table's memory: 10M ids about 0.4 GB against 1.2 GB;
    2M output keys 46 MiB against 320 MiB): (rows whose ``keys`` equal the previous row's after
    the sort, distinct values of ``keys[0]``)."""
    n = table.num_rows
    if n < 2:
        return 0, n
    ordered = table.select(keys).take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys]))
    later, earlier = ordered.slice(1), ordered.slice(0, n - 1)
    same = [pc.equal(later[k], earlier[k]) for k in keys]
    first_same = int(pc.sum(same[0]).as_py() or 0)
    all_same = same[0]
    for more in same[1:]:
        all_same = pc.and_(all_same, more)
    return int(pc.sum(all_same).as_py() or 0), n - first_same


def _has_repeats(ids: pa.ChunkedArray) -> bool:
    """Exact; the hash aggregation below runs only when there are repeats."""
    return sorted_repeats(pa.table({"id": ids}), ["id"])[0] > 0


def find_duplicates(plan: InputPlan, dedupe: Dedupe | str) -> None:
    """Refuse duplicate ids (with examples), or mark all but each id's first row to be dropped."""
    if not plan.has_id_column:
        return  # derived ids are distinct
    dedupe = Dedupe(dedupe)
    per_file = list(file_ids(plan))
    ids = pa.chunked_array([a for _, a in per_file], plan.id_type) if per_file else pa.chunked_array([], plan.id_type)
    if not _has_repeats(ids):
        return
    table = pa.table({"id": ids, "i": pa.array(np.arange(len(ids), dtype=np.int64))})
    groups = table.group_by("id", use_threads=False).aggregate([("i", "min"), ("i", "count")])
    if groups.num_rows == table.num_rows:
        return
    dup = groups.filter(pc.greater(groups["i_count"], 1)).sort_by("i_min")
    extra = table.num_rows - groups.num_rows
    if dedupe != Dedupe.first:
        examples = ", ".join(repr(v) for v in dup["id"].slice(0, 3).to_pylist())
        raise ConfigError(
            f"input has {dup.num_rows} duplicate ids ({extra} extra rows; e.g. {examples}); "
            "pass --dedupe first to keep the first row of each"
        )
    keep = pc.is_in(table["i"], value_set=groups["i_min"])
    dropped = table["i"].filter(pc.invert(keep)).to_numpy()  # the repeated rows only
    start = 0
    for name, a in per_file:
        local = dropped[(dropped >= start) & (dropped < start + len(a))] - start
        if len(local):
            plan.dropped[name] = local.tolist()
        start += len(a)
    plan.deduplicated = extra
    plan.total_rows -= extra


def stage_input(plan: InputPlan, fs: pafs.FileSystem, folder: str) -> None:
    """Text inputs: write each parsed file as ``<output>/_input/<n>.parquet`` (temp + rename) and
    point the plan's fragments at them; a rerun or resume rewrites the same files."""
    if not plan.staged:
        return
    fs.create_dir(posixpath.join(folder, "_input"), recursive=True)
    plan.fragments = []
    for n, (name, table) in enumerate(plan.staged):
        final = posixpath.join(folder, formats.staged_name(n))
        tmp = posixpath.join(folder, "_input", f".tmp-{uuid.uuid4().hex}.parquet")
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, final)
        with fs.open_input_file(final) as fh:
            meta = pq.ParquetFile(fh).metadata
        offset = 0
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            if rows:
                plan.fragments.append(Fragment(final, name, rg, offset, rows))
            offset += rows
    plan.fs = fs


def remove_staged_input(fs: pafs.FileSystem, folder: str) -> None:
    """After success: drop the staged text input (``--resume`` of a finished job does not need it)."""
    path = posixpath.join(folder, posixpath.dirname(formats.staged_name(0)))
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def read_fragment(fs: pafs.FileSystem, fr: Fragment, schema: pa.Schema, id_column: str) -> pa.Table:
    """One row group with only the needed columns and an ``__id`` column (given or derived)."""
    wanted = [f.name for f in schema if f.name != ID]
    with fs.open_input_file(fr.path) as fh:
        pf = pq.ParquetFile(fh)
        have = pf.schema_arrow.names
        table = pf.read_row_group(fr.row_group, columns=[c for c in dict.fromkeys(wanted + [id_column]) if c in have])
    if id_column in table.column_names:
        ids = table[id_column].cast(schema.field(ID).type)
    else:
        ids = derived_ids(fr.name, fr.offset, table.num_rows)
    cols = [ids] + [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema if f.name != ID
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def derived_ids(name: str, offset: int, rows: int) -> pa.Array:
    """``<file>#<row>`` ids of an input without an id column (built in Arrow, not per row in Python)."""
    rows_ = pc.cast(pa.array(np.arange(offset, offset + rows, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(pa.scalar(f"{name}#"), rows_, "")


# ---- output ----------------------------------------------------------------------------------
def prepare_output(uri: str, overwrite: bool, resume: bool) -> tuple[pafs.FileSystem, str]:
    """Create the output folder; refuse a non-empty one unless overwrite (cleared) or resume."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"output {uri!r} is a file; give a folder")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(path)):
        if overwrite:
            fs.delete_dir_contents(path)
        elif not resume:
            raise ConfigError(f"output folder {uri!r} is not empty; pass --overwrite to replace it or --resume to continue")
    fs.create_dir(posixpath.join(path, STAGING), recursive=True)
    return fs, path


def shard_name(table: pa.Table) -> str:
    """Content-addressed: a retried batch rewrites the same file instead of adding a duplicate.
    Hashes the ids (and sample indices) as Arrow IPC bytes: no Python object per row."""
    cols = [c for c in (ID, "sample_index") if c in table.column_names]
    keys = pa.table([table[c].combine_chunks() for c in cols], names=cols)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, keys.schema) as writer:
        writer.write_table(keys)
    return f"{SHARD_PREFIX}{hashlib.sha256(sink.getvalue()).hexdigest()[:24]}.parquet"


def finalize_columns(table: pa.Table, id_column: str, metadata: dict[bytes, bytes]) -> pa.Table:
    table = table.rename_columns([id_column if c == ID else c for c in table.column_names])
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})


def write_shard(fs: pafs.FileSystem, folder: str, table: pa.Table, id_column: str, metadata: dict[bytes, bytes]) -> str:
    """Write ``table`` into ``_staging/`` under a temp name, then rename: never a partial shard."""
    name = shard_name(table)
    staging = posixpath.join(folder, STAGING)
    final = posixpath.join(staging, name)
    tmp = posixpath.join(staging, f".tmp-{uuid.uuid4().hex}-{name}")
    pq.write_table(finalize_columns(table, id_column, metadata), tmp, filesystem=fs, compression="zstd")
    fs.move(tmp, final)
    return name


def committed_shards(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Committed shards not compacted yet (in ``_staging/``)."""
    infos = fs.get_file_info(pafs.FileSelector(posixpath.join(folder, STAGING), allow_not_found=True))
    return sorted(i.path for i in infos if i.is_file and posixpath.basename(i.path).startswith(SHARD_PREFIX))


def output_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """The visible output files (sealed, at the top level of the output folder)."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.path for i in infos if i.is_file and posixpath.basename(i.path).startswith(SHARD_PREFIX))


def committed_ids(fs: pafs.FileSystem, folder: str, id_column: str) -> Optional[pa.Array]:
    """Distinct ids in output files and staged shards (temp files of a dead run are ignored), or None."""
    arrays = []
    for path in output_files(fs, folder) + committed_shards(fs, folder):
        with fs.open_input_file(path) as fh:
            arrays.append(pq.read_table(fh, columns=[id_column])[id_column].combine_chunks())
    if not arrays:
        return None
    return pc.unique(pa.chunked_array(arrays).combine_chunks())


def remove_temp_files(fs: pafs.FileSystem, folder: str) -> int:
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    temps = [i.path for i in infos if i.is_file and posixpath.basename(i.path).startswith(".tmp-")]
    for p in temps:
        fs.delete_file(p)
    return len(temps)


def write_json(fs: pafs.FileSystem, folder: str, name: str, data: Any) -> None:
    tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
    with fs.open_output_stream(tmp) as out:
        out.write(json.dumps(data, indent=2, default=str).encode())
    fs.move(tmp, posixpath.join(folder, name))


def read_json(fs: pafs.FileSystem, folder: str, name: str) -> Optional[Any]:
    path = posixpath.join(folder, name)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read())
