"""``quantization: int8`` and ``kv_cache_dtype: fp8`` on real vLLM: the weights' rounding, the LM head's
int8 slices, and jobs through the CLI whose engines run them (a generation job, and score jobs checked
against the float32 engine)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_prompts

TEXTS = ["My name is Arthur and I live in", "Hello, I'm a language model,", "The history of the city begins",
         "In a shocking finding, scientists discovered a herd of unicorns"]


def test_rows_round_to_within_half_a_step_and_a_zero_row_stays_zero():
    import torch

    from pipeline.engine.int8 import quantize_rows

    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different sizes
    w[5] = 0.0
    q, scales = quantize_rows(w.to(torch.bfloat16))
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (64,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    back = q.float() * scales[:, None]
    step = scales[:, None].expand_as(w)
    assert bool(((back - w.to(torch.bfloat16).float()).abs() <= step / 2 + 1e-6 * w.abs()).all())
    assert not bool(q[5].any()) and bool(torch.isfinite(scales).all())


def test_the_lm_head_in_int8_slices_adds_up_to_one_matmul_and_keeps_its_weight():
    import torch

    from pipeline.engine.int8 import HEAD_SLICE, Int8HeadMethod, quantize_rows

    torch.manual_seed(0)
    head = torch.nn.Module()
    weight = torch.randn(2 * HEAD_SLICE + 100, 64) * 0.05  # two whole slices and a short one
    head.weight = torch.nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
    Int8HeadMethod().process_weights_after_loading(head)
    assert [h.n for h in head.int8_handlers] == [HEAD_SLICE, HEAD_SLICE, 100]
    assert head.weight.shape == weight.shape  # still there for the tied embedding's lookups

    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    logits = Int8HeadMethod().apply(head, x)
    assert logits.shape == (2, 3, weight.size(0)) and logits.dtype == torch.bfloat16
    q, scales = quantize_rows(head.weight.data)
    x_scales = x.float().abs().amax(dim=-1, keepdim=True) / 127.0
    x_q = (x.float() / x_scales).round().clamp(-127, 127)
    expected = (x_q * x_scales) @ (q.float() * scales[:, None]).t()  # the int8 product, in float
    assert torch.allclose(logits.float(), expected, atol=2e-2, rtol=1e-2)
    exact = x.float() @ head.weight.float().t()
    assert (logits.float() - exact).abs().max() < 0.05 * exact.abs().max()
    bias = torch.randn(weight.size(0)).to(torch.bfloat16)  # each slice adds its own part
    with_bias = Int8HeadMethod().apply(head, x, bias)
    assert torch.allclose(with_bias.float(), logits.float() + bias.float(), atol=2e-2, rtol=1e-2)


def _cli_job(*args: str) -> dict:
    """A job through the CLI in a process of its own (the test run's warm engines stay as they are)."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args, "--model", "demo", "--quantization", "int8",
                           "--batch-size", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads((Path(args[args.index("--output") + 1]) / "_summary.json").read_text())


def test_int8_jobs_generate_and_score_close_to_float32(tmp_path, engine, loop):
    src = write_prompts(tmp_path / "in.parquet", TEXTS + [None], id=pa.array(range(5), pa.int64()))
    gen = _cli_job("run", "--input", str(src), "--output", str(tmp_path / "gen"), "--max-tokens", "8",
                   "--temperature", "0", "--ignore-eos")
    assert gen["status"] == "succeeded", gen["message"]
    assert [gen[k] for k in ("quantization", "rows_out", "error_rows", "missing", "duplicates")] == ["int8", 5, 1, 0, 0]
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "gen").to_pylist()}
    assert rows[4]["error"] and all(rows[i]["completion_tokens"] == 8 and rows[i]["generated_text"] for i in range(4))

    score = _cli_job("score", "--input", str(src), "--output", str(tmp_path / "score"))
    assert score["status"] == "succeeded" and score["quantization"] == "int8", score["message"]
    int8_nll = {r["id"]: r["nll"] for r in pq.read_table(tmp_path / "score").to_pylist() if not r["error"]}
    assert sorted(int8_nll) == [0, 1, 2, 3]
    for i, text in enumerate(TEXTS):
        exact = loop.run(engine.score(engine.encode(text, check_length=False))).nll  # the float32 engine
        # quantized (not the float32 path), yet within 2% of it
        assert int8_nll[i] != exact and math.isclose(int8_nll[i], exact, rel_tol=0.02), (text, int8_nll[i], exact)

    fp8 = _cli_job("score", "--input", str(src), "--output", str(tmp_path / "fp8"), "--kv-cache-dtype", "fp8")
    assert [fp8[k] for k in ("status", "quantization", "kv_cache_dtype", "error_rows")] == ["succeeded", "int8", "fp8", 1]
    fp8_nll = {r["id"]: r["nll"] for r in pq.read_table(tmp_path / "fp8").to_pylist() if not r["error"]}
    assert sorted(fp8_nll) == [0, 1, 2, 3] and fp8_nll != int8_nll  # the KV cache in fp8 changed the result...
    for i, text in enumerate(TEXTS):  # ... and stays within 2% of float32's
        exact = loop.run(engine.score(engine.encode(text, check_length=False))).nll
        assert math.isclose(fp8_nll[i], exact, rel_tol=0.02), (text, fp8_nll[i], exact)


def test_an_embedding_job_runs_in_int8_with_an_fp8_kv_cache(tmp_path):
    import numpy as np

    # a pooling model has no LM head to load: its int8 method must leave it alone
    src = write_prompts(tmp_path / "in.parquet", ["The cat sat", "A different text", "The cat sat", None],
                        id=pa.array(range(4), pa.int64()))
    summary = _cli_job("embed", "--input", str(src), "--output", str(tmp_path / "vecs"), "--kv-cache-dtype", "fp8")
    assert [summary[k] for k in ("status", "quantization", "kv_cache_dtype", "rows_out", "error_rows")] == \
        ["succeeded", "int8", "fp8", 4, 1], summary["message"]
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "vecs").to_pylist()}
    assert rows[3]["embedding"] is None and rows[3]["error"]
    a, b, c = (np.array(rows[i]["embedding"]) for i in range(3))
    assert np.allclose(a, c, atol=1e-5) and not np.allclose(a, b, atol=1e-3) and abs(np.linalg.norm(a) - 1) < 1e-4


def test_int8_resume_must_match_the_quantization(tmp_path):
    from pipeline.config import JobConfig

    base = dict(input=str(tmp_path / "x.parquet"), output=str(tmp_path / "out"))
    plain, int8 = JobConfig(**base), JobConfig(**base, engine={"quantization": "int8"})
    assert "quantization" not in plain.fingerprint()  # jobs written before the option resume as before
    assert int8.fingerprint()["quantization"] == "int8" and int8.fingerprint() != plain.fingerprint()
    assert "kv_cache_dtype" not in plain.fingerprint()
    fp8 = JobConfig(**base, engine={"kv_cache_dtype": "fp8"})
    assert fp8.fingerprint()["kv_cache_dtype"] == "fp8" and fp8.fingerprint() != plain.fingerprint()


def test_an_fp8_kv_cache_reaches_vllm_at_a_quarter_of_float32s_bytes(demo_model):
    from pydantic import ValidationError

    from pipeline.config import EngineConfig, Task
    from pipeline.engine.args import cpu_kv_cache_bytes, engine_args

    plain, fp8 = EngineConfig(model="demo"), EngineConfig(model="demo", kv_cache_dtype="fp8_e5m2")
    assert engine_args(fp8, Task.generate, False).kv_cache_dtype == "fp8_e5m2"
    assert engine_args(plain, Task.generate, False).kv_cache_dtype == "auto"
    # the same tokens in a quarter of the bytes (demo is under the 2 GiB cap either way)
    assert cpu_kv_cache_bytes(fp8, demo_model, "float32") * 4 == cpu_kv_cache_bytes(plain, demo_model, "float32")
    with pytest.raises(ValidationError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int4")


def test_int8_is_refused_on_a_gpu_and_bad_values_are_refused(demo_model):
    from pydantic import ValidationError

    from pipeline.config import EngineConfig, Task
    from pipeline.engine.args import engine_args
    from test_gpu import CUDA

    with pytest.raises(ValidationError, match="int8 runs on CPUs only"):
        EngineConfig(model="demo", quantization="int8", gpus_per_replica=1)
    with pytest.raises(ValueError, match="int8 runs on CPUs only"):  # a GPU found where none was asked for
        engine_args(EngineConfig(model="demo", quantization="int8"), Task.generate, False, platform=CUDA)
    with pytest.raises(ValidationError, match="quantization"):
        EngineConfig(quantization="int4")
