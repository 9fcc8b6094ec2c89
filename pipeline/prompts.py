"""Synthetic prompt sets for demos, tests and benchmarks (no data can be downloaded here)."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_OPENINGS = [
    "My name is Arthur and I live in", "Hello, I'm a language model,", "The history of the city begins",
    "In a shocking finding, scientists discovered", "Here is a recipe for", "The best way to learn",
    "Once upon a time, in a small village,", "The main problem with modern software is",
    "Yesterday the committee decided that", "When the sun went down over the harbour,",
]
_WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be has "
    "had not but they their one new after first two who also been have its all other more city time "
    "year people world river music team school state church game system family water later during"
).split()


def make_prompts(rows: int, seed: int = 0, mean_words: float = 24.0) -> list[str]:
    """Prompts with a long-tailed length spread (log-normal, 3 to ~600 words)."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        length = min(600, max(0, int(rng.lognormvariate(0, 0.9) * mean_words) - 6))
        tail = " ".join(rng.choice(_WORDS) for _ in range(length))
        out.append(f"{rng.choice(_OPENINGS)} {tail}".strip())
    return out


def write_prompt_set(path: Path | str, rows: int, seed: int = 0, row_group_size: int = 4096,
                     mean_words: float = 24.0) -> None:
    """``rows`` prompts (``make_prompts``; ``mean_words`` 0: the sentence openings alone) with ids 0..rows-1."""
    prompts = make_prompts(rows, seed, mean_words)
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "prompt": prompts})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path), row_group_size=row_group_size)
