"""The Ray Data executor: blocks of slices → an actor pool; each actor reads, runs and commits.

Used for several engine replicas and on clusters. Each block is a run of consecutive slices of
the input (``shards.group_slices``: about ``BLOCK_ROWS`` rows). An actor reads its block's rows,
runs them through its engine (or a Serve application, or the OpenAI Batch answerer) and commits
the shard itself, as the inline executor does in one process: only the slices' descriptions go
in and one stats row per shard comes back, so no rows cross Ray's object store and no read or
write task (each a worker process at start-up) competes with the engine for the cores. The
actors are async, so several blocks are inside one engine at once. Reading, the shard writer
(``shards.py``) and the row contract (``records.py``) are shared with the inline executor; a
block an actor's death interrupts runs again on its successor, and its shard's content-addressed
name keeps the commit exactly once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Optional

import pyarrow as pa

from pipeline import io
from pipeline.config import EngineConfig, JobConfig
from pipeline.records import RowSpec, process_batch
from pipeline.shards import READY_KEY, RecentRowGroups, blocks_per_replica, commit_block, group_slices, read_items


class _BlockActor:
    """Read a block's slices, run them through ``process``, commit the shard; return its stats."""

    def __init__(self, process: Callable[[pa.Table], Awaitable[pa.Table]], read: dict, write: dict,
                 ready: Optional[dict] = None):
        self.process, self.read, self.write, self.ready = process, read, write, ready or {}
        self.recent = RecentRowGroups()  # this actor's blocks walk row groups in order

    async def __call__(self, items: pa.Table) -> pa.Table:
        slices = [s for row in items.column("slices").to_pylist() for s in json.loads(row)]
        rows = await asyncio.to_thread(read_items, slices, recent=self.recent, **self.read)
        if rows.num_rows == 0:  # every row committed already (resume) or dropped as a repeat
            return pa.Table.from_pylist([])
        out = await self.process(rows)
        out = out.replace_schema_metadata({**(out.schema.metadata or {}), **self.ready})
        return pa.Table.from_pylist([await asyncio.to_thread(commit_block, out, **self.write)])


def _passive_omp_waits(engine: EngineConfig) -> None:
    """A CPU engine actor's OpenMP threads wait passively (``engine.args.short_omp_waits``):
    set before this process imports torch, which starts OpenMP."""
    from pipeline.engine.args import short_omp_waits  # neither torch nor vLLM

    if "torch" not in sys.modules:
        short_omp_waits(cpu=not engine.gpus_per_replica)


class EngineActor(_BlockActor):
    """One engine replica (in this actor's process)."""

    def __init__(self, engine_config: EngineConfig, spec: RowSpec, read: dict, write: dict):
        _passive_omp_waits(engine_config)
        from pipeline.engine import PRIORITY_BATCH, Engine

        engine = Engine(engine_config, spec.task, in_process=True)

        async def process(rows: pa.Table) -> pa.Table:
            return await process_batch(engine, rows, spec, PRIORITY_BATCH)

        # the job's phase breakdown reads when the engine was ready from the shard's stats
        super().__init__(process, read, write, {READY_KEY: str(time.time()).encode()})


class BatchActor(_BlockActor):
    """An OpenAI Batch file's rows are requests, answered as the endpoint answers them."""

    def __init__(self, engine_config: EngineConfig, urls: list[str], read: dict, write: dict):
        _passive_omp_waits(engine_config)
        from pipeline.openai_batch import BatchRequestActor

        super().__init__(BatchRequestActor(engine_config, urls), read, write)


class ServeClient(_BlockActor):
    """Sends each block to a running Serve application's replicas (the same engine class)."""

    def __init__(self, app_name: str, spec: RowSpec, job_id: str, read: dict, write: dict):
        from ray import serve

        handle = serve.get_app_handle(app_name)

        async def process(rows: pa.Table) -> pa.Table:
            return await handle.process_batch.remote(rows, spec, job_id)

        super().__init__(process, read, write)


def stream(job: JobConfig, spec: RowSpec, plan: io.InputPlan, slices: list[dict], write: dict,
           verbose: bool, clock: Any, batch_urls: Optional[list[str]]) -> Iterator[dict]:
    """The Ray Data executor: blocks of slices → the actor pool; one stats row per committed shard."""
    from pipeline.runtime import init_ray

    # --via-serve needs the cluster that runs the Serve app: join the running one, never start one.
    init_ray(job.address or ("auto" if job.via_serve else None), job.num_cpus, verbose)
    clock.mark("ray_start")
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    groups = group_slices(slices, job.batch_size, job.engine.replicas)
    ds = ray.data.from_items([{"slices": json.dumps(g)} for g in groups], override_num_blocks=len(groups))
    read = {"fs": plan.fs, "schema": plan.schema, "id_column": job.id_column}
    ds = _engine_stage(ds, job, spec, batch_urls, block_rows=len(groups[0]) * job.batch_size, read=read, write=write)
    for row in ds.iter_rows():
        yield dict(row)


def _engine_stage(ds: Any, job: JobConfig, spec: RowSpec, batch_urls: Optional[list[str]], block_rows: int,
                  read: dict, write: dict) -> Any:
    import ray.data

    from pipeline.runtime import ray_address, replica_resources

    # The actors are async: concurrent calls put several blocks inside one engine at once.
    blocks = blocks_per_replica(job.engine.max_num_seqs, block_rows)
    compute = ray.data.ActorPoolStrategy(
        size=job.engine.replicas, max_tasks_in_flight_per_actor=blocks, max_concurrent_calls_per_actor=blocks,
    )
    blocks_io = {"read": read, "write": write}
    if job.via_serve:
        return ds.map_batches(
            ServeClient, batch_size=None, batch_format="pyarrow", compute=compute, num_cpus=0.1,
            fn_constructor_kwargs={"app_name": job.via_serve, "spec": spec, "job_id": job.output, **blocks_io},
        )
    if batch_urls is not None:  # an OpenAI Batch file: rows are requests, answered like the endpoint
        actor, kwargs = BatchActor, {"engine_config": job.engine, "urls": batch_urls}
    else:
        actor, kwargs = EngineActor, {"engine_config": job.engine, "spec": spec}
    resources = replica_resources(job.engine, embedded=ray_address(job.address) is None)
    # One block (a run of slices, one row of ``ds``) per call; Ray Data insists on an explicit
    # batch size when GPUs are requested.
    return ds.map_batches(
        actor, batch_size=1 if resources["num_gpus"] else None, batch_format="pyarrow", compute=compute,
        num_cpus=resources["num_cpus"], num_gpus=resources["num_gpus"] or None,
        fn_constructor_kwargs={**kwargs, **blocks_io},
    )  # Ray Data restarts dead engine actors and retries their blocks (max_restarts=-1 by default)


