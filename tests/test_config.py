"""Config validation: bad values are refused with a clear message before any engine starts."""

import pytest
from pydantic import ValidationError

from pipeline.config import ConfigError, JobConfig, SamplingConfig, ServeConfig, build, load_spec


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("temperature", -0.1, "temperature"),
        ("top_p", 1.5, "top_p"),
        ("top_p", 0.0, "top_p"),
        ("max_tokens", 0, "max_tokens"),
        ("n", 0, "n"),
        ("top_k", -1, "top_k"),
        ("repetition_penalty", 0, "repetition_penalty"),
        ("seed", -3, "seed"),
    ],
)
def test_bad_sampling_values_are_refused(field, value, needle):
    with pytest.raises(ConfigError) as err:
        build(JobConfig, {"input": "x", "output": "y"}, {"sampling": {field: value}})
    assert f"sampling.{needle}" in str(err.value)


def test_min_tokens_over_max_tokens_is_refused():
    with pytest.raises(ConfigError, match="min_tokens"):
        build(SamplingConfig, {}, {"min_tokens": 10, "max_tokens": 5})


def test_unknown_option_is_refused():
    with pytest.raises(ConfigError, match="temprature"):
        build(JobConfig, {"input": "x", "output": "y", "sampling": {"temprature": 1}}, {})


def test_flags_override_spec_and_deep_merge(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("input: a.parquet\noutput: out\nsampling:\n  max_tokens: 10\n  temperature: 0.5\nengine:\n  model: demo\n")
    job = build(JobConfig, load_spec(spec), {"sampling": {"max_tokens": 20}, "engine": {"replicas": 2}})
    assert job.sampling.max_tokens == 20 and job.sampling.temperature == 0.5
    assert job.engine.model == "demo" and job.engine.replicas == 2


def test_spec_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_spec(bad)


def test_resume_and_overwrite_exclude_each_other():
    with pytest.raises(ConfigError, match="exclude"):
        build(JobConfig, {"input": "x", "output": "y", "resume": True, "overwrite": True}, {})


def test_sampling_kwargs_and_row_overrides():
    s = SamplingConfig(max_tokens=8, temperature=0, stop="\n", seed=3)
    kw = s.to_sampling_kwargs()
    assert kw["stop"] == ["\n"] and kw["temperature"] == 0 and kw["seed"] == 3
    assert s.with_overrides({"max_tokens": 4, "temperature": None}).max_tokens == 4
    with pytest.raises(Exception):
        s.with_overrides({"top_p": 7})


def test_serve_config_defaults_are_safe():
    cfg = ServeConfig()
    assert cfg.host == "127.0.0.1" and cfg.api_key is None


def test_ingress_auto_is_direct_only_on_an_embedded_ray_with_fixed_replicas():
    from pipeline.config import Ingress

    assert ServeConfig().resolved_ingress(embedded=True) == Ingress.direct
    assert ServeConfig().resolved_ingress(embedded=False) == Ingress.proxy
    assert ServeConfig(min_replicas=1, max_replicas=2).resolved_ingress(embedded=True) == Ingress.proxy
    resolved = ServeConfig(ingress="proxy").resolved_ingress(embedded=True)
    assert resolved == Ingress.proxy and isinstance(resolved, Ingress)
    with pytest.raises(ConfigError, match="autoscaling needs Serve's proxy"):
        build(ServeConfig, {"ingress": "direct", "max_replicas": 2}, {})


def test_input_and_output_formats():
    job = JobConfig(input="b.jsonl", output="o", input_format="openai-batch")
    assert job.id_column == "custom_id" and job.writes_openai_batch
    assert not JobConfig(input="b.jsonl", output="o", input_format="openai-batch", output_format="parquet").writes_openai_batch
    assert not JobConfig(input="p.csv", output="o").writes_openai_batch
    for bad, needle in [
        ({"output_format": "openai-batch"}, "needs input_format openai-batch"),
        ({"results": "r.jsonl"}, "needs openai-batch input"),
        ({"input_format": "openai-batch", "task": "embed"}, "task from each request's url"),
        ({"input_format": "xml"}, "input_format"),
    ]:
        with pytest.raises(ValidationError, match=needle):
            JobConfig(input="x", output="o", **bad)
