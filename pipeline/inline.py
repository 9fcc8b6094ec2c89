"""The inline executor: the job's driver process runs the blocks itself, no Ray Data.

For a single engine replica on an embedded Ray (the laptop case) Ray Data's start-up, its
stages and an actor hop cost more than they give: one in-process ``Engine`` does the same work.
With ``--via-serve`` the driver sends each block to a running Serve application's replicas,
so a warm fleet answers the first block within a second of the job's start.

Either way the blocks are the same slices, go through the same row contract
(``records.process_batch``) and the same content-addressed shard writer as the Ray Data path:
shard names, exactly-once, resume and error rows do not depend on the executor.
"""

from __future__ import annotations

import asyncio
import gc
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Optional

import pyarrow as pa

Processor = Callable[[pa.Table], Awaitable[pa.Table]]
_DONE = object()


class InlineRunner:
    """A background event loop that builds a processor once and then runs blocks through it.

    ``start`` returns at once; the processor (an engine, which takes seconds to load) is built on
    the loop while the caller goes on preparing the job. ``run`` yields one stats dict per
    committed shard, in completion order, with at most ``in_flight`` blocks inside the processor.
    """

    def __init__(self, make_processor: Callable[[], tuple[Processor, Callable[[], None]]]):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gpt2-pipeline-inline", daemon=True)
        self._thread.start()
        self._close: Optional[Callable[[], None]] = None
        self.stopping = threading.Event()  # set by close(): blocking work (writes) must give up
        self.ready_at: Optional[float] = None  # time.monotonic() when the processor was built

        async def build() -> Processor:
            process, self._close = make_processor()
            self.ready_at = time.monotonic()
            return process

        self._processor = asyncio.run_coroutine_threadsafe(build(), self._loop)

    def run(self, items: Iterable[Any], read: Callable[[Any], pa.Table], write: Callable[[pa.Table], dict],
            in_flight: int) -> Iterator[dict]:
        """Read, process and write every item; yield each write's stats as it completes.

        A processor failure (a dead engine) stops the run and is raised here; shards already
        committed stay, so ``--resume`` continues the job.
        """
        results: queue.Queue = queue.Queue()
        job = asyncio.run_coroutine_threadsafe(self._run_all(items, read, write, in_flight, results), self._loop)
        try:
            while True:
                item = results.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancel()

    async def _run_all(self, items: Iterable[Any], read: Callable[[Any], pa.Table],
                       write: Callable[[pa.Table], dict], in_flight: int, results: queue.Queue) -> None:
        tasks: set[asyncio.Task] = set()
        failures: list[BaseException] = []
        try:
            process = await asyncio.wrap_future(self._processor)
            slots = asyncio.Semaphore(in_flight)

            async def one(item: Any) -> None:
                try:
                    table = await asyncio.to_thread(read, item)
                    if table.num_rows:
                        results.put(await asyncio.to_thread(write, await process(table)))
                except Exception as exc:  # noqa: BLE001 - stops the run; raised in the driver thread
                    failures.append(exc)
                finally:
                    slots.release()

            for item in items:
                await slots.acquire()  # bounded: never more than in_flight blocks read ahead
                if failures:
                    break
                task = asyncio.create_task(one(item))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
            results.put(failures[0] if failures else _DONE)
        except BaseException as exc:  # noqa: BLE001 - e.g. the engine failed to start
            results.put(exc)
            raise
        finally:
            for task in tasks:
                task.cancel()

    def close(self) -> None:
        """Cancel what still runs, release the processor (shuts the engine down), stop the loop."""
        self.stopping.set()

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(drain(), self._loop).result(timeout=60)
        finally:
            if self._close is not None:
                self._close()
            self._close = self._processor = None
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            gc.collect()  # tracebacks of cancelled tasks hold the engine: free it now, not at exit


def engine_processor(engine_config: Any, spec: Any) -> Callable[[], tuple[Processor, Callable[[], None]]]:
    """Build one in-process engine; each block runs through ``process_batch`` at batch priority."""

    def make() -> tuple[Processor, Callable[[], None]]:
        from pipeline.engine import PRIORITY_BATCH, Engine
        from pipeline.records import process_batch

        engine = Engine(engine_config, spec.task)
        return (lambda table: process_batch(engine, table, spec, PRIORITY_BATCH)), engine.shutdown

    return make


def serve_processor(app_name: str, spec: Any, job_id: str) -> Callable[[], tuple[Processor, Callable[[], None]]]:
    """Send each block to a running Serve application's replicas (``run --via-serve``)."""

    def make() -> tuple[Processor, Callable[[], None]]:
        from ray import serve

        handle = serve.get_app_handle(app_name)

        async def process(table: pa.Table) -> pa.Table:
            return await handle.process_batch.remote(table, spec, job_id)

        return process, lambda: None

    return make
