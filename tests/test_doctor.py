"""``gpt2-pipeline doctor``: real probes on this machine (CPU vLLM, no GPU), a real Ray."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipeline.cli import app


@pytest.fixture
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def doctor(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["doctor", *args])
    return result.exit_code, result.stdout


def test_json_report_in_a_fresh_process(demo_model, tmp_path):
    """The real command in its own process: every probe answers, an unreachable cluster included."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HF_HUB_CACHE"] = str(tmp_path / "no-hf-cache")
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "pipeline", "doctor", "--json", "--address", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout)
    assert r["platform"]["platform"] == "cpu" and r["platform"]["vllm_version"]
    assert "vllm" in r["platform"]["vllm_build"]
    assert r["torch"]["torch_version"] and r["torch"]["cuda_available"] is False
    assert r["gpus"]["gpus"] == [] and "torch.cuda.is_available() is False" in r["gpus"]["reason"]
    assert r["ray"] == {"error": f"ConnectionError: cannot reach 127.0.0.1:{port} (Connection refused)"}
    demo = next(b for b in r["models"]["builtin"] if b["name"] == "demo")
    assert demo["built"] is True and demo["size_mib"] > 0
    assert r["models"]["hub"] == [] and "no-hf-cache" in r["models"]["hub_error"]
    assert r["packages"]["ray"]


def test_table(demo_model, no_ray_address):
    code, stdout = doctor()
    assert code == 0
    for row in ("platform", "vLLM", "torch", "GPUs", "Ray cluster", "packages", "models in the caches", "demo"):
        assert row in stdout
    assert "nvidia-smi not found" in stdout or "nvidia-smi failed" in stdout  # no GPU here, and why


def test_failing_probe_keeps_the_report(monkeypatch, no_ray_address):
    from pipeline import doctor as probes

    def broken() -> dict:
        raise ImportError("no module named torch")

    monkeypatch.setattr(probes, "probe_torch", broken)
    code, stdout = doctor("--json")
    assert code == 0
    r = json.loads(stdout)
    assert r["torch"] == {"error": "ImportError: no module named torch"}
    assert r["platform"]["platform"] == "cpu"


def test_reports_a_running_cluster(ray_cluster):
    code, stdout = doctor("--json")
    assert code == 0
    r = json.loads(stdout)["ray"]
    assert r["nodes_alive"] >= 1 and r["total"]["CPU"] >= 1
