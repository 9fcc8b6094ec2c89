"""Scoring throughput (scored tokens/s): our `score` job against raw vLLM prompt logprobs and HF.

    python benchmarks/score.py --model demo --rows 512
    python benchmarks/score.py --model gpt2-small-random --rows 2000 --hf-rows 256

Same model, same texts (one Parquet set; texts of 2..context-1 tokens, so no system needs a
sliding window), same engine arguments (``pipeline.engine.engine_args``). Systems, one after
the other, each in its own subprocess sampled by the driver (RSS/PSS, CPU):

- ours: ``gpt2-pipeline score`` end to end (Ray Data, engine actor, Parquet shards, verify pass);
- raw vLLM: ``LLM.generate`` with ``prompt_logprobs=0, max_tokens=1`` on the same texts;
- HF transformers: batched float32 forward (right-padded, attention mask), log-softmax per token.

Every system scores the same tokens (all but each text's first). Results: a table on stdout and
``benchmarks/results/score-<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

SYSTEMS = ("ours", "raw_vllm", "hf_transformers")
SHORT = {"ours": "ours (score job)", "raw_vllm": "raw vLLM prompt_logprobs", "hf_transformers": "HF forward"}


def worker_raw(a: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    from vllm import LLM, SamplingParams

    from offline import engine_kwargs, read_prompts

    kwargs = engine_kwargs(a.model)
    texts = read_prompts(a.prompts)
    llm = LLM(**kwargs)
    t_ready = time.monotonic()
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate(texts, params, use_tqdm=False)
    nll, scored = 0.0, 0
    for o in outs:
        ids = o.prompt_token_ids
        lps = [e[t].logprob for t, e in zip(ids[1:], o.prompt_logprobs[1:])]
        nll -= sum(lps)
        scored += len(lps)
    t_done = time.monotonic()
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    return {"rows_out": len(outs), "scored_tokens": scored, "mean_nll": nll / scored, "startup_s": t_ready - t_start,
            "scoring_s": t_done - t_ready, "engine_kwargs": {k: str(v) for k, v in kwargs.items()}}


def worker_hf(a: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline import read_prompts
    from pipeline.models import resolve_model

    path = str(resolve_model(a.model))
    texts = read_prompts(a.prompts, a.hf_rows)
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token  # right padding (the default side): masked out below
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t_ready = time.monotonic()
    nll, scored = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(texts), a.hf_batch_size):
            enc = tok(texts[i:i + a.hf_batch_size], return_tensors="pt", padding=True)
            logits = model(**enc).logits[:, :-1].float()
            target = enc["input_ids"][:, 1:]
            mask = enc["attention_mask"][:, 1:].bool()
            lp = torch.log_softmax(logits, -1).gather(2, target[..., None])[..., 0]
            nll -= float(lp[mask].double().sum())
            scored += int(mask.sum())
    t_done = time.monotonic()
    return {"rows_out": len(texts), "scored_tokens": scored, "mean_nll": nll / scored, "startup_s": t_ready - t_start,
            "scoring_s": t_done - t_ready, "batch_size": a.hf_batch_size, "torch_threads": torch.get_num_threads()}


WORKERS = {"raw_vllm": worker_raw, "hf_transformers": worker_hf}


def worker_main(a: argparse.Namespace) -> None:
    from offline_workers import worker_main as run_worker  # records errors too; leaves without teardown

    run_worker(a, WORKERS)


# ---- driver ------------------------------------------------------------------------------------
def write_texts(a: argparse.Namespace, path: Path) -> dict[str, Any]:
    """The prompt set, keeping texts of 2..context-1 tokens (every system scores them whole)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipeline.models import CONTEXT_LENGTH, resolve_model
    from pipeline.prompts import write_prompt_set

    raw = path.with_suffix(".all.parquet")
    write_prompt_set(raw, a.rows, seed=a.seed)
    texts = pq.read_table(raw, columns=["prompt"]).column("prompt").to_pylist()
    tok = AutoTokenizer.from_pretrained(str(resolve_model(a.model)))
    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    keep = [(t, n) for t, n in zip(texts, lengths) if 2 <= n <= CONTEXT_LENGTH - 1]
    pq.write_table(pa.table({"id": list(range(len(keep))), "prompt": [t for t, _ in keep]}), path)
    hf_n = min(a.hf_rows or len(keep), len(keep))
    return {"texts": len(keep), "dropped": len(texts) - len(keep), "text_tokens": sum(n for _, n in keep),
            "scored_tokens": sum(n - 1 for _, n in keep), "hf_scored_tokens": sum(n - 1 for _, n in keep[:hf_n])}


def run_ours(a: argparse.Namespace, texts: Path, work: Path) -> dict[str, Any]:
    from _common import run_monitored
    from offline import _cli, parquet_file_tokens, steady_from_files

    out = work / "out-ours"
    cmd = _cli() + ["score", "--input", str(texts), "--output", str(out), "--model", a.model, "--overwrite",
                    "--batch-size", str(a.batch_size), "--num-cpus", str(a.num_cpus)]
    run = run_monitored(cmd, work / "log-ours.txt", a.timeout, interval=a.sample_interval)
    res: dict[str, Any] = {"system": "ours", "command": " ".join(cmd), "wall_s": run.wall_s, "memory": run.tree}
    path = out / "_summary.json"
    summary = json.loads(path.read_text()) if path.exists() else None
    if run.timed_out or not summary or summary.get("status") != "succeeded":
        res.update(status="error", error=(summary or {}).get("message", "no _summary.json") + f"\n{run.log_tail}")
        return res
    st = steady_from_files(parquet_file_tokens(out, "scored_tokens"))
    res.update(status="ok", rows_out=summary["rows_out"], error_rows=summary["error_rows"],
               scored_tokens=summary["scored_tokens"], corpus_perplexity=summary["perplexity"],
               mean_nll=None if not summary["perplexity"] else __import__("math").log(summary["perplexity"]),
               job_wall_s=summary["wall_time_s"], steady_tokens_per_s=st["steady_tokens_per_s"])
    shutil.rmtree(out, ignore_errors=True)
    return res


def run_worker(a: argparse.Namespace, system: str, texts: Path, work: Path) -> dict[str, Any]:
    from _common import run_monitored

    result = work / f"result-{system}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--result", str(result),
           "--prompts", str(texts), "--model", a.model, "--hf-batch-size", str(a.hf_batch_size)]
    if a.hf_rows:
        cmd += ["--hf-rows", str(a.hf_rows)]
    run = run_monitored(cmd, work / f"log-{system}.txt", a.timeout, interval=a.sample_interval)
    res: dict[str, Any] = {"system": system, "wall_s": run.wall_s, "memory": run.tree}
    if result.exists():
        res.update(json.loads(result.read_text()))
    else:
        res.update(status="error", error=f"no result (exit {run.returncode})\n{run.log_tail}")
    if res.get("status") == "ok":
        res["steady_tokens_per_s"] = res["scored_tokens"] / res["scoring_s"]
    return res


def main_compare(a: argparse.Namespace, work: Path) -> None:
    from _common import RESULTS, fmt, machine, print_table, versions, wait_idle, warn_foreign_ray, write_json
    from offline import engine_kwargs

    texts = work / "texts.parquet"
    data = write_texts(a, texts)
    meta = {"benchmark": "score", "model": a.model, "rows": a.rows, **data, "hf_rows": a.hf_rows,
            "batch_size": a.batch_size, "hf_batch_size": a.hf_batch_size, "ray_num_cpus": a.num_cpus,
            "engine_kwargs": {k: str(v) for k, v in engine_kwargs(a.model).items()}, "machine": machine(),
            "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "foreign_ray_warning": warn_foreign_ray()}
    print(f"{data['texts']} texts, {data['scored_tokens']:,} scored tokens ({data['dropped']} dropped: <2 or over the context)")
    results = []
    for system in [s.strip() for s in a.systems.split(",") if s.strip()]:
        idle = wait_idle(a.wait_idle)
        print(f"[{time.strftime('%H:%M:%S')}] running {system} (machine CPU {idle['cpu_percent_at_start']}%) ...", flush=True)
        r = run_ours(a, texts, work) if system == "ours" else run_worker(a, system, texts, work)
        r["idle_wait"], r["loadavg_after"] = idle, [round(x, 2) for x in os.getloadavg()]
        if r.get("status") == "ok":
            r["tokens_per_s_e2e"] = r["scored_tokens"] / r["wall_s"]
        results.append(r)
        print(f"[{time.strftime('%H:%M:%S')}]   {system}: {r.get('status')} in {r['wall_s']:.1f}s", flush=True)
    raw = next((r for r in results if r["system"] == "raw_vllm" and r.get("status") == "ok"), None)
    for r in results:
        if raw and r.get("status") == "ok" and r.get("steady_tokens_per_s") and raw.get("steady_tokens_per_s"):
            r["vs_raw_steady"] = r["steady_tokens_per_s"] / raw["steady_tokens_per_s"]
    name = a.name or f"score-{a.model.replace('/', '_')}"
    write_json(RESULTS / f"{name}.json", {"meta": meta, "results": results})
    rows = [[SHORT.get(r["system"], r["system"]), r.get("status"), fmt(r.get("rows_out")), fmt(r.get("scored_tokens")),
             fmt(r.get("wall_s")), fmt(r.get("startup_s")), fmt(r.get("tokens_per_s_e2e"), 0),
             fmt(r.get("steady_tokens_per_s"), 0), fmt(r.get("vs_raw_steady"), 2),
             None if r.get("mean_nll") is None else f"{r['mean_nll']:.6f}",
             fmt(r.get("memory", {}).get("peak_tree_pss_mib"), 0)] for r in results]
    print_table(f"scoring, {a.model}: {data['texts']} texts", ["system", "status", "rows", "scored tokens", "wall s",
                "start-up s", "tok/s e2e", "tok/s steady", "x raw steady", "mean nll", "tree PSS MiB"], rows)
    for r in results:
        if r.get("status") != "ok":
            print(f"  {r['system']}: {(r.get('error') or '').strip()[:300]}")
    print(f"wrote {RESULTS / (name + '.json')}")


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="Built-in name, local HF folder or hub id in the HF cache.")
    p.add_argument("--rows", type=int, default=512, help="Texts (one Parquet set, shared by every system).")
    p.add_argument("--batch-size", type=int, default=64, help="Rows per engine call (ours).")
    p.add_argument("--num-cpus", type=int, default=max(8, os.cpu_count() or 1), help="Logical CPUs for ours' local Ray.")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"Comma list, run in this order: {','.join(SYSTEMS)}.")
    p.add_argument("--hf-rows", type=int, default=None, help="HF transformers: only the first N texts.")
    p.add_argument("--hf-batch-size", type=int, default=16, help="HF transformers: texts per forward pass.")
    p.add_argument("--seed", type=int, default=0, help="Prompt-set seed.")
    p.add_argument("--timeout", type=float, default=1800, help="Seconds allowed per system run.")
    p.add_argument("--wait-idle", type=float, default=60, help="Before each run, wait up to N s for a quiet CPU.")
    p.add_argument("--sample-interval", type=float, default=0.5, help="Process-tree sampling period (s).")
    p.add_argument("--name", default=None, help="Results file stem (default score-<model>).")
    p.add_argument("--work-dir", default=None, help="Scratch folder (default: a temp folder, removed at the end).")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    a = parse()
    if a.worker:
        worker_main(a)
        return
    from pipeline.models import resolve_model

    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="gpt2-bench-score-"))
    work.mkdir(parents=True, exist_ok=True)
    resolve_model(a.model)  # build a built-in once, outside every timed run
    try:
        main_compare(a, work)
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
