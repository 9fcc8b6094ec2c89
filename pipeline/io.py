"""Parquet in and out: plan the input (before any engine starts), read it as row groups,
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
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import ROW_OVERRIDE_FIELDS, ConfigError
from pipeline.records import ID

SHARD_PREFIX = "part-"
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
    total_rows: int
    fingerprint: str

    @property
    def id_type(self) -> pa.DataType:
        return self.schema.field(ID).type


def _list_files(fs: pafs.FileSystem, path: str, uri: str) -> tuple[list[str], str]:
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
        return files, root
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        return [path], posixpath.dirname(path)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        i.path for i in infos
        if i.is_file and i.path.endswith((".parquet", ".pq"))
        and not any(part.startswith(("_", ".")) for part in posixpath.relpath(i.path, path).split("/"))
    )
    if not files:
        raise ConfigError(f"input folder {uri!r} holds no .parquet files")
    return files, path


def plan_input(uri: str, prompt_column: str, id_column: str, passthrough: list[str]) -> InputPlan:
    """Read only metadata: list files, check columns and types, count rows. Raises ConfigError."""
    fs, path = filesystem(uri)
    files, root = _list_files(fs, path, uri)
    fragments: list[Fragment] = []
    schema: Optional[pa.Schema] = None
    digest = hashlib.sha256()
    for f in files:
        try:
            with fs.open_input_file(f) as fh:
                meta = pq.ParquetFile(fh).metadata
        except (pa.ArrowInvalid, OSError) as exc:
            raise ConfigError(f"{f!r} is not a readable Parquet file: {exc}") from None
        file_schema = meta.schema.to_arrow_schema()
        if schema is None:
            schema = file_schema
            missing = [c for c in [prompt_column, *passthrough] if c not in schema.names]
            if missing:
                raise ConfigError(
                    f"input has no column {', '.join(map(repr, missing))}; its columns are: {', '.join(schema.names)}"
                )
        elif prompt_column not in file_schema.names:
            raise ConfigError(f"{f!r} has no column {prompt_column!r}; its columns are: {', '.join(file_schema.names)}")
        name = posixpath.relpath(f, root)
        offset = 0
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            if rows:
                fragments.append(Fragment(f, name, rg, offset, rows))
            offset += rows
        digest.update(f"{name}:{meta.num_rows}:{meta.serialized_size}\n".encode())
    assert schema is not None  # _list_files returns at least one file
    id_type = schema.field(id_column).type if id_column in schema.names else pa.string()
    if pa.types.is_floating(id_type) or pa.types.is_nested(id_type):
        raise ConfigError(f"id column {id_column!r} has type {id_type}; use integers or strings")
    fields = [pa.field(ID, id_type)] + [schema.field(c) for c in dict.fromkeys([prompt_column, *passthrough])]
    fields += [schema.field(c) for c in ROW_OVERRIDE_FIELDS if c in schema.names and c not in passthrough]
    total = sum(fr.rows for fr in fragments)
    return InputPlan(fs, fragments, pa.schema(fields), total, digest.hexdigest()[:16])


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
        ids = pa.array([f"{fr.name}#{fr.offset + i}" for i in range(table.num_rows)], pa.string())
    cols = [ids] + [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema if f.name != ID
    ]
    return pa.Table.from_arrays(cols, schema=schema)


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
    fs.create_dir(path, recursive=True)
    return fs, path


def shard_name(table: pa.Table) -> str:
    """Content-addressed: a retried batch rewrites the same file instead of adding a duplicate."""
    h = hashlib.sha256()
    for col in (ID, "sample_index"):
        if col in table.column_names:
            h.update("\x1f".join(map(str, table[col].to_pylist())).encode() + b"\x1e")
    return f"{SHARD_PREFIX}{h.hexdigest()[:24]}.parquet"


def finalize_columns(table: pa.Table, id_column: str, metadata: dict[bytes, bytes]) -> pa.Table:
    table = table.rename_columns([id_column if c == ID else c for c in table.column_names])
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})


def write_shard(fs: pafs.FileSystem, folder: str, table: pa.Table, id_column: str, metadata: dict[bytes, bytes]) -> str:
    """Write ``table`` to a temp name, then rename: readers never see a partial shard."""
    name = shard_name(table)
    final = posixpath.join(folder, name)
    tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
    pq.write_table(finalize_columns(table, id_column, metadata), tmp, filesystem=fs, compression="zstd")
    fs.move(tmp, final)
    return name


def committed_shards(fs: pafs.FileSystem, folder: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.path for i in infos if i.is_file and posixpath.basename(i.path).startswith(SHARD_PREFIX))


def committed_ids(fs: pafs.FileSystem, folder: str, id_column: str) -> Optional[pa.Array]:
    """Distinct ids in committed shards (temp files of a dead run are ignored), or None."""
    arrays = []
    for path in committed_shards(fs, folder):
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
