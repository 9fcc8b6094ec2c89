"""Online time-to-first-token while a batch job saturates the same Serve replicas.

    python benchmarks/priority.py --rows 400 --probes 20

For each setting (batch admission limit per replica), deploys the endpoint on an embedded Ray,
measures online TTFT with sequential streaming probes (idle), then starts a `run --via-serve`
batch job through the same replicas and measures TTFT again while it runs. Prints p50/p95 and
writes benchmarks/results/priority.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"


def ttft(url: str, max_tokens: int = 16) -> float:
    body = {"prompt": "An online request from a person who is waiting", "max_tokens": max_tokens, "stream": True}
    start = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"text": "' in line:
                first = time.monotonic() - start
                for _ in lines:  # read the rest of the stream
                    pass
                return first
    raise RuntimeError("no token arrived")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def probe(url: str, n: int, stop: threading.Event | None = None) -> list[float]:
    out = []
    for _ in range(n):
        if stop is not None and stop.is_set():
            break
        out.append(ttft(url))
        time.sleep(0.2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--probes", type=int, default=20)
    ap.add_argument("--limits", default="64,8", help="batch rows in flight per replica to compare")
    ap.add_argument("--port", type=int, default=8311)
    args = ap.parse_args()

    from ray import serve

    from pipeline.batch import run_job
    from pipeline.config import JobConfig, ServeConfig
    from pipeline.prompts import write_prompt_set
    from pipeline.serving.server import start

    work = Path(tempfile.mkdtemp(prefix="g2p-priority-"))
    write_prompt_set(work / "in.parquet", args.rows, seed=2)
    rows = []
    for limit in [int(x) for x in args.limits.split(",")]:
        cfg = ServeConfig(name="prio", port=args.port, embeddings=False, max_batch_in_flight=limit,
                          engine={"model": args.model})
        url, _ = start(cfg)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        ttft(url)  # warm-up
        idle = probe(url, args.probes)
        job = JobConfig(input=str(work / "in.parquet"), output=str(work / f"out-{limit}"), overwrite=True,
                        via_serve="prio", batch_size=32,
                        sampling={"max_tokens": args.max_tokens, "ignore_eos": True})
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(s=run_job(job)), daemon=True)
        started = time.monotonic()
        thread.start()
        time.sleep(5)  # let the batch fill the replica
        busy = probe(url, args.probes)
        thread.join()
        wall = time.monotonic() - started
        summary = result["s"]
        rows.append({
            "batch_in_flight_limit": limit,
            "idle_ttft_p50_s": round(statistics.median(idle), 4), "idle_ttft_p95_s": round(pct(idle, 0.95), 4),
            "busy_ttft_p50_s": round(statistics.median(busy), 4), "busy_ttft_p95_s": round(pct(busy, 0.95), 4),
            "batch_tokens_per_s": round(summary.completion_tokens / wall, 1), "batch_status": summary.status,
            "batch_rows_out": summary.rows_out,
        })
        print(json.dumps(rows[-1]), flush=True)
        serve.delete("prio")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "priority.json").write_text(json.dumps({"model": args.model, "rows": args.rows, "results": rows}, indent=2))
    print(f"{'limit':>6} {'idle p50':>9} {'idle p95':>9} {'busy p50':>9} {'busy p95':>9} {'batch tok/s':>12}")
    for r in rows:
        print(f"{r['batch_in_flight_limit']:>6} {r['idle_ttft_p50_s']:>9.3f} {r['idle_ttft_p95_s']:>9.3f} "
              f"{r['busy_ttft_p50_s']:>9.3f} {r['busy_ttft_p95_s']:>9.3f} {r['batch_tokens_per_s']:>12.1f}")


if __name__ == "__main__":
    main()
