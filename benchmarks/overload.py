"""Overload soak for the online endpoint: far more concurrent requests than the fleet holds.

    python benchmarks/overload.py --requests 600 --concurrency 300

Deploys the endpoint (embedded Ray, small per-replica bounds), fires the requests, and reports
requests sent / served / rejected (429, 503) / 5xx / transport errors, rejection and success
latency, and the replica's memory before and after. The server must stay up and answer /health.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx
import psutil

RESULTS = Path(__file__).parent / "results"


def replica_rss_mib() -> float:
    total = 0
    for p in psutil.process_iter(["cmdline"]):
        cmd = (p.info["cmdline"] or [""])[0]
        if cmd.startswith("ray::ServeReplica:overload"):
            for q in [p, *p.children(recursive=True)]:
                try:
                    total += q.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
    return round(total / 2**20, 1)


async def fire(url: str, total: int, concurrency: int, max_tokens: int) -> list[tuple[int, float]]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(i: int) -> tuple[int, float]:
            async with sem:
                start = time.monotonic()
                try:
                    r = await client.post("/v1/completions", json={
                        "prompt": f"Overload request {i}", "max_tokens": max_tokens, "ignore_eos": True})
                    return r.status_code, time.monotonic() - start
                except httpx.HTTPError:
                    return -1, time.monotonic() - start

        return await asyncio.gather(*(one(i) for i in range(total)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--concurrency", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-in-flight", type=int, default=32)
    ap.add_argument("--max-queued", type=int, default=32)
    ap.add_argument("--port", type=int, default=8312)
    args = ap.parse_args()

    from ray import serve

    from pipeline.config import ServeConfig
    from pipeline.serving.server import start

    cfg = ServeConfig(name="overload", port=args.port, embeddings=False, max_queued_requests=args.max_queued,
                      engine={"model": args.model, "max_in_flight": args.max_in_flight})
    url, _ = start(cfg)
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(2)
    rss_before = replica_rss_mib()
    started = time.monotonic()
    results = asyncio.run(fire(url, args.requests, args.concurrency, args.max_tokens))
    wall = time.monotonic() - started
    statuses = [s for s, _ in results]
    ok = [t for s, t in results if s == 200]
    rejected = [t for s, t in results if s in (429, 503)]
    report = {
        "requests_sent": len(results), "served_200": len(ok), "rejected_429": statuses.count(429),
        "rejected_503": statuses.count(503), "errors_5xx": sum(1 for s in statuses if s >= 500 and s != 503),
        "transport_errors": statuses.count(-1), "other": sorted({s for s in statuses if s not in (200, 429, 503, -1)}),
        "rejection_latency_p50_s": round(statistics.median(rejected), 3) if rejected else None,
        "served_latency_p50_s": round(statistics.median(ok), 3) if ok else None,
        "wall_s": round(wall, 1), "replica_rss_mib_before": rss_before, "replica_rss_mib_after": replica_rss_mib(),
        "healthy_after": httpx.get(f"{url}/health", timeout=10).status_code == 200,
        "bounds": {"max_in_flight": args.max_in_flight, "max_queued": args.max_queued, "concurrency": args.concurrency},
    }
    print(json.dumps(report, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overload.json").write_text(json.dumps(report, indent=2))
    serve.delete("overload")


if __name__ == "__main__":
    main()
