"""The Batch API against a plain job, and online latency while a batch runs.

1. ``serve`` (one replica) on the model; online TTFT p50 at 8 streams, idle.
2. A batch of ``--requests`` lines through ``/v1/files`` + ``/v1/batches`` (timed from create to
   completed), with the same 8-stream TTFT measured while it runs.
3. ``run --input-format openai-batch`` on the same file (inline engine); its time is the job's
   processing time (engine ready -> last shard), so engine start-up is not counted on either side.

    python benchmarks/batch_api.py --model demo --requests 3000 --max-tokens 16 --repeat 2
    python benchmarks/batch_api.py --load-generator vllm --sides batch   # TTFT from vLLM's client

Each repeat runs both sides; the order alternates. Every round goes to
``benchmarks/results/batch-api-<date>[-<name>].json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import free_port


def request_file(path: Path, n: int, model: str, max_tokens: int) -> Path:
    with path.open("w") as fh:
        for i in range(n):
            body = {"model": model, "prompt": f"Request {i}: the history of the city is", "max_tokens": max_tokens,
                    "seed": i, "ignore_eos": True}
            fh.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    return path


async def ttft_round(url: str, model: str, streams: int) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(i: int) -> float:
            t0 = time.perf_counter()
            body = {"model": model, "prompt": f"Online prompt {i}", "max_tokens": 16, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return time.perf_counter() - t0
            return float("nan")

        return list(await asyncio.gather(*(one(i) for i in range(streams))))


def ttft_p50(url: str, model: str, rounds: int, streams: int = 8, until: object = None) -> float:
    samples: list[float] = []
    for _ in range(rounds):
        if until is not None and until():
            break
        samples += asyncio.run(ttft_round(url, model, streams))
    return statistics.median(samples) if samples else float("nan")


def vllm_ttft_p50(url: str, args: argparse.Namespace) -> float:
    """TTFT p50 (s) from vLLM's own load generator (``vllm bench serve``'s code) at 8 streams:
    ``8 x --rounds`` random prompts of 32 tokens, 16 output tokens each."""
    from online_vllm_bench import bench

    from pipeline.models import resolve_model

    gen = argparse.Namespace(input_len=32, max_tokens=16)
    result = bench(url, args.model, str(resolve_model(args.model)), 8, 8 * args.rounds, gen)
    return result["median_ttft_ms"] / 1000 if result.get("completed") else float("nan")


def online_ttft(url: str, args: argparse.Namespace, until: object = None) -> float:
    if args.load_generator == "vllm":
        return vllm_ttft_p50(url, args)
    return ttft_p50(url, args.model, args.rounds, until=until)


def run_batch(args: argparse.Namespace, src: Path, work: Path) -> dict:
    """``serve`` (one replica): idle TTFT, then the batch (create to completed) with TTFT during it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--model", args.model, "--no-embeddings",
                              "--port", str(port), "--batch-storage", str(work / "storage"), "--no-access-log",
                              *args.serve_arg],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
    report: dict = {}
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or serve.poll() is not None:
                raise SystemExit("serve did not start")
            time.sleep(1)
        ttft_p50(url, args.model, 2)  # warm-up
        report["ttft_p50_idle_s"] = round(online_ttft(url, args), 4)
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        up = oai.files.create(file=src.open("rb"), purpose="batch")
        t0 = time.monotonic()
        batch = oai.batches.create(input_file_id=up.id, endpoint="/v1/completions", completion_window="24h")
        running = lambda: oai.batches.retrieve(batch.id).status != "in_progress"  # noqa: E731
        while oai.batches.retrieve(batch.id).status == "validating":
            time.sleep(0.1)
        if args.online_during:
            report["ttft_p50_during_batch_s"] = round(online_ttft(url, args, until=running), 4)
            report["batch_status_after_ttft"] = oai.batches.retrieve(batch.id).status  # in_progress: measured during it
        while (b := oai.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.2)
        report["batch_s"] = round(time.monotonic() - t0, 2)
        report["batch_status"], report["batch_counts"] = b.status, b.request_counts.model_dump()
        report["batch_phases_s"] = {  # the Batch object's own timestamps (whole seconds)
            "validating": (b.in_progress_at or 0) - b.created_at,
            "in_progress": (b.finalizing_at or 0) - (b.in_progress_at or 0),
            "finalizing": (b.completed_at or 0) - (b.finalizing_at or 0)}
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
    return report


def run_plain_job(args: argparse.Namespace, src: Path, out: Path) -> dict:
    """``run --input-format openai-batch`` on the same file: engine ready -> last shard."""
    subprocess.run([sys.executable, "-m", "pipeline", "run", "--input", str(src), "--output", str(out), "--overwrite",
                    "--input-format", "openai-batch", "--model", args.model], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "_summary.json").read_text())
    phases = summary["phases"]
    return {"job_processing_s": round(phases["last_shard"] - (phases.get("engine_ready") or 0), 2),
            "job_status": summary["status"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10, help="TTFT rounds of 8 streams per figure.")
    ap.add_argument("--repeat", type=int, default=2, help="Batch/job pairs; the order alternates.")
    ap.add_argument("--name", default="")
    ap.add_argument("--serve-arg", action="append", default=[], help="Extra `serve` arguments (repeatable), e.g. --serve-arg=--max-batch-in-flight=256.")
    ap.add_argument("--load-generator", choices=["ours", "vllm"], default="ours",
                    help="Online TTFT from our SSE client or from vLLM's `vllm bench serve` code.")
    ap.add_argument("--sides", choices=["both", "batch", "job"], default="both")
    ap.add_argument("--no-online-during", dest="online_during", action="store_false",
                    help="Time the batch alone: no online requests while it runs (its TTFT figure is then not measured).")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batch-api-bench-"))
    src = request_file(work / "requests.jsonl", args.requests, args.model, args.max_tokens)
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    result = ROOT / "benchmarks" / "results" / f"batch-api-{stamp}{'-' + args.name if args.name else ''}.json"
    runs = []
    for r in range(args.repeat):
        report: dict = {"round": r, "model": args.model, "requests": args.requests, "max_tokens": args.max_tokens,
                        "serve_args": args.serve_arg, "load_generator": args.load_generator,
                        "order": "job first" if r % 2 else "batch first",
                        "load_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
        sides = [partial(run_batch, args, src, work / f"r{r}"), partial(run_plain_job, args, src, work / "job")]
        if args.sides != "both":
            sides = sides[:1] if args.sides == "batch" else sides[1:]
        for side in (sides[::-1] if r % 2 else sides):
            report.update(side())
        if "batch_s" in report and "job_processing_s" in report:
            report["batch_over_job"] = round(report["batch_s"] / report["job_processing_s"], 3)
        if "ttft_p50_during_batch_s" in report:
            report["ttft_during_over_idle"] = round(report["ttft_p50_during_batch_s"] / report["ttft_p50_idle_s"], 3)
        runs.append(report)
        print(json.dumps(report), flush=True)
        result.write_text(json.dumps({"date": stamp, "runs": runs}, indent=1))
    print(f"wrote {result}")


if __name__ == "__main__":
    main()
