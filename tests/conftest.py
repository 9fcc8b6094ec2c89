"""Shared fixtures: one tiny model, one in-process engine, one local Ray cluster per session.

Everything is real: vLLM runs the `demo` checkpoint (GPT-2 architecture, random weights, the
real GPT-2 tokenizer), Ray is a real local cluster.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from pipeline.models import resolve_model

    return resolve_model("demo")


class LoopThread:
    """A background event loop so sync tests can drive the async engine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="session")
def loop() -> LoopThread:
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture(scope="session")
def engine(demo_model: Path, loop: LoopThread):
    """An in-process generation engine on the demo model (float32: token-exact with HF)."""
    from pipeline.config import EngineConfig
    from pipeline.engine import Engine

    async def make() -> Engine:
        return Engine(EngineConfig(model="demo"))

    eng = loop.run(make())
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded local Ray for the session (8 logical CPUs on 2 cores: stages must not starve)."""
    import ray

    from pipeline.runtime import init_ray

    init_ray(num_cpus=8)
    yield ray
    ray.shutdown()


def write_prompts(path: Path, prompts: list[Any], row_group_size: int | None = None, **columns: list[Any]) -> Path:
    """A Parquet prompt file; extra keyword arguments become extra columns."""
    table = pa.table({"prompt": pa.array(prompts, pa.string()), **columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
