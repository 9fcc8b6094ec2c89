"""``quantization: int8`` on a CPU: the linear layers in int8, quantized as the model loads.

Each weight matrix is quantized per output channel (symmetric, scale = max |w| / 127) once the
checkpoint is loaded; at every step each token's activations are quantized the same way
(per token, dynamic) and the product runs in oneDNN's int8 matmul (VNNI on AVX-512 CPUs, AMX
where present), which writes the model's dtype with the scales and the bias applied. That is
what CTranslate2's ``int8`` does. The LM head (tied to the token embedding) stays in the
model's dtype: in one piece int8 was no faster there (a [256, 50257] output: 51-68 ms against
51-54 ms in bfloat16); in slices of 2,048-16,384 outputs it took 30-33 ms, not done yet because
the head shares its weights with the embedding and its logits choose the tokens.

Measured on this repository's 2-core AVX512-BF16/VNNI host (2026-12-03, 256 rows, GPT-2 124M
shapes): 720-800 GFLOPS in int8 against 366-390 in bfloat16 (vLLM's own oneDNN path), i.e. the
twelve blocks' matmuls in 56 ms instead of 111 ms a step. Tokens differ from bfloat16's: int8 is
an opt-in, never chosen by ``auto``.

vLLM's name for it is ``QUANT_NAME``, registered by ``register()`` in the process that builds the
engine's configuration. An engine core in a process of its own (forked, or spawned in a Serve
replica) gets the configuration with its ``Int8Config`` object, which imports this module there.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch
from vllm import _custom_ops as ops
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

QUANT_NAME = "gpt2_pipeline_int8"
_PRIMITIVES_PER_LAYER = 32  # oneDNN matmul primitives a layer keeps (one per batch size), as vLLM's own

_lock = threading.Lock()  # two engines of a Serve replica start side by side


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] → (int8 [out, in], float32 scales [out]), symmetric per row."""
    w = weight.detach().to(torch.float32, copy=True)
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min_(torch.finfo(torch.float32).tiny)
    return w.div_(scales[:, None]).round_().clamp_(-127, 127).to(torch.int8), scales


class Int8LinearMethod(UnquantizedLinearMethod):
    """Loads the weight as vLLM's unquantized method does, then keeps it only as oneDNN's
    prepacked int8 copy."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        q, scales = quantize_rows(layer.weight.data)
        out_dtype = layer.weight.dtype
        # oneDNN wants the [in, out] view of a row-major [out, in] matrix.
        layer.int8_handler = ops.create_onednn_scaled_mm(q.t(), scales, out_dtype, True, False,
                                                         _PRIMITIVES_PER_LAYER)
        layer.int8_scales = scales  # the handler reads them in place at every step
        del layer.weight  # prepacked inside the handler

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        handler = layer.int8_handler
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        x_q, x_s, _ = ops.onednn_scaled_int8_quant(x2, None, None, True)
        out = torch.empty((x2.size(0), handler.n), dtype=x.dtype)
        ops.onednn_scaled_mm(handler, x_q, out, x_s, None, None, bias)
        return out.reshape(*shape[:-1], handler.n)


class Int8Config(QuantizationConfig):
    """vLLM's view of ``quantization: int8``: every linear layer through ``Int8LinearMethod``;
    embeddings and the LM head unquantized (``get_quant_method`` returns None for them)."""

    def get_name(self) -> Any:
        return QUANT_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # nothing in the checkpoint: the weights are quantized as they load

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Int8Config":
        return cls()

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Any:
        return Int8LinearMethod() if isinstance(layer, LinearBase) else None


def register() -> str:
    """Make ``QUANT_NAME`` known to vLLM in this process (once); returns the name."""
    with _lock:
        if QUANT_NAME not in QUANTIZATION_METHODS:
            register_quantization_config(QUANT_NAME)(Int8Config)
    return QUANT_NAME
