"""Decoding fields in jobs: spec keys and CLI flags, bad values refused before any engine starts
(exit 2), a labelling job whose rows are all labels, and per-row constraints."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import JobConfig
from tests.conftest import write_prompts

runner = CliRunner()


def test_spec_takes_vllms_names():
    base = {"input": "in.parquet", "output": "out"}
    job = JobConfig.model_validate({**base, "sampling": {"structured_outputs": {"choice": ["positive", "negative"]}}})
    assert job.sampling.structured_outputs.choice == ["positive", "negative"]
    job = JobConfig.model_validate({**base, "sampling": {"use_beam_search": True, "n": 4}})
    assert job.sampling.beam_width == 4
    job = JobConfig.model_validate({**base, "sampling": {"logit_bias": {"50256": -100}}})
    assert job.sampling.logit_bias == {50256: -100.0}
    job = JobConfig.model_validate({**base, "sampling": {"min_p": 0.1, "no_repeat_ngram_size": 3, "bad_words": ["x"],
                                                         "truncate_prompt_tokens": 100, "truncation_side": "left"}})
    assert job.sampling.to_sampling_kwargs()["extra_args"] == {"no_repeat_ngram_size": 3}


def test_bad_values_exit_2_before_any_engine(tmp_path):
    good = write_prompts(tmp_path / "p.parquet", ["hello"])
    (tmp_path / "bad.json").write_text('{"type": "foo"}')
    (tmp_path / "bad.gbnf").write_text("root ::= nowhere")
    spec = tmp_path / "job.yaml"
    spec.write_text(f"input: {good}\noutput: {tmp_path / 'o9'}\nsampling:\n  logit_bias: {{\"60000\": 1}}\n")
    cases = [
        (["--json-schema", str(tmp_path / "bad.json")], "Invalid type: foo"),
        (["--regex", "(abc"], "regex"),
        (["--grammar", str(tmp_path / "bad.gbnf")], "nowhere"),
        (["--choice", "a", "--regex", "b"], "exclude each other"),
        (["--num-beams", "2", "--top-p", "0.5"], "use_beam_search does not take top_p"),
        (["--min-p", "2"], "sampling.min_p"),
        (["--no-repeat-ngram-size", "-1"], "no_repeat_ngram_size"),
    ]
    for i, (args, needle) in enumerate(cases):
        result = runner.invoke(app, ["run", "--input", str(good), "--output", str(tmp_path / f"o{i}"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output, (args, result.output)
    result = runner.invoke(app, ["run", "--spec", str(spec)])
    assert result.exit_code == 2 and "out-of-vocab" in result.output, result.output


def test_labelling_job_and_row_constraints(tmp_path, ray_cluster):
    import jsonschema

    labels = ["positive", "negative", "neutral"]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    prompts = [f"Review {i}: the film was" for i in range(8)]
    src = write_prompts(tmp_path / "p.parquet", prompts,
                        json_schema=[None] * 6 + [json.dumps(schema)] * 2,
                        choice=[None] * 4 + [["yes", "no"]] * 2 + [None] * 2)
    args = ["run", "--input", str(src), "--output", str(tmp_path / "out"), "--seed", "0", "--max-tokens", "24"]
    result = runner.invoke(app, [*args, *(x for label in labels for x in ("--choice", label))])
    assert result.exit_code == 0, result.output
    rows = sorted(pq.read_table(tmp_path / "out").to_pylist(), key=lambda r: r["id"])
    assert all(r["error"] is None for r in rows)
    assert {r["generated_text"] for r in rows[:4]} <= set(labels)
    assert {r["generated_text"] for r in rows[4:6]} <= {"yes", "no"}
    for r in rows[6:]:
        jsonschema.validate(json.loads(r["generated_text"]), schema)
