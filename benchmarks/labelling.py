"""A structured-output labelling job against raw vLLM given the same constraint.

Ours: ``gpt2-pipeline run --choice L1 --choice L2 ...`` (Parquet in, Parquet out). The peer: vLLM's
``LLM.generate`` in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with our engine arguments
and the same ``StructuredOutputsParams(choice=...)``, greedy. Each run is its own process, timed
from start to exit; rounds alternate the two. Every answer of both is checked to be a label.

    python benchmarks/labelling.py --model gpt2-small-random --rows 3000 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import read_prompts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["positive", "negative", "neutral"]
MAX_TOKENS = 4


def worker_raw(model: str, prompts: str, result: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from offline import engine_kwargs
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    texts = read_prompts(prompts)
    llm = LLM(**engine_kwargs(model))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputsParams(choice=LABELS))
    outs = llm.generate(texts, params, use_tqdm=False)
    answers = [o.outputs[0].text for o in outs]
    Path(result).write_text(json.dumps({"rows": len(answers), "labels": sum(a in LABELS for a in answers)}))
    llm.llm_engine.engine_core.shutdown()
    os._exit(0)


def run_ours(model: str, prompts: Path, out: Path) -> dict:
    import pyarrow.parquet as pq

    choices = [arg for label in LABELS for arg in ("--choice", label)]
    subprocess.run([sys.executable, "-m", "pipeline", "run", "-i", str(prompts), "-o", str(out), "--model", model,
                    "--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--overwrite", *choices],
                   cwd=ROOT, check=True, capture_output=True)
    answers = pq.read_table(out, columns=["generated_text"])["generated_text"].to_pylist()
    return {"rows": len(answers), "labels": sum(a in LABELS for a in answers)}


def run_raw(model: str, prompts: Path, work: Path) -> dict:
    result = work / "raw.json"
    subprocess.run([sys.executable, __file__, "--worker", "--model", model, "--prompts", str(prompts),
                    "--result", str(result)], cwd=ROOT, check=True, capture_output=True)
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-small-random")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker_raw(a.model, a.prompts, a.result)
        return
    from pipeline.prompts import write_prompt_set

    work = Path(tempfile.mkdtemp(prefix="gpt2-labelling-"))
    prompts = work / "prompts.parquet"
    write_prompt_set(prompts, a.rows, 0)
    rounds = []
    for r in range(1, a.repeat + 1):
        order = ("ours", "raw") if r % 2 else ("raw", "ours")
        row = {"round": r, "load": os.getloadavg()[0]}
        for system in order:
            t0 = time.monotonic()
            got = run_ours(a.model, prompts, work / "out") if system == "ours" else run_raw(a.model, prompts, work)
            row[system] = {"wall_s": round(time.monotonic() - t0, 1), **got}
        row["ours_vs_raw"] = round(row["raw"]["wall_s"] / row["ours"]["wall_s"], 2)  # throughput ratio
        rounds.append(row)
        print(json.dumps(row), flush=True)
    out = ROOT / "benchmarks" / "results" / f"labelling-{a.model}-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps({"model": a.model, "rows": a.rows, "labels": LABELS, "rounds": rounds}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
