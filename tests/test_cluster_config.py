"""cluster.yaml passes Ray's own cluster-launcher validation (the checks `ray up` runs).

`ray up` calls ``prepare_config`` (merge with the provider's defaults.yaml) and then
``validate_config`` (the JSON schema ``ray/autoscaler/ray-schema.json`` plus consistency checks).
Both run offline; the AWS calls `ray up` makes afterwards (resource auto-fill, bootstrap) are not
exercised here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


def _ray_validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _schema_validate(config: dict) -> None:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_validation(config):
    _schema_validate(config)  # as written, before Ray fills defaults in
    prepared = _ray_validate(config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_cluster_has_cpu_head_and_autoscaling_gpu_workers(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker node type"
    assert any(t["node_config"]["InstanceType"] == "g5.xlarge" for t in gpu_types.values())
    for t in gpu_types.values():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu_types.values())


def test_cluster_installs_project_and_exposes_jobs_and_serve(config):
    setup = " ".join(config["setup_commands"])
    assert "gpt2-pipeline[gpu]" in setup
    assert any("gpt2-pipeline" in remote for remote in config["file_mounts"])
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-port=8265" in start and "--dashboard-host=0.0.0.0" in start
    assert "serve start" in start


@pytest.mark.parametrize("breakage", ["unknown_key", "bad_resources", "no_node_config", "bad_head_type", "min_over_max"])
def test_broken_copies_fail(config, breakage):
    broken = copy.deepcopy(config)
    gpu = next(name for name, t in broken["available_node_types"].items() if t["resources"].get("GPU"))
    if breakage == "unknown_key":
        broken["max_wrokers"] = 3
    elif breakage == "bad_resources":
        broken["available_node_types"][gpu]["resources"]["GPU"] = "one"
    elif breakage == "no_node_config":
        del broken["available_node_types"][gpu]["node_config"]
    elif breakage == "bad_head_type":
        broken["head_node_type"] = "no-such-type"
    elif breakage == "min_over_max":
        broken["max_workers"] = 1
        for t in broken["available_node_types"].values():
            t["min_workers"] = 1
    import jsonschema

    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_validate(broken)
