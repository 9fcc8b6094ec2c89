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


def blocks_per_replica(max_num_seqs: int, batch_size: int) -> int:
    """Blocks each replica runs at once: enough rows to fill the engine's batch, plus one block
    already inside when another finishes, so the paged-attention scheduler never drains."""
    return max(MIN_BLOCKS_PER_REPLICA, min(MAX_BLOCKS_PER_REPLICA, -(-max_num_seqs // batch_size) + 1))


def read_items(items: list[dict], fs: Any, schema: pa.Schema, id_column: str) -> pa.Table:
    """The rows of some slices, less their ``drop`` rows (repeated ids under --dedupe first, and
    ids a previous run committed)."""
    tables = []
    for item in items:
        t = io.read_fragment(fs, io.Fragment(**item["fragment"]), schema, id_column).slice(item["start"], item["length"])
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
