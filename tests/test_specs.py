"""Every YAML spec in jobs/ is valid for the config model the CLI builds from it.

A file whose name starts with ``serve`` is a ``ServeConfig`` (``gpt2-pipeline serve --spec``);
every other one is a ``JobConfig`` (``run --spec`` / ``submit``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, JobConfig, ServeConfig, build, load_spec

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
SPECS = sorted(JOBS.glob("*.yaml")) + sorted(JOBS.glob("*.yml"))


def model_for(path: Path) -> type:
    return ServeConfig if path.name.startswith("serve") else JobConfig


def load(name: str):
    path = JOBS / name
    return build(model_for(path), load_spec(path), {})


def test_specs_exist():
    names = {p.name for p in SPECS}
    assert {"demo.yaml", "bulk.yaml", "embeddings.yaml", "resume.yaml", "via_serve.yaml", "serve.yaml"} <= names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_spec_is_valid(path: Path):
    config = build(model_for(path), load_spec(path), {})
    if isinstance(config, JobConfig):
        # Local inputs are given relative to the project folder (the CLI's and the Jobs working dir).
        if "://" not in config.input:
            assert (ROOT / config.input).exists(), f"{path.name}: input {config.input} does not exist"
        assert not config.output.startswith("/"), f"{path.name}: use a relative or URI output"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_spec_is_described_in_readme(path: Path):
    assert f"`{path.name}`" in (JOBS / "README.md").read_text()


def test_uses():
    assert load("embeddings.yaml").task == "embed"
    resume = load("resume.yaml")
    assert resume.resume and not resume.overwrite
    serve = load("serve.yaml")
    assert load("via_serve.yaml").via_serve == serve.name
    gpu = load("bulk_gpu.yaml")
    assert gpu.engine.gpus_per_replica >= 1
    assert load("bulk.yaml").engine.gpus_per_replica == 0  # runs on a laptop unchanged


def test_cli_flags_override_a_spec():
    spec = load_spec(JOBS / "bulk.yaml")
    job = build(JobConfig, spec, {"output": "s3://bucket/out", "engine": {"gpus_per_replica": 1, "replicas": 8}})
    assert (job.output, job.engine.gpus_per_replica, job.engine.replicas) == ("s3://bucket/out", 1, 8)
    assert job.engine.model == "gpt2"  # untouched keys keep the spec's value
    assert build(JobConfig, spec, {"resume": True}).resume  # `submit jobs/bulk.yaml --resume` is valid


def test_invalid_spec_is_rejected(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((JOBS / "bulk.yaml").read_text() + "\nbatch_sise: 3\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        build(JobConfig, load_spec(bad), {})
    with pytest.raises(ConfigError, match="serve"):
        build(ServeConfig, {"name": "x", "via_serve": "y"}, {})
