"""``quantization: int8`` on a CPU: the linear layers and the LM head in int8, quantized as the
model loads.

Each weight matrix is quantized per output channel (symmetric, scale = max |w| / 127) once the
checkpoint is loaded; at every step each token's activations are quantized the same way
(per token, dynamic) and the product runs in oneDNN's int8 matmul (VNNI on AVX-512 CPUs, AMX
where present), which writes the model's dtype with the scales and the bias applied. That is
what CTranslate2's ``int8`` does, its output projection included. The LM head keeps its weight in
the model's dtype too (GPT-2 ties it to the token embedding, which looks rows up in it) and runs
in slices of ``HEAD_SLICE`` outputs: measured 2026-12-04 on a [256, 768] x [768, 50257] head,
31-32 ms in slices of 4,096-8,192 (the copy into one logits tensor included) against 49-50 ms in
one piece, int8 or bfloat16 alike (bfloat16 in slices: 51-60 ms, no gain).

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
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

QUANT_NAME = "gpt2_pipeline_int8"
_PRIMITIVES_PER_LAYER = 32  # oneDNN matmul primitives a layer keeps (one per batch size), as vLLM's own
HEAD_SLICE = 8192  # the LM head's outputs per int8 matmul (see above)

_lock = threading.Lock()  # two engines of a Serve replica start side by side


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] → (int8 [out, in], float32 scales [out]), symmetric per row."""
    w = weight.detach().to(torch.float32, copy=True)
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min_(torch.finfo(torch.float32).tiny)
    return w.div_(scales[:, None]).round_().clamp_(-127, 127).to(torch.int8), scales


def _prepack(weight: torch.Tensor, out_dtype: torch.dtype) -> tuple[Any, torch.Tensor]:
    """oneDNN's prepacked int8 copy of ``weight`` [out, in] and its scales, which the handler reads
    in place at every step (keep them alive beside it)."""
    q, scales = quantize_rows(weight)
    # oneDNN wants the [in, out] view of a row-major [out, in] matrix.
    return ops.create_onednn_scaled_mm(q.t(), scales, out_dtype, True, False, _PRIMITIVES_PER_LAYER), scales


def _int8_matmuls(handlers: list[Any], x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` [..., in] times each handler's matrix (plus its part of ``bias``), their outputs side
    by side, in ``x``'s dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    x_q, x_s, _ = ops.onednn_scaled_int8_quant(x2, None, None, True)
    outs, start = [], 0
    for handler in handlers:
        out = torch.empty((x2.size(0), handler.n), dtype=x.dtype)
        part = None if bias is None else bias[start:start + handler.n]
        ops.onednn_scaled_mm(handler, x_q, out, x_s, None, None, part)
        outs.append(out)
        start += handler.n
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.reshape(*shape[:-1], out.size(1))


class Int8LinearMethod(UnquantizedLinearMethod):
    """Loads the weight as vLLM's unquantized method does, then keeps it only as oneDNN's
    prepacked int8 copy."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        handler, layer.int8_scales = _prepack(layer.weight.data, layer.weight.dtype)
        layer.int8_handlers = [handler]
        del layer.weight  # prepacked inside the handler

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _int8_matmuls(layer.int8_handlers, x, bias)


class Int8HeadMethod(UnquantizedEmbeddingMethod):
    """The LM head: its weight stays (tied heads share it with the embedding's lookups), and the
    logits come from int8 matmuls over slices of ``HEAD_SLICE`` rows of it."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = layer.weight.data
        if weight.is_meta:  # a pooling (embedding) model: vLLM never loads the head it does not run
            return
        packed = [_prepack(weight[start:start + HEAD_SLICE], weight.dtype)
                  for start in range(0, weight.size(0), HEAD_SLICE)]
        layer.int8_handlers = [handler for handler, _ in packed]
        layer.int8_scales = [scales for _, scales in packed]

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _int8_matmuls(layer.int8_handlers, x, bias)


class Int8Config(QuantizationConfig):
    """vLLM's view of ``quantization: int8``: every linear layer through ``Int8LinearMethod``, the
    LM head through ``Int8HeadMethod``; the embeddings unquantized (``get_quant_method`` returns
    None for them)."""

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
        if isinstance(layer, LinearBase):
            return Int8LinearMethod()
        return Int8HeadMethod() if isinstance(layer, ParallelLMHead) else None


def register() -> str:
    """Make ``QUANT_NAME`` known to vLLM in this process (once); returns the name."""
    with _lock:
        if QUANT_NAME not in QUANTIZATION_METHODS:
            register_quantization_config(QUANT_NAME)(Int8Config)
    return QUANT_NAME
