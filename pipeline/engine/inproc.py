"""vLLM's engine core in the caller's process: ``LLMEngine`` stepped by one thread, behind the
part of ``AsyncLLM``'s interface that ``Engine`` uses (``generate``, ``encode``, ``check_health``,
``get_num_unfinished_requests``, ``shutdown``).

For jobs on a CPU (the inline executor, batch actors, ``generate``). ``AsyncLLM`` always runs its
engine core in a second process, which imports vLLM again (8-10 s of a short job here) and costs
an inter-process hop per step. Here a thread owns the engine: it takes new requests and aborts
from an inbox, steps while any request is unfinished, and hands each ``RequestOutput`` to its
request's asyncio queue on the caller's loop. The model's kernels release the GIL, so the
caller's loop keeps running while a step computes. The serving path keeps ``AsyncLLM``: its HTTP
work would compete with the steps for the GIL.

A job's block of requests (``generate_many``) is one message to the thread and one answer back,
when its last request finishes: no queue, stream or task per request. In a job of one-token rows
(``demo``) the caller's loop thread then holds 5 % of a profile's samples (23 % with a stream
per request), the engine thread 90 %.

If a step raises, the engine is dead: every request, queued or new, gets vLLM's
``EngineDeadError``, as from ``AsyncLLM``.

Memory: glibc gives each thread its own malloc arena. The engine thread allocates each request's
state and outputs and the caller's thread frees them, a pattern under which the engine thread's
arena keeps growing (this engine alone on the demo model: 386 MB of heap at the start, 1,040 MB
after 30k requests). Before the thread starts, ``one_malloc_arena`` caps the process at one arena
(``mallopt(M_ARENA_MAX, 1)``, what ``MALLOC_ARENA_MAX=1`` does), so both threads share it and
freed memory is reused (the same engine: 613 MB at 30k and at 40k requests). Threads that
allocated before keep their arenas (a job showed 8). A value the user set in ``MALLOC_ARENA_MAX``
is kept.

A whole job grew on for another reason: vLLM's CPU linear layers build a oneDNN matmul primitive
(a JIT kernel and its descriptor, about 0.5 MB) per batch size a step meets, and oneDNN's global
cache keeps up to 1,024 of them (memray, 20k rows of a job on ``demo``: 174 of the 181 MiB still
allocated came from there). ``cap_onednn_cache`` lowers that cache to ``ONEDNN_CACHE`` before the
engine builds its first primitive (a user's ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` is kept), and the
engine thread calls ``malloc_trim(0)`` every ``TRIM_EVERY`` finished requests, so the free pages
that evicted primitives and finished requests leave inside glibc's heap go back to the OS.
Measured on that job (5 s samples): RSS 3,359 MiB at 100k rows and 3,330 MiB at 396k; before,
3,548 and 3,791 MiB (the cap alone: +42 MiB per 100k rows, the trim takes the rest).
"""

from __future__ import annotations

import asyncio
import copy
import ctypes
import gc
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

from pipeline.engine.args import HEAP_KEEP_FREE, cap_onednn_cache

logger = logging.getLogger(__name__)
Put = Callable[[Any], None]


@dataclass
class _Add:
    request_id: str
    prompt: Any
    params: Any
    priority: int
    put: Put  # hands an output (or an exception) to the request's queue on the caller's loop


@dataclass
class _AddMany:
    """A block of requests with one set of params: each request's put is its slot's in ``_Block``."""

    request_ids: list[str]
    prompts: list[Any]
    params: Any
    priority: int
    block: "_Block"


@dataclass
class _Abort:
    request_id: str


class _Block:
    """The answers to an ``_AddMany``, filled in by the engine thread; the caller's future is
    set once, when the last request finishes (or fails)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int):
        self.results: list[Any] = [None] * size
        self.left = size
        self.future: asyncio.Future = loop.create_future()
        self._loop = loop

    def put(self, index: int, item: Any) -> None:
        if not isinstance(item, BaseException) and not item.finished:
            return  # FINAL_ONLY: only a request's last output counts
        if self.results[index] is None:
            self.left -= 1
        self.results[index] = item
        if not self.left:
            try:
                self._loop.call_soon_threadsafe(self._done)
            except RuntimeError:  # the caller's loop is gone: nobody is waiting
                pass

    def _done(self) -> None:
        if not self.future.done():
            self.future.set_result(self.results)


_M_ARENA_MAX, _M_MMAP_MAX, _M_TRIM_THRESHOLD = -8, -4, -1  # glibc's mallopt parameters
TRIM_EVERY = 4096  # finished requests between two ``release_free_memory`` calls of the engine thread
GC_YOUNG = 50_000  # allocations between two young collections while an in-process engine runs (Python: 700)
_LEFT_RUNNING: list[Any] = []  # engines stopped with free=False: referenced until the process leaves


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt`` in this process; False where it does not apply (not glibc)."""
    try:
        return bool(ctypes.CDLL(None).mallopt(param, value))  # the process's own libc
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False


def one_malloc_arena() -> bool:
    """Cap glibc's malloc at one arena for the threads started from now on (see the module's
    docstring). False where it does not apply: not glibc, or ``MALLOC_ARENA_MAX`` set."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return _mallopt(_M_ARENA_MAX, 1)


def keep_step_buffers() -> bool:
    """Once the engine is built: a step's large temporaries come from glibc's heap and stay there
    when freed (``mallopt``: no ``mmap`` per allocation, the heap's top trimmed only past
    ``HEAP_KEEP_FREE`` bytes), instead of being mapped and unmapped at every step. A step of 256
    sequences of GPT-2 allocates its logits as a fresh 51 MB float32 tensor (vLLM's sampler);
    glibc mapped it anew each time and the kernel faulted in its 12,500 pages while torch copied
    into it: 14-16 ms for a copy that takes 1.4 ms into memory already mapped (2 threads, bf16 ->
    float32, 2026-12-03), 64 times per 64-token block. The model and the KV cache are allocated
    before this and keep their own mappings. ``release_free_memory`` (every ``TRIM_EVERY``
    finished requests) still returns the free pages. False where it does not apply (not glibc, or
    the user set ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_``)."""
    if os.environ.get("MALLOC_MMAP_MAX_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    return _mallopt(_M_MMAP_MAX, 0) and _mallopt(_M_TRIM_THRESHOLD, HEAP_KEEP_FREE)


def fewer_collections() -> tuple[int, ...]:
    """While an in-process engine runs: freeze what the process holds now (the model, vLLM, the
    libraries: about 800,000 objects) out of the garbage collector's way, as vLLM's engine core
    does at its start, and collect the young generation every ``GC_YOUNG`` allocations instead of
    every 700. Each request allocates dozens of objects, so with Python's defaults the collector
    ran a young collection every few requests, and full ones that stopped the engine thread for
    about 50 ms: 7 % of a job of one-token rows (50,000 rows on ``demo``: 29.6 s of generation,
    27.5 s with the collector off during the job). Returns the thresholds to restore."""
    from vllm.utils.gc_utils import freeze_gc_heap

    before = gc.get_threshold()
    freeze_gc_heap()
    gc.set_threshold(max(before[0], GC_YOUNG), *before[1:])
    return before


def leave_running(engine: Any) -> None:
    """Keep a stopped vLLM engine as it is until the process leaves: referenced (once collected,
    its finalizers run vLLM's whole shutdown: 1.1-1.5 s of a job's end on ``gpt2-small-random``)
    and with those finalizers kept from running at exit (``weakref.finalize`` runs each one still
    alive from an ``atexit`` hook)."""
    _LEFT_RUNNING.append(engine)
    for owner in (engine, getattr(engine, "engine_core", None)):
        finalizer = getattr(owner, "_finalizer", None)
        if finalizer is not None:
            finalizer.atexit = False


def release_free_memory() -> bool:
    """Hand the free pages inside glibc's heaps back to the OS (``malloc_trim(0)``: every arena,
    not only the top of the main heap). False where it does not apply (not glibc)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False
    trim(0)
    return True


def own_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer the caller's thread encodes with while the engine thread detokenizes. vLLM's
    renderer already makes a fast tokenizer thread-safe (its public calls borrow one of a pool of
    copies), so that one is shared; any other gets a copy of its own. Copying the pool instead
    took 0.6-1.3 s of an engine's start-up (it deep-copies every tokenizer in it)."""
    from vllm.tokenizers.hf import ThreadSafeHFTokenizerMixin

    return tokenizer if isinstance(tokenizer, ThreadSafeHFTokenizerMixin) else copy.deepcopy(tokenizer)


class InprocLLM:
    """``LLMEngine`` in this process, driven by a thread; async per-request streams."""

    def __init__(self, args: Any, trim_every: int = TRIM_EVERY):
        self._engine: Any = None
        self.trim_every = trim_every  # finished requests between two release_free_memory calls
        self.trims = 0  # how many times the engine thread released free memory
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # closing vs. sending: nothing lands in a dead inbox
        self._closed = False
        self._error: Optional[str] = None
        self._streams: dict[str, Put] = {}  # owned by the engine thread
        built = threading.Event()
        failure: list[BaseException] = []
        one_malloc_arena()
        cap_onednn_cache()
        self._thread = threading.Thread(target=self._own, args=(args, built, failure), name="vllm-engine-core",
                                        daemon=True)
        self._thread.start()
        built.wait()
        if failure:
            raise failure[0]
        self.model_config = self._engine.model_config
        self._tokenizer = own_tokenizer(self._engine.get_tokenizer())
        self._gc_threshold = fewer_collections()

    # ---- AsyncLLM's interface ------------------------------------------------------------
    def get_tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def input_processor(self) -> Any:
        return self._engine.input_processor

    def get_num_unfinished_requests(self) -> int:
        return self._engine.get_num_unfinished_requests() if self._engine is not None else 0

    async def generate(self, prompt: Any, params: Any, request_id: str, *, priority: int = 0) -> AsyncIterator[Any]:
        """vLLM's outputs for one request (``params``: sampling or pooling); closing the
        iterator early aborts the request."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the caller's loop is gone: nobody is waiting
                pass

        self._send(_Add(request_id, prompt, params, priority, put))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._send(_Abort(request_id), quiet=True)

    encode = generate  # pooling requests take the same path, with PoolingParams

    async def generate_many(self, prompts: list[Any], params: Any, request_ids: list[str], *,
                            priority: int = 0) -> list[Any]:
        """The final ``RequestOutput`` of each prompt (``params`` with ``FINAL_ONLY`` output), in
        order, or the exception its request failed with. One message to the engine thread and one
        answer back for the whole block; cancelling aborts the requests still running."""
        if not prompts:
            return []
        block = _Block(asyncio.get_running_loop(), len(prompts))
        self._send(_AddMany(request_ids, prompts, params, priority, block))
        try:
            return await block.future
        except asyncio.CancelledError:
            for rid, result in zip(request_ids, block.results):
                if result is None:
                    self._send(_Abort(rid), quiet=True)
            raise

    async def check_health(self) -> None:
        if self._closed:
            raise self._dead()

    def shutdown(self, timeout: Optional[float] = None, free: bool = True) -> None:
        """Stop the thread (after its current step) and free the engine (``free=False``: the
        process is about to exit, so the engine stays referenced and its memory goes with the
        process; vLLM's shutdown of a CPU worker took 1.1-1.5 s of a job's end on
        ``gpt2-small-random``)."""
        with self._lock:
            self._closed = True
            self._error = self._error or "the engine was shut down"
        self._wake.set()
        self._thread.join(timeout=timeout or 30)
        if not free:
            leave_running(self._engine)
            return
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.engine_core.shutdown()
            gc.set_threshold(*self._gc_threshold)

    # ---- the engine thread ---------------------------------------------------------------
    def _dead(self) -> BaseException:
        from vllm.v1.engine.exceptions import EngineDeadError

        return EngineDeadError(self._error or "the engine stopped")

    def _send(self, item: Any, quiet: bool = False) -> None:
        with self._lock:
            if not self._closed:
                self._inbox.put(item)
                self._wake.set()
                return
        if not quiet:
            raise self._dead()

    def _own(self, args: Any, built: threading.Event, failure: list[BaseException]) -> None:
        """The engine thread builds the engine it steps: the model's OpenMP thread team is this
        thread's from the first forward pass (profiling, warm-up) on, as in raw vLLM's one thread."""
        from vllm.v1.engine.llm_engine import LLMEngine

        try:
            self._engine = LLMEngine.from_engine_args(args)
            keep_step_buffers()
        except BaseException as exc:  # noqa: BLE001 - raised in the caller
            failure.append(exc)
            return
        finally:
            built.set()
        self._run()

    def _run(self) -> None:
        finished = 0  # requests finished since free memory was last released
        try:
            while not self._closed:
                self._take_inbox()
                if not self._engine.has_unfinished_requests():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = self._engine.step()
                finished += sum(out.finished for out in outputs)
                if finished >= self.trim_every:  # before the outputs go: their callers see it done
                    finished = 0
                    self.trims += release_free_memory()
                for out in outputs:
                    put = self._streams.get(out.request_id)
                    if put is not None:
                        if out.finished:
                            del self._streams[out.request_id]
                        put(out)
        except BaseException as exc:  # noqa: BLE001 - the engine is dead: tell every request
            logger.exception("vLLM's in-process engine failed")
            self._error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._closed = True
            while not self._inbox.empty():
                item = self._inbox.get_nowait()
                if isinstance(item, _Add):
                    item.put(self._dead())
                elif isinstance(item, _AddMany):
                    for index in range(len(item.request_ids)):
                        item.block.put(index, self._dead())
            for put in self._streams.values():
                put(self._dead())
            self._streams.clear()

    def _take_inbox(self) -> None:
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if isinstance(item, _Abort):
                if self._streams.pop(item.request_id, None) is not None:
                    self._engine.abort_request([item.request_id])
            elif isinstance(item, _AddMany):
                for index, (rid, prompt) in enumerate(zip(item.request_ids, item.prompts)):
                    self._add(rid, prompt, item.params, item.priority, partial(item.block.put, index))
            else:
                self._add(item.request_id, item.prompt, item.params, item.priority, item.put)

    def _add(self, request_id: str, prompt: Any, params: Any, priority: int, put: Put) -> None:
        if request_id in self._streams:
            put(ValueError(f"request id {request_id!r} is already running"))
            return
        try:
            self._engine.add_request(request_id, prompt, params, priority=priority)
        except Exception as exc:  # noqa: BLE001 - a bad request fails alone (as in AsyncLLM)
            put(exc)
        else:
            self._streams[request_id] = put
