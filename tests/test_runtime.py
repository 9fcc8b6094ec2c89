"""Ray start-up rules (``pipeline.runtime``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_ray_ignores_a_cluster_left_behind_by_ray_start():
    """Without an address, jobs and `serve` start their own Ray, even when `ray start` left its
    marker file here (Ray's default would join that cluster, and fail if it is gone)."""
    marker = Path("/tmp/ray/ray_current_cluster")
    saved = marker.read_text() if marker.exists() else None
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("127.0.0.1:1")  # a head that no longer runs
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    code = ("import ray; from pipeline.runtime import init_ray; init_ray(num_cpus=3); "
            "print('CPUS', int(ray.cluster_resources()['CPU'])); ray.shutdown()")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    finally:
        if saved is None:
            marker.unlink(missing_ok=True)
        else:
            marker.write_text(saved)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CPUS 3" in proc.stdout


def test_embedded_cpu_replicas_share_this_machines_cores(ray_cluster):
    """On an embedded Ray without GPUs a replica gets the machine's cores (shared among the
    replicas, two of Ray's logical CPUs left for other tasks); elsewhere 1 CPU, or what is set."""
    from pipeline.config import EngineConfig
    from pipeline.runtime import local_cores, replica_resources

    cores, logical = local_cores(), int(ray_cluster.cluster_resources()["CPU"])
    cpus = lambda embedded=True, **kw: replica_resources(EngineConfig(model="demo", **kw), embedded)["num_cpus"]  # noqa: E731
    assert cpus() == max(1, min(cores, logical - 2))
    assert cpus(replicas=2) == max(1, min(cores, logical - 2) // 2)
    assert cpus(replicas=64) == 1
    assert cpus(embedded=False) == 1
    assert cpus(cpus_per_replica=3) == 3
    assert cpus(gpus_per_replica=1) == 1
