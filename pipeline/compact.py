"""Output files sized for data tools: small exactly-once commits, compacted into large files.

Layout of an output folder::

    part-00000-<hash>.parquet      output files (up to --target-file-mb / --max-rows-per-file each):
    part-00001-<hash>.parquet      what readers see (the folder, or <output>/*.parquet)
    _staging/part-<hash>.parquet   one content-addressed commit per block, hidden from readers
                                   (pyarrow, pandas, polars and Spark skip ``_``-prefixed paths)

Each block commits one small shard into ``_staging/`` (temp name + rename: ``shards.py``). As the
job goes, the driver appends committed shards to an open output file (``Compactor``); once it
reaches the size or row bound it is sealed:

1. its footer lists the staged shards it holds (``SOURCES_KEY``), and it is closed under a temp
   name inside ``_staging/`` (never visible);
2. one rename puts it at the top level: from now on readers see its rows, and only there;
3. the staged shards it holds are deleted.

A crash between 2 and 3 leaves shards in ``_staging/`` that a visible file already holds; readers
never see them, and ``recover`` (run by ``--resume``) deletes them by the sealed files' footers.
A crash before 2 leaves a temp file (deleted on resume) and the shards, which are compacted again.
So every id is in exactly one visible file or one staged shard at every moment.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
import uuid
from typing import Any, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import io

SOURCES_KEY = b"gpt2_pipeline_sources"
ROW_GROUP_ROWS = 65_536  # rows per row group of an output file: large enough for fast scans
ROW_GROUP_BYTES = 64 * 1024 * 1024  # ... or fewer rows when they are wide (embeddings): bounded memory
HOLD_ENV = "GPT2_PIPELINE_HOLD_COMPACTION"  # test hook: hold after the first sealed file's rename


def sources(fs: pafs.FileSystem, path: str) -> list[str]:
    """The staged shard names a sealed output file holds (from its footer)."""
    with fs.open_input_file(path) as fh:
        meta = pq.read_metadata(fh).metadata or {}
    return json.loads(meta.get(SOURCES_KEY, b"[]"))


def committed_blocks(fs: pafs.FileSystem, folder: str) -> int:
    """Blocks committed so far: staged shards plus those sealed output files hold."""
    staged = {posixpath.basename(p) for p in io.committed_shards(fs, folder)}
    for path in io.output_files(fs, folder):
        staged.update(sources(fs, path))
    return len(staged)


def recover(fs: pafs.FileSystem, folder: str) -> int:
    """After a crash: delete temp files, and staged shards a sealed output file already holds."""
    removed = io.remove_temp_files(fs, folder) + io.remove_temp_files(fs, posixpath.join(folder, io.STAGING))
    staged = {posixpath.basename(p) for p in io.committed_shards(fs, folder)}
    for path in io.output_files(fs, folder):
        for name in staged.intersection(sources(fs, path)):
            fs.delete_file(posixpath.join(folder, io.STAGING, name))
            removed += 1
    return removed


class Compactor:
    """Appends committed shards to the open output file; seals it at ``target_bytes`` or ``max_rows``."""

    def __init__(self, fs: pafs.FileSystem, folder: str, target_bytes: int, max_rows: int):
        self.fs, self.folder = fs, folder
        self.target_bytes, self.max_rows = target_bytes, max_rows
        self.sealed: list[str] = []
        self._seq = len(io.output_files(fs, folder))
        self._reset()

    def _reset(self) -> None:
        self._writer: Optional[pq.ParquetWriter] = None
        self._sink: Any = None
        self._tmp = ""
        self._schema: Optional[pa.Schema] = None
        self._sources: list[str] = []
        self._buffer: list[pa.Table] = []
        self._buffered_rows = self._buffered_bytes = self._buffered_memory = self._rows = 0

    def add(self, name: str) -> None:
        """Append the committed shard ``name`` (in ``_staging/``); seal the file when it is full."""
        path = posixpath.join(self.folder, io.STAGING, name)
        size = self.fs.get_file_info(path).size or 0
        with self.fs.open_input_file(path) as fh:
            table = pq.read_table(fh)
        if self._writer is not None and (self._rows + table.num_rows > self.max_rows
                                         or not table.schema.equals(self._schema, check_metadata=False)):
            self.seal()
        if self._writer is None:
            self._schema = table.schema
            self._tmp = posixpath.join(self.folder, io.STAGING, f".tmp-{uuid.uuid4().hex}.parquet")
            self._sink = self.fs.open_output_stream(self._tmp)
            self._writer = pq.ParquetWriter(self._sink, table.schema, compression="zstd")
        self._buffer.append(table)
        self._buffered_rows += table.num_rows
        self._buffered_bytes += size
        self._buffered_memory += table.nbytes
        self._rows += table.num_rows
        self._sources.append(name)
        if self._buffered_rows >= ROW_GROUP_ROWS or self._buffered_memory >= ROW_GROUP_BYTES:
            self._flush()
        if self._rows >= self.max_rows or self._sink.tell() + self._buffered_bytes >= self.target_bytes:
            self.seal()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.concat_tables(self._buffer).combine_chunks(), row_group_size=ROW_GROUP_ROWS)
        self._buffer, self._buffered_rows, self._buffered_bytes, self._buffered_memory = [], 0, 0, 0

    def seal(self) -> Optional[str]:
        """Close the open file under its final name, then delete the staged shards it holds."""
        if self._writer is None:
            return None
        self._flush()
        self._writer.add_key_value_metadata({SOURCES_KEY: json.dumps(self._sources).encode()})
        self._writer.close()
        self._sink.close()
        digest = hashlib.sha256("\n".join(self._sources).encode()).hexdigest()[:16]
        final = posixpath.join(self.folder, f"{io.SHARD_PREFIX}{self._seq:05d}-{digest}.parquet")
        self.fs.move(self._tmp, final)  # the one step that makes these rows visible
        _hold()
        for name in self._sources:
            self.fs.delete_file(posixpath.join(self.folder, io.STAGING, name))
        self.sealed.append(final)
        self._seq += 1
        self._reset()
        return final

    def close(self) -> None:
        """Drop an unsealed file (its shards stay staged: the next run compacts them)."""
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self.fs.delete_file(self._tmp)
        self._reset()

    def add_staged(self) -> None:
        """Compact the shards left in ``_staging/`` (an earlier run's), then seal what is open."""
        for path in io.committed_shards(self.fs, self.folder):
            self.add(posixpath.basename(path))
        self.seal()


def remove_staging(fs: pafs.FileSystem, folder: str) -> None:
    """After success: ``_staging/`` is empty; remove it (a ``**/*.parquet`` glob finds nothing there)."""
    path = posixpath.join(folder, io.STAGING)
    if fs.get_file_info(path).type == pafs.FileType.Directory and not io.committed_shards(fs, folder):
        fs.delete_dir(path)


def _hold() -> None:
    """Test hook: with $GPT2_PIPELINE_HOLD_COMPACTION set, wait forever after a sealed file's
    rename, before its staged shards are deleted, so a test can kill the job at that moment."""
    while os.environ.get(HOLD_ENV):
        time.sleep(0.1)
