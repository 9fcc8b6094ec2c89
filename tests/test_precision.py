"""``dtype: auto``: one decision (dtype and reason) from the machine's facts, injected and real."""

from pathlib import Path

import pytest

from pipeline.config import EngineConfig, Task
from pipeline.engine.precision import MIN_BF16_HIDDEN, Precision, choose_dtype, cpu_flags, resolve_dtype

GPT2_SMALL = 768


def cpu(flags, hidden=GPT2_SMALL, task=Task.generate, requested="auto") -> Precision:
    return choose_dtype(requested, task, on_cpu=True, hidden_size=hidden, flags=flags)


def test_cpu_with_amx_or_avx512_bf16_runs_bfloat16():
    assert cpu({"avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}) == Precision("bfloat16", "auto: CPU has AMX (amx_bf16)")
    assert cpu({"avx512f", "avx512_bf16"}) == Precision("bfloat16", "auto: CPU has AVX512-BF16 (avx512_bf16)")


def test_cpu_without_a_fast_bf16_path_runs_float32():
    for flags in (set(), {"avx2", "fma"}, {"avx512f", "avx512bw"}):
        assert cpu(flags) == Precision("float32", "auto: CPU has no AMX or AVX512-BF16")


def test_a_model_too_small_for_bf16_to_pay_stays_float32():
    small = cpu({"amx_bf16"}, hidden=128)
    assert small.dtype == "float32" and "hidden size 128" in small.reason
    assert cpu({"amx_bf16"}, hidden=MIN_BF16_HIDDEN).dtype == "bfloat16"


def test_score_stays_float32_and_an_explicit_dtype_wins():
    assert cpu({"amx_bf16"}, task=Task.score).dtype == "float32"
    assert "score task" in cpu({"amx_bf16"}, task=Task.score).reason
    assert cpu({"amx_bf16"}, requested="float32") == Precision("float32", "requested")
    assert cpu(set(), requested="bfloat16", task=Task.score) == Precision("bfloat16", "requested")


def test_gpu_runs_half_precision_like_vllms_auto():
    gpu = dict(on_cpu=False, hidden_size=GPT2_SMALL)
    assert choose_dtype("auto", Task.generate, gpu_dtypes=["bfloat16", "float16", "float32"], **gpu).dtype == "bfloat16"
    assert choose_dtype("auto", Task.generate, gpu_dtypes=["float16", "float32"], **gpu).dtype == "float16"  # pre-Ampere
    assert choose_dtype("auto", Task.embed, gpu_dtypes=["bfloat16", "float16", "float32"], embed=True, **gpu).dtype == "float16"
    assert choose_dtype("auto", Task.generate, checkpoint="bfloat16", gpu_dtypes=["bfloat16", "float16"], **gpu).reason == \
        "auto: GPU, the checkpoint's bfloat16"
    assert choose_dtype("auto", Task.score, gpu_dtypes=["bfloat16"], **gpu).dtype == "float32"


def test_this_machines_cpuinfo(tmp_path):
    text = Path("/proc/cpuinfo").read_text()
    line = next(x for x in text.splitlines() if x.startswith("flags"))
    flags = cpu_flags()
    assert flags == frozenset(line.partition(":")[2].split())
    expected = "bfloat16" if {"amx_bf16", "avx512_bf16"} & flags else "float32"
    assert cpu(flags).dtype == expected
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpu_flags(tmp_path / "cpuinfo") == {"fpu", "sse", "avx2"}


@pytest.mark.parametrize("model", ["demo", "gpt2-small-random"])
def test_resolve_reads_the_model_and_this_platform(model):
    """The built-in models as vLLM's platform here sees them (the demo model keeps HF parity)."""
    generate = resolve_dtype(EngineConfig(model=model), Task.generate)
    fast = bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    assert generate.dtype == ("bfloat16" if fast and model != "demo" else "float32")
    assert resolve_dtype(EngineConfig(model=model), Task.score).dtype == "float32"
    assert resolve_dtype(EngineConfig(model=model, dtype="bfloat16"), Task.score) == Precision("bfloat16", "requested")


def test_fused_gelu_in_half_precision_and_vllms_formula_in_float32():
    """Eager CPU engines run GPT-2's GELU as ATen's fused tanh kernel in bfloat16 (vLLM: six ops);
    float32 keeps vLLM's op-by-op formula (HF's), so float32 tokens stay equal to HF's."""
    import math

    import torch
    from vllm.model_executor.layers.activation import NewGELU

    from pipeline.engine.cpu_ops import use_fused_gelu

    use_fused_gelu()
    use_fused_gelu()  # once per process: a second call changes nothing
    gelu = NewGELU.__new__(NewGELU)  # the formula needs no module state (nor a vLLM config)
    x = torch.linspace(-6, 6, 3001)
    exact = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    assert torch.equal(gelu.forward_cpu(x), gelu.forward_native(x))
    half = gelu.forward_cpu(x.bfloat16())
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), exact, rtol=1e-2, atol=1e-2)
    assert (half.float() - exact).abs().max() <= (gelu.forward_native(x.bfloat16()).float() - exact).abs().max()
