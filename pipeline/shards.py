"""A job's shared block path, beneath both executors: read a slice's rows, commit a processed
block as one content-addressed shard.

The inline executor (``inline.py``, driven by ``batch.py``) and the Ray Data executor
(``ray_executor.py``) call the same functions, so shard names, exactly-once and resume do not
depend on who ran a block.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import compact, io
from pipeline.records import ID, block_precision, summarize

HOLD_ENV = "GPT2_PIPELINE_HOLD_AFTER_SHARDS"
READY_KEY = b"gpt2_pipeline_engine_ready"  # block metadata: when the engine that ran it was ready (unix s)
MIN_BLOCKS_PER_REPLICA = 4
MAX_BLOCKS_PER_REPLICA = 32
BLOCK_ROWS = 1024  # rows per block of a big job (several slices): one read, engine call and shard each
# The inline executor groups slices only past this many blocks: progress and commits stay per
# slice on small jobs. A 50,000-row job of one-token rows (demo, 2026-12-02): 33.8 s of
# generation in slices of 64 rows, 30.9 s in blocks of 1,024 (raw vLLM's LLM.generate: 31.0 s).
INLINE_MIN_BLOCKS = 64


def blocks_per_replica(max_num_seqs: int, batch_size: int) -> int:
    """Blocks each replica runs at once: enough rows to fill the engine's batch, plus one block
    already inside when another finishes, so the paged-attention scheduler never drains."""
    return max(MIN_BLOCKS_PER_REPLICA, min(MAX_BLOCKS_PER_REPLICA, -(-max_num_seqs // batch_size) + 1))


class RecentRowGroups:
    """One job's row groups read last, so its slices, which walk each row group in order, decode
    it once instead of once per slice (a 64-row slice of a 65,536-row group: 2.7 ms a read here).
    Thread-safe (the inline executor reads in worker threads); at most ``KEEP`` groups and
    ``KEEP_BYTES`` held. Scoped to one job: an input file rewritten between two jobs is read again."""

    KEEP = 2
    KEEP_BYTES = 256 * 1024 * 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: OrderedDict[tuple, pa.Table] = OrderedDict()

    def read(self, fs: Any, fragment: dict, schema: pa.Schema, id_column: str) -> pa.Table:
        key = (fs.type_name, fragment["path"], fragment["row_group"], id_column, schema)
        with self._lock:
            table = self._tables.get(key)
        if table is None:
            table = io.read_fragment(fs, io.Fragment(**fragment), schema, id_column)
            with self._lock:
                self._tables[key] = table
                while len(self._tables) > self.KEEP or (
                        len(self._tables) > 1 and sum(t.nbytes for t in self._tables.values()) > self.KEEP_BYTES):
                    self._tables.popitem(last=False)
        return table


def group_slices(slices: list[dict], batch_size: int, replicas: int,
                 min_blocks: int = MIN_BLOCKS_PER_REPLICA) -> list[list[dict]]:
    """Consecutive slices per block: up to ``BLOCK_ROWS`` rows, so the per-block costs (a Ray
    task, an engine call, a committed shard) are paid per thousand rows, not per slice, while
    every replica keeps at least ``min_blocks`` blocks (a small job: one block per slice)."""
    per = max(1, min(BLOCK_ROWS // batch_size, len(slices) // (min_blocks * replicas)))
    return [slices[i:i + per] for i in range(0, len(slices), per)]


def read_items(items: list[dict], fs: Any, schema: pa.Schema, id_column: str,
               recent: Optional[RecentRowGroups] = None) -> pa.Table:
    """The rows of some slices, less their ``drop`` rows (repeated ids under --dedupe first, and
    ids a previous run committed). ``recent``: the job's row groups read last (else this call's)."""
    recent = recent or RecentRowGroups()
    tables = []
    for item in items:
        t = recent.read(fs, item["fragment"], schema, id_column).slice(item["start"], item["length"])
        if item.get("drop"):
            keep = np.ones(t.num_rows, dtype=bool)
            keep[item["drop"]] = False
            t = t.filter(pa.array(keep))
        tables.append(t)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def commit_block(block: pa.Table, fs: Any, folder: str, id_column: str, metadata: dict,
                 stop: Optional[threading.Event] = None) -> dict[str, Any]:
    """Write one processed block as a shard; its stats for progress (and when its engine was ready)."""
    ready = (block.schema.metadata or {}).get(READY_KEY)
    precision = block_precision(block)
    block = block.replace_schema_metadata(None)
    _hold(fs, folder, stop)
    name = io.write_shard(fs, folder, block, id_column, metadata)
    stats = summarize(block)
    stats["inputs"] = len(pc.unique(block[ID]))
    return {"shard": name, **stats, "engine_ready": float(ready) if ready else None, **precision}


def _hold(fs: Any, folder: str, stop: Optional[threading.Event]) -> None:
    """Test hook: with $GPT2_PIPELINE_HOLD_AFTER_SHARDS=N, writes wait while N blocks are committed
    (staged or compacted), so fault tests interrupt a job in a known state instead of racing it.
    Off unless set.
    ``stop`` (inline executor) ends the wait when the job ends: nothing is written after it."""
    limit = os.environ.get(HOLD_ENV)
    while limit and compact.committed_blocks(fs, folder) >= int(limit):
        if stop is not None and stop.wait(0.1):
            raise RuntimeError("the job stopped")
        time.sleep(0 if stop is not None else 0.1)
