"""KubeRay manifests: rendered from every job spec and committed in deploy/kuberay/, validated
against KubeRay's own CRD schemas (pinned in tests/data/kuberay-crds/), with the embedded spec
validated by our own config models and the Serve config by Ray Serve's schema."""

from __future__ import annotations

import copy
import json
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import k8s
from pipeline.cli import app
from pipeline.config import JobConfig, ServeConfig, build, merge

ROOT = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).parent / "data" / "kuberay-crds"
DEPLOY = ROOT / "deploy" / "kuberay"
SPECS = sorted((ROOT / "jobs").glob("*.yaml"))
# The committed examples and the exact command line that renders each (see deploy/kuberay/README.md).
EXAMPLES = {
    "rayjob-bulk-gpu.yaml": ["jobs/bulk_gpu.yaml", "--output", "s3://my-bucket/gpt2/bulk-gpu"],
    "rayservice.yaml": ["jobs/serve.yaml", "--gpus-per-replica", "1"],
}
# `run` flags the RayJob entrypoint may carry, and where they land in a JobConfig.
RUN_FLAGS = {"--input": ("input",), "--output": ("output",), "--replicas": ("engine", "replicas"),
             "--gpus-per-replica": ("engine", "gpus_per_replica"),
             "--tensor-parallel-size": ("engine", "tensor_parallel_size")}


def strict(schema: Any) -> Any:
    """Reject unknown fields, as the API server does with strict field validation (the CRD
    schemas themselves only prune them): every object schema listing properties gets
    ``additionalProperties: false`` unless it preserves unknown fields."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def validator(kind: str) -> jsonschema.Draft7Validator:
    name = {"RayJob": "ray.io_rayjobs.v1.json", "RayService": "ray.io_rayservices.v1.json"}[kind]
    schema = strict(json.loads((CRDS / name).read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


CONFIG_MAP = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "data"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "v1"}, "kind": {"const": "ConfigMap"},
        "metadata": {"type": "object", "required": ["name"]},
        "data": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def errors(doc: dict) -> list[str]:
    v = validator(doc["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def check(docs: list[dict]) -> tuple[dict, Any]:
    """Validate a ConfigMap + RayJob/RayService pair end to end; return the resource and its config."""
    assert [d["kind"] for d in docs][0] == "ConfigMap" and len(docs) == 2
    cm, res = docs
    jsonschema.validate(cm, CONFIG_MAP)
    assert res["apiVersion"] == "ray.io/v1"
    assert errors(res) == []
    cluster = res["spec"]["rayClusterSpec" if res["kind"] == "RayJob" else "rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # the spec is mounted in every pod, from this ConfigMap
        (mount,) = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "spec"]
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "spec"]
        assert volume["configMap"]["name"] == cm["metadata"]["name"]
    spec_path = f"{mount['mountPath']}/{k8s.SPEC_FILE}"
    spec = yaml.safe_load(cm["data"][k8s.SPEC_FILE])
    if res["kind"] == "RayJob":
        entrypoint = res["spec"]["entrypoint"]
        assert not set(entrypoint) & set(";&|<>$`'\"*?()\n"), entrypoint  # KubeRay pastes it into a shell line
        assert yaml.safe_load(res["spec"]["runtimeEnvYAML"]) == {"working_dir": k8s.PROJECT_DIR}
        words = shlex.split(entrypoint)
        assert words[:4] == ["gpt2-pipeline", "run", "--spec", spec_path]
        overrides: dict = {}
        for flag, value in zip(words[4::2], words[5::2]):
            where = RUN_FLAGS[flag]
            overrides = merge(overrides, {where[0]: value} if len(where) == 1 else {where[0]: {where[1]: value}})
        cfg = build(JobConfig, spec, overrides)
        engine_group = cluster["workerGroupSpecs"][0]
        assert engine_group["replicas"] * max(1, _gpus(engine_group)) >= cfg.engine.replicas * cfg.engine.gpus_per_replica
        return res, cfg
    from ray.serve.schema import ServeDeploySchema

    serve = ServeDeploySchema.model_validate(yaml.safe_load(res["spec"]["serveConfigV2"]))
    (application,) = serve.applications
    assert application.import_path == "pipeline.serving.server:app_builder"
    args = dict(application.args)
    assert args.pop("spec") == spec_path
    cfg = build(ServeConfig, spec, args)
    assert application.name == cfg.name
    return res, cfg


def _gpus(group: dict) -> int:
    return int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get(k8s.GPU_RESOURCE, 0))


def render(*args: str) -> tuple[list[dict], str]:
    result = CliRunner().invoke(app, ["k8s", "render", *args])
    assert result.exit_code == 0, result.output
    return list(yaml.safe_load_all(result.stdout)), result.stderr


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_every_spec_renders_a_valid_manifest(spec: Path):
    docs, _ = render(str(spec.relative_to(ROOT)))
    res, cfg = check(docs)
    assert res["kind"] == ("RayService" if isinstance(cfg, ServeConfig) else "RayJob")
    assert yaml.safe_load(docs[0]["data"]["spec.yaml"]) == yaml.safe_load(spec.read_text())  # verbatim


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_committed_examples_are_valid_and_current(name: str):
    committed = list(yaml.safe_load_all((DEPLOY / name).read_text()))
    check(committed)
    fresh, _ = render(*EXAMPLES[name])
    assert committed == fresh, f"re-render: gpt2-pipeline k8s render {' '.join(EXAMPLES[name])} -o deploy/kuberay/{name}"


def test_broken_manifests_fail_validation():
    docs, _ = render("jobs/bulk_gpu.yaml")
    job = docs[1]
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"
    assert any("replicas" in e and "integer" in e for e in errors(wrong_type))
    typo = copy.deepcopy(job)
    typo["spec"]["entrypont"] = typo["spec"].pop("entrypoint")
    assert any("entrypont" in e for e in errors(typo))
    no_template = copy.deepcopy(job)
    del no_template["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    assert any("template" in e for e in errors(no_template))
    bad_enum = copy.deepcopy(job)
    bad_enum["spec"]["submissionMode"] = 7
    assert errors(bad_enum)


def test_gpu_sizing_follows_the_engine():
    docs, _ = render("jobs/bulk_gpu.yaml")  # 4 replicas x 1 GPU
    group = docs[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"], _gpus(group)) == (4, 4, 4, 1)
    assert docs[1]["spec"]["backoffLimit"] == 2  # resume: true, so a retry finishes the job
    docs, _ = render("jobs/bulk_gpu.yaml", "--tensor-parallel-size", "4", "--gpus-per-replica", "4", "--replicas", "2")
    group = docs[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert (group["replicas"], _gpus(group)) == (2, 4)
    entrypoint = docs[1]["spec"]["entrypoint"].split()
    for flag, value in (("--tensor-parallel-size", "4"), ("--gpus-per-replica", "4"), ("--replicas", "2")):
        assert entrypoint[entrypoint.index(flag) + 1] == value
    docs, _ = render("jobs/bulk_gpu.yaml", "--gpus-per-replica", "0.5", "--workers", "3", "--gpus-per-worker", "2")
    group = docs[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert (group["replicas"], _gpus(group)) == (3, 2)
    docs, _ = render("jobs/serve.yaml", "--gpus-per-replica", "1")  # autoscaling 1..4 replicas
    cluster = docs[1]["spec"]["rayClusterConfig"]
    group = cluster["workerGroupSpecs"][0]
    assert cluster["enableInTreeAutoscaling"] is True
    assert (group["minReplicas"], group["maxReplicas"], _gpus(group)) == (1, 4, 1)


def test_options_and_file_output(tmp_path: Path):
    target = tmp_path / "k" / "job.yaml"
    result = CliRunner().invoke(app, ["k8s", "render", "jobs/demo.yaml", "--name", "My_Job", "-n", "batch",
                                      "--image", "registry.example/gpt2:1", "--hf-cache-pvc", "hf", "--service-account", "s3-writer",
                                      "-o", str(target)])
    assert result.exit_code == 0, result.output
    cm, job = yaml.safe_load_all(target.read_text())
    assert (job["metadata"]["name"], job["metadata"]["namespace"], cm["metadata"]["name"]) == ("my-job", "batch", "my-job-spec")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "registry.example/gpt2:1"
    assert head["serviceAccountName"] == "s3-writer"
    assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf", "readOnly": True}} in head["volumes"]
    assert "is a path inside the head pod" in result.stderr  # out/demo is lost with the pod
    check([cm, job])


@pytest.mark.parametrize("args, message", [
    (["jobs/missing.yaml"], "does not exist"),
    (["jobs/serve.yaml", "--output", "s3://b/x"], "are for job specs"),
    (["jobs/bulk_gpu.yaml", "--tensor-parallel-size", "4", "--gpus-per-replica", "4", "--gpus-per-worker", "2"],
     "raise --gpus-per-worker"),
    (["jobs/bulk.yaml", "--gpus-per-replica", "-1"], "gpus_per_replica"),
    (["jobs/bulk.yaml", "--kind", "RayService"], "input"),
    (["jobs/bulk.yaml", "--input", "s3://b/*.parquet"], "put this value in the spec"),
])
def test_bad_input_is_one_line_exit_2(args: list[str], message: str):
    result = CliRunner().invoke(app, ["k8s", "render", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_serve_spec_refusals(tmp_path: Path):
    spec = tmp_path / "serve.yaml"
    spec.write_text("name: gpt2\ningress: direct\nengine: {model: demo}\n")
    result = CliRunner().invoke(app, ["k8s", "render", str(spec)])
    assert result.exit_code == 2 and "ingress 'direct'" in result.output
    spec.write_text("name: gpt2\napi_key: sk-secret\nengine: {model: demo}\n")
    result = CliRunner().invoke(app, ["k8s", "render", str(spec)])
    assert result.exit_code == 2 and "--api-key-secret" in result.output and "sk-secret" not in result.output
    spec.write_text("name: gpt2\nengine: {model: demo}\n")
    docs, _ = render(str(spec), "--api-key-secret", "gpt2-key")
    env = docs[1]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "GPT2_PIPELINE_API_KEY", "valueFrom": {"secretKeyRef": {"name": "gpt2-key", "key": "api-key"}}} in env


def test_app_builder_reads_the_mounted_spec_with_overrides():
    """The RayService's import path and args build our Serve app (proxy ingress, overrides applied)."""
    from pipeline.serving.server import app_builder

    docs, _ = render("jobs/serve.yaml", "--gpus-per-replica", "1")
    serve = yaml.safe_load(docs[1]["spec"]["serveConfigV2"])
    # model overridden to the built-in: build_app resolves (on a cluster: downloads) the model first
    args = dict(serve["applications"][0]["args"], spec=str(ROOT / "jobs" / "serve.yaml"), model="demo")
    application = app_builder(args)
    deployment = application._bound_deployment
    cfg: ServeConfig = deployment.init_args[0]
    assert (cfg.name, cfg.engine.model, cfg.engine.gpus_per_replica, cfg.ingress) == ("gpt2", "demo", 1.0, "proxy")
    assert deployment.ray_actor_options["num_gpus"] == 1.0
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    flat = app_builder({"model": "demo", "replicas": "2"})._bound_deployment  # `serve run ... model=demo replicas=2`
    assert (flat.init_args[0].engine.model, flat.init_args[0].engine.replicas, flat.init_args[0].ingress) == ("demo", 2, "proxy")
    assert flat._deployment_config.num_replicas == 2
