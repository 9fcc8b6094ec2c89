"""More peers for ``offline.py``, and the hardware's matmul bound printed beside the figures.

- ``raw_vllm_defaults``: raw vLLM ``LLM.generate`` in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
  with vLLM's own defaults (dtype auto, compiled on CPU), but for memory (0.3 of RAM, as ours).
- ``ct2_int8`` / ``ct2_float32``: CTranslate2's ``Generator`` on the same checkpoint, converted
  once per run folder with ``ctranslate2.converters.TransformersConverter``. CTranslate2 is not a
  project dependency: install it into a folder of its own
  (``pip install --target DIR --no-deps ctranslate2``) and pass ``--ct2-site DIR``.
- ``matmul_bound``: torch matmul GFLOPS at GPT-2 shapes (rows = the batch) in float32 and bfloat16,
  and the decode rate they allow (2 x parameters FLOPs per token, attention ignored);
  ``measure_bound`` runs it at a model's shapes in a subprocess.
- ONNX Runtime (``ort_float32`` / ``ort_int8``) runs in a venv of its own: see ``peer_ort.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def worker_raw_defaults(a: argparse.Namespace) -> dict[str, Any]:
    """Raw vLLM one process, vLLM's defaults: what a user gets from ``LLM(model)``."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    t_start = time.monotonic()
    from _common import read_prompts, sampling_kwargs
    from vllm import LLM, SamplingParams

    from pipeline.models import resolve_model

    prompts = read_prompts(a.prompts)
    t0 = time.monotonic()
    # vLLM's defaults, but for memory: on CPU its 0.92 of the machine's RAM must be free at start,
    # which a shared machine may not have; 0.3 is ours (the KV cache is 2 GiB either way here)
    llm = LLM(model=str(resolve_model(a.model)), gpu_memory_utilization=0.3)
    t_ready = time.monotonic()
    params = SamplingParams(**sampling_kwargs(a.max_tokens, a.temperature, a.top_p, a.top_k))
    outs = llm.generate(prompts, params, use_tqdm=False)
    t_done = time.monotonic()
    cfg = llm.llm_engine.vllm_config
    return {
        "rows_out": len(outs), "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs), "import_s": t0 - t_start,
        "startup_s": t_ready - t_start, "ready_s": t_ready - t_start, "engine_init_s": t_ready - t0,
        "generation_s": t_done - t_ready,
        "engine_kwargs": {"dtype": str(cfg.model_config.dtype), "enforce_eager": cfg.model_config.enforce_eager,
                          "max_num_seqs": cfg.scheduler_config.max_num_seqs},
    }


def ct2_folder(work: Path, model: str, quantization: str) -> Path:
    """The checkpoint converted for CTranslate2 (once per run folder)."""
    from ctranslate2.converters import TransformersConverter

    from pipeline.models import resolve_model

    out = work / f"ct2-{model.replace('/', '_')}-{quantization}"
    if not (out / "model.bin").is_file():
        TransformersConverter(str(resolve_model(model))).convert(str(out), quantization=quantization, force=True)
    return out


def _worker_ct2(a: argparse.Namespace, compute_type: str) -> dict[str, Any]:
    """CTranslate2's generator: greedy (or temperature) sampling, exactly max_tokens per prompt."""
    t_start = time.monotonic()
    if a.ct2_site:
        sys.path.insert(0, a.ct2_site)
    import ctranslate2
    from _common import read_prompts
    from transformers import AutoTokenizer

    from pipeline.models import resolve_model

    folder = ct2_folder(Path(a.output).parent, a.model, compute_type)
    prompts = read_prompts(a.prompts)
    tok = AutoTokenizer.from_pretrained(str(resolve_model(a.model)))
    gen = ctranslate2.Generator(str(folder), device="cpu", compute_type=compute_type, intra_threads=os.cpu_count() or 1)
    t_ready = time.monotonic()
    tokens = [tok.convert_ids_to_tokens(tok.encode(p)) for p in prompts]
    sampling = {"sampling_topk": 1} if a.temperature == 0 else {"sampling_temperature": a.temperature, "sampling_topk": a.top_k or 0}
    results = gen.generate_batch(tokens, max_length=a.max_tokens, min_length=a.max_tokens, include_prompt_in_result=False,
                                 max_batch_size=a.ct2_batch_size, **sampling)
    t_done = time.monotonic()
    return {
        "rows_out": len(results), "completion_tokens": sum(len(r.sequences_ids[0]) for r in results),
        "startup_s": t_ready - t_start, "ready_s": t_ready - t_start, "generation_s": t_done - t_ready,
        "compute_type": compute_type, "batch_size": a.ct2_batch_size, "ctranslate2": ctranslate2.__version__,
    }


def worker_ct2_int8(a: argparse.Namespace) -> dict[str, Any]:
    return _worker_ct2(a, "int8")


def worker_ct2_float32(a: argparse.Namespace) -> dict[str, Any]:
    return _worker_ct2(a, "float32")


def matmul_bound(hidden: int = 768, layers: int = 12, vocab: int = 50257, rows: int = 256, repeat: int = 20) -> dict[str, Any]:
    """GFLOPS of torch matmuls at a GPT-2 decode step's shapes (``rows`` sequences), per dtype, and
    the tokens/s that allows: each token costs 2 x parameters FLOPs (attention scores ignored)."""
    import torch

    shapes = [(hidden, 3 * hidden), (hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)]
    flops_per_token = 2 * (layers * sum(k * n for k, n in shapes) + hidden * vocab)
    out: dict[str, Any] = {"rows": rows, "gflop_per_token": flops_per_token / 1e9, "threads": torch.get_num_threads()}
    for dtype in (torch.float32, torch.bfloat16):
        mats = [(torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for k, n in shapes + [(hidden, vocab)]]
        weights = [layers] * len(shapes) + [1]
        with torch.inference_mode():
            for x, w in mats:  # warm-up (AMX tile config, allocator)
                x @ w
            t0 = time.perf_counter()
            for _ in range(repeat):
                for x, w in mats:
                    x @ w
            dt = (time.perf_counter() - t0) / repeat
        # per step: one matmul per shape; a model runs each layer's shapes `layers` times
        step_flops = sum(2 * rows * x.shape[1] * w.shape[1] for x, w in mats)
        gflops = step_flops / dt / 1e9
        model_step_s = sum(wt * (2 * rows * x.shape[1] * w.shape[1]) for wt, (x, w) in zip(weights, mats)) / (gflops * 1e9)
        name = str(dtype).removeprefix("torch.")
        out[name] = {"gflops": round(gflops, 1), "bound_tokens_per_s": round(rows / model_step_s, 0)}
    return out


def measure_bound(model: str, rows: int) -> dict[str, Any]:
    """``matmul_bound`` at the model's shapes (at most 256 rows), in a subprocess of its own."""
    import subprocess

    from pipeline.models import resolve_model

    cfg = json.loads((resolve_model(model) / "config.json").read_text())
    code = (f"import json, peers; print(json.dumps(peers.matmul_bound({cfg['n_embd']}, {cfg['n_layer']}, "
            f"{cfg['vocab_size']}, {min(rows, 256)})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=str(Path(__file__).resolve().parent))
    return json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else {"error": run.stderr[-500:]}


if __name__ == "__main__":
    print(json.dumps(matmul_bound(), indent=1))
