"""Fault soak for the batch job: a real multi-node local Ray cluster, faults injected mid-job.

    python benchmarks/faults.py --rows 96 --faults kill-actor,remove-node
    python benchmarks/faults.py --rows 1000000 --batch-size 1024 --max-num-seqs 256 --max-tokens 1 \
        --prompt-words 0 --faults kill-actor,remove-node --at 0.2,0.5 --timeout 7200   # at scale

Starts a head and two worker nodes (ray.cluster_utils.Cluster), runs a bulk job with two engine
replicas, and while it runs: SIGKILLs an engine actor process (and its vLLM engine), then removes
a worker node that hosts an engine actor. Prints rows in, rows out, duplicates and losses as
JSON (exit 1 if any row is lost or duplicated).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ENGINE_TITLE = "EngineActor"


def engine_processes(root: psutil.Process) -> list[psutil.Process]:
    """Engine actor processes under ``root`` (a raylet)."""
    out = []
    for p in root.children(recursive=True):
        try:
            if ENGINE_TITLE in " ".join(p.cmdline()) and p.name() != "python":
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [p for p in out if (p.cmdline() or [""])[0].startswith("ray::")]


def engines_on(node) -> list[psutil.Process]:
    """The engine actor processes a node of a ``ray.cluster_utils.Cluster`` hosts (under its raylet)."""
    return engine_processes(psutil.Process(node.all_processes["raylet"][0].process.pid))


def kill_tree(proc: psutil.Process) -> None:
    for p in [*proc.children(recursive=True), proc]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def reap_orphans(since: float) -> int:
    """vLLM engine processes of a removed node outlive its raylet here (on a real cluster the
    machine is gone): kill the ones this run orphaned."""
    killed = 0
    for p in psutil.process_iter(["name", "ppid", "create_time"]):
        if p.info["ppid"] == 1 and (p.info["name"] or "").startswith("VLLM") and p.info["create_time"] >= since:
            p.kill()
            killed += 1
    return killed


def committed(out: Path) -> int:
    """Blocks committed so far (staged shards, and those compacted into output files)."""
    from pyarrow.fs import LocalFileSystem

    from pipeline.compact import committed_blocks

    return committed_blocks(LocalFileSystem(), str(out)) if out.exists() else 0


def wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.5)
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-num-seqs", type=int, default=0, help="Engine max_num_seqs (default: the batch size).")
    ap.add_argument("--prompt-words", type=float, default=24.0, help="Mean words after each prompt's opening (0: short prompts).")
    ap.add_argument("--faults", default="kill-actor,remove-node")
    ap.add_argument("--at", default="", help="Comma list, one per fault: the share of the job's blocks committed "
                    "before it is injected (default: each fault after the next commit).")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.batch import run_job
    from pipeline.config import JobConfig
    from pipeline.prompts import write_prompt_set
    from pipeline.runtime import worker_env

    os.environ.update({k: v for k, v in worker_env().items() if k not in os.environ})
    work = Path(tempfile.mkdtemp(prefix="g2p-faults-"))
    write_prompt_set(work / "in.parquet", args.rows, seed=1, row_group_size=max(32, min(65_536, args.rows // 64)),
                     mean_words=args.prompt_words)
    out = work / "out"
    # A removed node is noticed after 5 failed health checks 1 s apart (Ray's default: 3 s apart).
    health = {"health_check_period_ms": 1000, "health_check_timeout_ms": 5000, "health_check_failure_threshold": 5}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "_system_config": health})
    workers = [cluster.add_node(num_cpus=3) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    job = JobConfig(input=str(work / "in.parquet"), output=str(out), batch_size=args.batch_size,
                    address=cluster.address,
                    # one block inside each engine at a time: shards commit one by one, so every
                    # fault lands while rows are still in flight
                    engine={"replicas": 2, "max_num_seqs": args.max_num_seqs or args.batch_size},
                    sampling={"max_tokens": args.max_tokens, "ignore_eos": True, "seed": 0})
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = run_job(job).to_dict()
        except Exception as exc:  # reported, not raised: the report is the point
            result["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    started_wall = time.time() - 1
    thread.start()
    injected = []
    faults = [f for f in args.faults.split(",") if f]
    shares = [float(x) for x in args.at.split(",") if x]
    if shares and len(shares) != len(faults):
        raise SystemExit("--at needs one share per fault")
    blocks = -(-args.rows // args.batch_size)
    for i, fault in enumerate(faults):
        target = int(shares[i] * blocks) if shares else committed(out) + 1
        if not wait_for(lambda: committed(out) >= target or not thread.is_alive(), args.timeout):
            break
        if not thread.is_alive():
            break
        if fault == "kill-actor":  # an engine of this run's cluster (not of another run on the machine)
            victims = [v for n in [cluster.head_node, *workers] for v in engines_on(n)]
            if victims:
                kill_tree(victims[0])
                injected.append({"fault": fault, "pid": victims[0].pid, "after_shards": committed(out)})
        elif fault == "remove-node":  # a worker node that hosts an engine (a restarted one may be elsewhere a while)
            def hosting() -> list:
                return [n for n in workers if engines_on(n)]

            if wait_for(lambda: bool(hosting()) or not thread.is_alive(), args.timeout) and thread.is_alive():
                node = hosting()[0]
                cluster.remove_node(node, allow_graceful=False)
                workers.remove(node)
                injected.append({"fault": fault, "node": node.node_id, "after_shards": committed(out)})
        else:
            raise SystemExit(f"unknown fault {fault!r}")
    thread.join(args.timeout)
    table = pq.read_table(out) if committed(out) else None
    rows_out = table.num_rows if table is not None else 0
    distinct = len(table["id"].unique()) if table is not None else 0
    report = {
        "rows_in": args.rows, "rows_out": rows_out, "duplicates": rows_out - distinct,
        "lost": args.rows - distinct, "blocks": blocks, "faults_injected": injected, "wall_s": round(time.monotonic() - started, 1),
        "job_status": result.get("summary", {}).get("status"), "job_error": result.get("error"),
    }
    print(json.dumps(report, indent=2))
    ray.shutdown()
    cluster.shutdown()
    reap_orphans(started_wall)
    ok = report["duplicates"] == 0 and report["lost"] == 0 and len(injected) == len(faults)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
