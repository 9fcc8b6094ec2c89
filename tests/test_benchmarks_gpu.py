"""benchmarks/gpu.sh parses and refuses to start without a GPU; its tables match the README's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
RESULTS = ROOT / "benchmarks" / "results"


def _run(path_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": str(path_dir)}
    return subprocess.run([shutil.which("bash"), str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)


def _bin(tmp_path: Path) -> Path:
    """A PATH holding only what the script needs before its GPU check (and no nvidia-smi)."""
    d = tmp_path / "bin"
    d.mkdir()
    for tool in ("dirname", "grep", "head"):
        (d / tool).symlink_to(shutil.which(tool))
    return d


def test_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_no_driver_fails_fast_with_a_clear_message(tmp_path: Path):
    run = _run(_bin(tmp_path))
    assert run.returncode == 2
    assert run.stderr.startswith("error: no GPU visible: nvidia-smi is not on PATH")
    assert run.stdout == ""  # nothing started


def test_driver_without_gpus_fails_fast(tmp_path: Path):
    d = _bin(tmp_path)
    smi = d / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")  # what nvidia-smi says with no GPU
    smi.chmod(0o755)
    run = _run(d)
    assert run.returncode == 2
    assert "error: no GPU visible: nvidia-smi lists no GPU (No devices were found)" in run.stderr


def test_readme_tables_from_results():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"),
                          "--offline", str(RESULTS / "offline-demo.json"), "--online", str(RESULTS / "online-demo.json")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "| **gpt2-pipeline run** | 460 | 0.86x | 1,179 | 0.98x |" in run.stdout  # as in README.md
    assert "| 8 | **ours, direct ingress** | 7.96 | 509 | 1.90x | 125 ms / 1.44 s | 831 ms / 2.11 s |" in run.stdout
