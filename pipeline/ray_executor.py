"""The Ray Data executor: read tasks → an actor pool of engines (or Serve clients) → write tasks.

Used for several engine replicas and on clusters. Each block is a run of consecutive slices of
the input (``shards.group_slices``: about ``BLOCK_ROWS`` rows); the actors are async, so several blocks
are inside one engine at once. Reading and the shard writer
(``shards.py``) and the row contract (``records.py``) are shared with the inline executor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Optional

import pyarrow as pa

from pipeline import io
from pipeline.config import EngineConfig, JobConfig
from pipeline.records import RowSpec, process_batch
from pipeline.shards import READY_KEY, blocks_per_replica, commit_block, group_slices, read_items


class EngineActor:
    """A Ray Data actor holding one engine replica; async so many rows run at once."""

    def __init__(self, engine_config: EngineConfig, spec: RowSpec):
        from pipeline.engine import Engine

        self.engine = Engine(engine_config, spec.task, in_process=True)
        self.spec = spec
        self.ready = {READY_KEY: str(time.time()).encode()}  # the job's phase breakdown reads it

    async def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.engine import PRIORITY_BATCH

        out = await process_batch(self.engine, batch, self.spec, PRIORITY_BATCH)
        return out.replace_schema_metadata({**(out.schema.metadata or {}), **self.ready})


class ServeClient:
    """Sends each batch to a running Serve application's replicas (the same engine class)."""

    def __init__(self, app_name: str, spec: RowSpec, job_id: str):
        from ray import serve

        self.handle = serve.get_app_handle(app_name)
        self.spec = spec
        self.job_id = job_id

    async def __call__(self, batch: pa.Table) -> pa.Table:
        return await self.handle.process_batch.remote(batch, self.spec, self.job_id)


def _read_slices(items: pa.Table, *, fs: Any, schema: pa.Schema, id_column: str) -> pa.Table:
    return read_items([s for row in items.column("slices").to_pylist() for s in json.loads(row)], fs, schema, id_column)


def _write_block(block: pa.Table, **kwargs: Any) -> pa.Table:
    if block.num_rows == 0:
        return pa.Table.from_pylist([])
    return pa.Table.from_pylist([commit_block(block, **kwargs)])



def stream(job: JobConfig, spec: RowSpec, plan: io.InputPlan, slices: list[dict], write: dict,
           verbose: bool, clock: Any, batch_urls: Optional[list[str]]) -> Iterator[dict]:
    """The Ray Data executor: read tasks → engine actor pool → write tasks, one stats row per shard."""
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
    ds = ds.map_batches(_read_slices, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"fs": plan.fs, "schema": plan.schema, "id_column": job.id_column})
    ds = _engine_stage(ds, job, spec, batch_urls, block_rows=len(groups[0]) * job.batch_size)
    ds = ds.map_batches(_write_block, batch_size=None, batch_format="pyarrow", fn_kwargs=write)
    for row in ds.iter_rows():
        yield dict(row)


def _engine_stage(ds: Any, job: JobConfig, spec: RowSpec, batch_urls: Optional[list[str]], block_rows: int) -> Any:
    import ray.data

    from pipeline.runtime import ray_address, replica_resources

    # The actors are async: concurrent calls put several blocks inside one engine at once.
    blocks = blocks_per_replica(job.engine.max_num_seqs, block_rows)
    compute = ray.data.ActorPoolStrategy(
        size=job.engine.replicas, max_tasks_in_flight_per_actor=blocks, max_concurrent_calls_per_actor=blocks,
    )
    if job.via_serve:
        return ds.map_batches(
            ServeClient, batch_size=None, batch_format="pyarrow", compute=compute, num_cpus=0.1,
            fn_constructor_kwargs={"app_name": job.via_serve, "spec": spec, "job_id": job.output},
        )
    if batch_urls is not None:  # an OpenAI Batch file: rows are requests, answered like the endpoint
        from pipeline.openai_batch import BatchRequestActor

        actor, kwargs = BatchRequestActor, {"engine_config": job.engine, "urls": batch_urls}
    else:
        actor, kwargs = EngineActor, {"engine_config": job.engine, "spec": spec}
    resources = replica_resources(job.engine, embedded=ray_address(job.address) is None)
    # One block (a run of slices) per call; Ray Data insists on an explicit batch size when GPUs
    # are requested, which here changes only how short (last or resumed) blocks group.
    return ds.map_batches(
        actor, batch_size=block_rows if resources["num_gpus"] else None, batch_format="pyarrow", compute=compute,
        num_cpus=resources["num_cpus"], num_gpus=resources["num_gpus"] or None, fn_constructor_kwargs=kwargs,
    )  # Ray Data restarts dead engine actors and retries their blocks (max_restarts=-1 by default)


