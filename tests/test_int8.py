"""``quantization: int8`` on real vLLM: the weights' rounding, and jobs whose engines run the
linear layers in int8 (a generation job, and a score job checked against the float32 engine)."""

import math

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


def test_int8_jobs_generate_and_score_close_to_float32(tmp_path, ray_cluster, engine, loop):
    from pipeline.batch import run_job
    from pipeline.config import JobConfig

    src = write_prompts(tmp_path / "in.parquet", TEXTS + [None], id=pa.array(range(5), pa.int64()))
    gen = run_job(JobConfig(input=str(src), output=str(tmp_path / "gen"), batch_size=2,
                            engine={"model": "demo", "quantization": "int8"},
                            sampling={"max_tokens": 8, "temperature": 0, "ignore_eos": True}))
    assert gen.status == "succeeded", gen.message
    assert (gen.quantization, gen.rows_out, gen.error_rows, gen.missing, gen.duplicates) == ("int8", 5, 1, 0, 0)
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "gen").to_pylist()}
    assert rows[4]["error"] and all(rows[i]["completion_tokens"] == 8 and rows[i]["generated_text"] for i in range(4))

    score = run_job(JobConfig(input=str(src), output=str(tmp_path / "score"), task="score", batch_size=2,
                              engine={"model": "demo", "quantization": "int8"}))
    assert score.status == "succeeded" and score.quantization == "int8", score.message
    int8_nll = {r["id"]: r["nll"] for r in pq.read_table(tmp_path / "score").to_pylist() if not r["error"]}
    assert sorted(int8_nll) == [0, 1, 2, 3]
    for i, text in enumerate(TEXTS):
        exact = loop.run(engine.score(engine.encode(text, check_length=False))).nll  # the float32 engine
        # quantized (not the float32 path), yet within 2% of it
        assert int8_nll[i] != exact and math.isclose(int8_nll[i], exact, rel_tol=0.02), (text, int8_nll[i], exact)


def test_int8_resume_must_match_the_quantization(tmp_path):
    from pipeline.config import JobConfig

    base = dict(input=str(tmp_path / "x.parquet"), output=str(tmp_path / "out"))
    plain, int8 = JobConfig(**base), JobConfig(**base, engine={"quantization": "int8"})
    assert "quantization" not in plain.fingerprint()  # jobs written before the option resume as before
    assert int8.fingerprint()["quantization"] == "int8" and int8.fingerprint() != plain.fingerprint()


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
