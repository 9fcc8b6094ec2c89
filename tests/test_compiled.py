"""Compiled or eager: a CPU job compiles its engines when it is big enough to pay for the compile,
and vLLM's compiled graphs are kept beside the model cache."""

import json
import os

import pyarrow.parquet as pq

from pipeline.config import EngineConfig
from pipeline.engine.compiled import (
    CACHE_ENV, COMPILE_MIN_WORK, CompileChoice, choose_compile, compile_cache_env, job_compile, model_shape,
    serve_compile,
)
from pipeline.models import cache_dir, resolve_model

GPT2_SMALL = 124_318_464


def test_big_jobs_compile_small_ones_and_tiny_models_stay_eager():
    config = EngineConfig(model="gpt2-small-random")
    enough = int(COMPILE_MIN_WORK / GPT2_SMALL) + 1
    assert choose_compile(config, enough, GPT2_SMALL, 768).enforce_eager is False  # about 320k tokens
    assert choose_compile(config, enough - 1000, GPT2_SMALL, 768).enforce_eager is True
    assert choose_compile(config, 256 * 64, GPT2_SMALL, 768).enforce_eager is True  # the 256 x 64 job
    assert choose_compile(config, 3000 * 64, GPT2_SMALL, 768).enforce_eager is True  # measured: a tie
    assert choose_compile(config, 10_000 * 64, GPT2_SMALL, 768).enforce_eager is False
    tiny = choose_compile(config, 10**9, 6_957_184, 128)
    assert tiny.enforce_eager is True and "hidden size 128" in tiny.reason
    for value in (True, False):  # an explicit setting wins
        assert choose_compile(EngineConfig(enforce_eager=value), 10**9, GPT2_SMALL, 768) == CompileChoice(value, "requested")


def test_gpu_replicas_keep_vllms_cuda_graphs():
    choice = job_compile(EngineConfig(model="demo", gpus_per_replica=1), resolve_model("demo"), 10)
    assert choice.enforce_eager is False and "GPU" in choice.reason


def test_servers_compile_their_model_unless_it_is_tiny_or_the_user_chose():
    config, choice = serve_compile(EngineConfig(model="gpt2-small-random"))
    assert config.enforce_eager is False and choice.enforce_eager is False and "server compiles" in choice.reason
    config, choice = serve_compile(EngineConfig(model="demo"))
    assert config.enforce_eager is True and "hidden size 128" in choice.reason
    config, choice = serve_compile(EngineConfig(model="gpt2-small-random", enforce_eager=True))
    assert config.enforce_eager is True and choice == CompileChoice(True, "requested")
    config, choice = serve_compile(EngineConfig(model="gpt2-small-random", gpus_per_replica=1))
    assert config.enforce_eager is None and "GPU" in choice.reason  # vLLM's CUDA graphs, unchanged


def test_model_shape_counts_gpt2_small():
    params, hidden = model_shape(resolve_model("gpt2-small-random"))
    assert hidden == 768 and abs(params - 124_439_808) / 124_439_808 < 0.01  # GPT-2 124M


def test_compile_cache_sits_beside_the_model_cache(monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert compile_cache_env() is True and os.environ[CACHE_ENV] == str(cache_dir().parent / "vllm")
    monkeypatch.setenv(CACHE_ENV, "/somewhere")
    assert compile_cache_env() is False and os.environ[CACHE_ENV] == "/somewhere"


def test_a_compiled_job_runs_and_says_so(tmp_path):
    """A real job with compiled engines (``--no-eager``: demo is too small for auto to compile), in a
    process of its own: rows out, the summary says compiled, and vLLM's compile cache is written
    beside the model cache."""
    import subprocess
    import sys

    from pipeline.prompts import write_prompt_set

    write_prompt_set(tmp_path / "in.parquet", 24, seed=3)
    env = {k: v for k, v in os.environ.items() if k != CACHE_ENV}
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", "--input", str(tmp_path / "in.parquet"),
                          "--output", str(tmp_path / "out"), "--model", "demo", "--max-tokens", "4", "--temperature", "0",
                          "--ignore-eos", "--no-eager"], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert saved["status"] == "succeeded" and saved["rows_out"] == 24
    assert saved["compiled"] is True and saved["compile_reason"] == "requested"
    assert pq.read_table(tmp_path / "out")["completion_tokens"].to_pylist() == [4] * 24
    assert any((cache_dir().parent / "vllm").rglob("*")), "no compiled graphs cached"
