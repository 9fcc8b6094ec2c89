"""Shared fixtures: one tiny model, one in-process engine, one local Ray cluster per session.

Everything is real: vLLM runs the `demo` checkpoint (GPT-2 architecture, random weights, the
real GPT-2 tokenizer), Ray is a real local cluster.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per engine, as in a Ray actor with one CPU: batch-invariant, so repeated runs give
# bit-identical logprobs (with every core, in-process engines agree to float rounding only).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from pipeline.models import resolve_model

    return resolve_model("demo")


class LoopThread:
    """Sync tests drive the async engine on the process's background loop (the inline executor's)."""

    def __init__(self) -> None:
        from pipeline.inline import background_loop

        self.loop = background_loop()

    def run(self, coro: Any, timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture(scope="session")
def loop() -> LoopThread:
    return LoopThread()


@pytest.fixture(scope="session")
def engine(demo_model: Path, loop: LoopThread):
    """The in-process generation engine on the demo model (float32: token-exact with HF).

    The same warm engine that inline jobs on default engine settings use: one start per session.
    """
    from pipeline.config import EngineConfig
    from pipeline.engine import Engine
    from pipeline.inline import warm_engine

    async def make() -> Engine:
        return warm_engine(EngineConfig(model="demo"), "generate")

    return loop.run(make())


@pytest.fixture(scope="session", autouse=True)
def _warm_engines_shut_down():
    """Warm in-process engines end with the session, while its output streams are still open."""
    yield
    from pipeline.inline import shutdown_warm

    shutdown_warm()


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded local Ray for the session (8 logical CPUs on 2 cores: stages must not starve)."""
    import ray

    from pipeline.runtime import init_ray

    init_ray(num_cpus=8)
    yield ray
    ray.shutdown()


def process_titles(processes: Any) -> list[str]:
    """Command line and name of each process still there (Ray's idle workers come and go)."""
    import psutil

    titles = []
    for p in processes:
        try:
            titles.append(" ".join(p.cmdline()) + " " + p.name())
        except psutil.Error:
            continue
    return titles


def kill_tree(proc: subprocess.Popen, grace: float = 0) -> None:
    """End ``proc`` and every process it started: its descendants and the rest of its process
    group (Ray's workers are the raylet's children, in their own groups). With ``grace``, SIGTERM
    first and that many seconds to stop; then SIGKILL for whatever is alive. Only these pids."""
    import psutil

    def group(p: psutil.Process) -> int:
        try:
            return os.getpgid(p.pid)
        except OSError:
            return -1

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    procs += [p for p in psutil.process_iter() if group(p) == proc.pid and p not in procs]
    if grace and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _, alive = psutil.wait_procs(procs, timeout=2 if grace else 0)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=60)
    proc.wait(60)


def write_prompts(path: Path, prompts: list[Any], row_group_size: int | None = None, **columns: list[Any]) -> Path:
    """A Parquet prompt file; extra keyword arguments become extra columns."""
    table = pa.table({"prompt": pa.array(prompts, pa.string()), **columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
