"""The inline executor: the job's driver process runs the blocks itself, no Ray Data.

For a single engine replica on an embedded Ray (the laptop case) Ray Data's start-up, its
stages and an actor hop cost more than they give: one in-process ``Engine`` does the same work.
With ``--via-serve`` the driver sends each block to a running Serve application's replicas,
so a warm fleet answers the first block within a second of the job's start.

Either way the blocks are the same slices, go through the same row contract
(``records.process_batch``) and the same content-addressed shard writer as the Ray Data path:
shard names, exactly-once, resume and error rows do not depend on the executor.

In-process engines stay warm between jobs of one process (a notebook, a test session, a
service calling ``run_job``): the next job with the same engine settings skips the start-up.
At most ``WARM_ENGINES`` are kept; they shut down when the process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Optional

import pyarrow as pa

Processor = Callable[[pa.Table], Awaitable[pa.Table]]
Factory = Callable[[], Awaitable[tuple[Processor, Callable[[bool], None]]]]
WARM_ENGINES = 2
_DONE = object()
_loop: Optional[asyncio.AbstractEventLoop] = None
_loop_thread: Optional[threading.Thread] = None
_loop_lock = threading.Lock()
_warm: "OrderedDict[tuple[str, str, str], Any]" = OrderedDict()


def background_loop() -> asyncio.AbstractEventLoop:
    """The process's one background event loop: in-process engines live and run on it."""
    global _loop, _loop_thread
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            _loop_thread = threading.Thread(target=_loop.run_forever, name="gpt2-pipeline-loop", daemon=True)
            _loop_thread.start()
    return _loop


def warm_engine(config: Any, task: Any) -> Any:
    """An engine for these settings: the warm one if there is one, else a new one (call on the
    background loop). Builds outside the cache's limit shut the least recently used one down."""
    from pipeline.config import Task
    from pipeline.engine import Engine, collector_paused, resolve_dtype

    # scoring runs on a generation engine, shared when both resolve to the same dtype
    kind = Task.embed if Task(task) == Task.embed else Task.generate
    with collector_paused():  # from vLLM's import (resolve_dtype) to the built engine
        if not _warm:  # the engine about to be built is the process's in-process one
            zero_kv_cache_early(config)
        key = (config.model_dump_json(), kind.value, resolve_dtype(config, task).dtype)
        if key in _warm:
            _warm.move_to_end(key)
            return _warm[key]
        while len(_warm) >= WARM_ENGINES:
            _stop(_warm.popitem(last=False)[1])
        _warm[key] = engine = Engine(config, task, in_process=True)
    atexit.unregister(shutdown_warm)  # run before vLLM's own exit hooks (atexit is last-in, first-out)
    atexit.register(shutdown_warm)
    return engine


def zero_kv_cache_early(config: Any) -> None:
    """A CPU engine about to be built: its KV cache is zeroed on the other core while vLLM
    imports (``engine.cpu_ops.prefault_kv_cache``; float32's size, an upper bound)."""
    if config.gpus_per_replica:
        return
    from pipeline.engine.args import cpu_kv_cache_bytes
    from pipeline.engine.cpu_ops import prefault_kv_cache
    from pipeline.models import resolve_model

    folder = resolve_model(config.model, config.revision, config.offline)
    prefault_kv_cache(cpu_kv_cache_bytes(config, folder, "float32"))


def discard_engine(engine: Any) -> None:
    """Shut down an engine that failed (it is never handed out again)."""
    for key, warm in list(_warm.items()):
        if warm is engine:
            del _warm[key]
    _stop(engine)


def shutdown_warm(timeout: Optional[float] = None, free: bool = True) -> None:
    """Shut every warm engine down (at exit, or when a caller wants the memory back; ``free``:
    see ``Engine.shutdown``)."""
    while _warm:
        _stop(_warm.popitem()[1], timeout, free)


def _stop(engine: Any, timeout: Optional[float] = None, free: bool = True) -> None:
    """Shut an engine down on the loop it runs on: AsyncLLM cancels its output task there (from
    another thread the task may first see its engine core die, and log that as a failure)."""
    if _loop is None or not _loop.is_running() or threading.current_thread() is _loop_thread:
        engine.shutdown(timeout, free)
        return

    async def stop() -> None:
        engine.shutdown(timeout, free)

    asyncio.run_coroutine_threadsafe(stop(), _loop).result()


class InlineRunner:
    """Builds a processor on the background loop, then runs blocks through it.

    ``InlineRunner(factory)`` returns at once; the processor (an engine, which takes seconds to
    load) is built while the caller goes on preparing the job. ``run`` yields one stats dict per
    committed shard, in completion order, with at most ``in_flight`` blocks inside the processor.
    """

    def __init__(self, factory: Factory):
        self._loop = background_loop()
        self._release: Optional[Callable[[bool], None]] = None
        self._failed = False
        self._finished = threading.Event()
        self._finished.set()
        self._job: Any = None
        self.stopping = threading.Event()  # set by close(): blocking work (writes) must give up
        self.ready_at: Optional[float] = None  # time.monotonic() when the processor was built

        async def build() -> Processor:
            process, self._release = await factory()
            self.ready_at = time.monotonic()
            return process

        self._processor = asyncio.run_coroutine_threadsafe(build(), self._loop)

    def run(self, items: Iterable[Any], read: Callable[[Any], pa.Table], write: Callable[[pa.Table], dict],
            in_flight: int, lead: bool = False) -> Iterator[dict]:
        """Read, process and write every item; yield each write's stats as it completes.
        ``lead``: the first item runs alone, the others start once it is written.

        A processor failure (a dead engine) stops the run and is raised here; shards already
        committed stay, so ``--resume`` continues the job.
        """
        results: queue.Queue = queue.Queue()
        self._finished.clear()
        self._job = asyncio.run_coroutine_threadsafe(self._run_all(items, read, write, in_flight, lead, results),
                                                     self._loop)
        while True:
            item = results.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                self._failed = True
                raise item
            yield item

    async def _run_all(self, items: Iterable[Any], read: Callable[[Any], pa.Table],
                       write: Callable[[pa.Table], dict], in_flight: int, lead: bool, results: queue.Queue) -> None:
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

            for n, item in enumerate(items):
                await slots.acquire()  # bounded: never more than in_flight blocks read ahead
                if failures:
                    break
                task = asyncio.create_task(one(item))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if lead and n == 0:
                    await asyncio.wait({task})
            await asyncio.gather(*tasks)
            results.put(failures[0] if failures else _DONE)
        except BaseException as exc:  # noqa: BLE001 - e.g. the engine failed to start, or cancelled
            results.put(exc)
            raise
        finally:
            for task in tasks:
                task.cancel()  # aborts their requests inside the engine
            await asyncio.gather(*tasks, return_exceptions=True)
            self._finished.set()

    def close(self) -> None:
        """Stop what still runs (it aborts inside the engine) and hand the processor back: a warm
        engine stays for the next job unless the run failed."""
        self.stopping.set()
        if self._job is not None:
            self._loop.call_soon_threadsafe(self._job.cancel)
        self._finished.wait(timeout=120)
        try:
            self._processor.result()
        except BaseException:  # noqa: BLE001 - it never started: nothing to hand back
            return
        if self._release is not None:
            self._release(self._failed)
        self._release = self._processor = None


def engine_processor(engine_config: Any, spec: Any) -> Factory:
    """One in-process engine (warm if one fits); each block runs through ``process_batch``."""

    async def make() -> tuple[Processor, Callable[[bool], None]]:
        from pipeline.engine import PRIORITY_BATCH
        from pipeline.records import process_batch

        engine = warm_engine(engine_config, spec.task)

        async def process(table: pa.Table) -> pa.Table:
            return await process_batch(engine, table, spec, PRIORITY_BATCH)

        def release(failed: bool) -> None:
            if failed:
                discard_engine(engine)

        return process, release

    return make


def serve_processor(app_name: str, spec: Any, job_id: str) -> Factory:
    """Send each block to a running Serve application's replicas (``run --via-serve``)."""

    async def make() -> tuple[Processor, Callable[[bool], None]]:
        from ray import serve

        handle = serve.get_app_handle(app_name)

        async def process(table: pa.Table) -> pa.Table:
            return await handle.process_batch.remote(table, spec, job_id)

        return process, lambda failed: None

    return make
