"""The command line: instant help, clear one-line errors before any engine starts, and real runs."""

import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
from typer.testing import CliRunner

from conftest import write_prompts
from pipeline.cli import app

runner = CliRunner()


def test_help_is_instant_and_lists_commands():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True)
    assert time.monotonic() - start < 20  # no Ray / vLLM import on --help (generous bound: noisy machine)
    for command in ("run", "generate", "models", "prompts"):
        assert command in proc.stdout
    code = "import sys, pipeline.cli; print(any(m.startswith(('vllm', 'ray')) for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_models_lists_builtins():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "demo" in result.output and "gpt2-small-random" in result.output


def _run(*args: str):
    return runner.invoke(app, ["run", *args])


def test_bad_input_is_one_clear_line(tmp_path):
    good = write_prompts(tmp_path / "p.parquet", ["hello"])
    cases = [
        (["--input", str(tmp_path / "missing.parquet"), "--output", str(tmp_path / "o1")], "does not exist"),
        (["--input", str(good), "--output", str(tmp_path / "o2"), "--prompt-column", "text"], "its columns are: prompt"),
        (["--input", str(good), "--output", str(tmp_path / "o3"), "--temperature", "-1"], "sampling.temperature"),
        (["--input", str(good), "--output", str(tmp_path / "o4"), "--top-p", "1.5"], "sampling.top_p"),
        (["--input", str(good), "--output", str(tmp_path / "o5"), "--max-tokens", "0"], "sampling.max_tokens"),
        (["--input", str(good), "--output", str(tmp_path / "o6"), "--model", "./no-such-model"], "does not exist"),
        (["--output", str(tmp_path / "o7")], "input: Field required"),
        (["--spec", str(tmp_path / "none.yaml")], "does not exist"),
    ]
    for args, needle in cases:
        result = _run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_corrupt_parquet_and_nonempty_output(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("garbage")
    result = _run("--input", str(bad), "--output", str(tmp_path / "o"))
    assert result.exit_code == 2 and "not a readable Parquet file" in result.output
    good = write_prompts(tmp_path / "p.parquet", ["hello"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.parquet").write_text("x")
    result = _run("--input", str(good), "--output", str(tmp_path / "full"))
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_run_end_to_end_with_spec_and_flags(tmp_path, ray_cluster):
    src = write_prompts(tmp_path / "p.parquet", [f"Number {i} is" for i in range(12)] + [None])
    spec = tmp_path / "job.yaml"
    spec.write_text(f"input: {src}\noutput: {tmp_path / 'out'}\nsampling:\n  max_tokens: 3\n  temperature: 0.8\n")
    result = _run("--spec", str(spec), "--max-tokens", "6", "--top-p", "0.95", "--seed", "0", "--batch-size", "5")
    assert result.exit_code == 0, result.output
    assert "job succeeded" in result.output and "rows out" in result.output
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 13 and table["error"].null_count == 12
    counts = [c for c in table["completion_tokens"].to_pylist() if c is not None]
    assert len(counts) == 12 and max(counts) <= 6
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["rows_out"] == 13


def test_generate_through_hub_id_in_offline_cache(tmp_path, demo_model):
    """`generate` loads 'gpt2' the real way: a hub id resolved from the HF cache, offline."""
    from test_models import make_hf_cache

    make_hf_cache(tmp_path, "openai-community/gpt2", demo_model)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "generate", "My name is Arthur and I live in", "--model", "gpt2",
         "--max-tokens", "8", "--temperature", "0", "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = json.loads(proc.stdout)
    assert len(samples) == 1 and 1 <= len(samples[0]["token_ids"]) <= 8 and samples[0]["text"]


def test_embed_command_writes_fixed_size_float32_vectors(tmp_path, ray_cluster):
    import numpy as np
    import pyarrow as pa

    src = write_prompts(tmp_path / "texts.parquet", ["The cat sat", "A different text", "The cat sat", None],
                        id=["a", "b", "c", "d"])
    result = runner.invoke(app, ["embed", "--input", str(src), "--output", str(tmp_path / "vecs"), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "vecs").sort_by("id")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["d"]["embedding"] is None and rows["d"]["error"].startswith("null_prompt")
    a, b, c = (np.array(rows[k]["embedding"]) for k in "abc")
    assert np.allclose(a, c, atol=1e-5) and not np.allclose(a, b, atol=1e-3)
    assert abs(np.linalg.norm(a) - 1) < 1e-4


def test_score_command_flags_reach_the_job(tmp_path, ray_cluster):
    import pyarrow as pa

    src = write_prompts(tmp_path / "texts.parquet", ["The cat sat on the mat", "Hello"], id=["a", "b"])
    result = runner.invoke(app, ["score", "--input", str(src), "--output", str(tmp_path / "scores"),
                                 "--score-first-token", "--token-logprobs"])
    assert result.exit_code == 0, result.output
    assert "corpus perplexity" in result.output
    table = pq.read_table(tmp_path / "scores")
    assert table.schema.field("token_logprobs").type == pa.list_(pa.float32())
    rows = {r["id"]: r for r in table.to_pylist()}
    for r in rows.values():  # the first token is scored after <|endoftext|>: even "Hello" has a score
        assert r["error"] is None and r["scored_tokens"] == r["prompt_tokens"] == len(r["token_logprobs"])
    job = json.loads((tmp_path / "scores" / "_job.json").read_text())
    assert job["config"]["task"] == "score" and job["fingerprint"]["score"]["score_first_token"] is True
