"""Jobs at scale: wall time, peak RSS, output files and resume time by row count.

    python benchmarks/scale.py --rows 100000,400000 --systems ours,raw_vllm_1proc,resume --rounds 2
    python benchmarks/scale.py --rows 100000 --systems ours,ours_ray --ids str
    python benchmarks/scale.py --plan-files 1000 --plan-rows 10000000      # planning only, no engine
    python benchmarks/scale.py --plan-files 1000 --plan-rows 10000000 --plan-s3   # ... from a local S3

Each run also records the process tree's RSS every 10 s (``rss_series``).

Each row is a short prompt (one of ten sentence openings, 7-9 tokens) with 1 output token on the
`demo` model, so the figures show the framework's per-row cost, not the model's. Every run is a
subprocess under ``/usr/bin/time -v`` (peak RSS of the largest process, wall clock); ``uptime``'s
load is recorded with each figure (the machine may be shared). Systems, alternated per round:

- ``ours``: ``gpt2-pipeline run`` with the inline executor (one in-process engine);
- ``ours_ray``: the same job through the Ray Data executor (1 replica);
- ``ours_arenas``: ``ours`` with glibc's default malloc arenas (``MALLOC_ARENA_MAX`` 8 per core)
  instead of the one arena the in-process engine asks for: what the memory fix is worth;
- ``ours_onednn``: ``ours`` with oneDNN's default primitive cache (1,024) instead of the
  engine's cap (``ONEDNN_CACHE``): what that cap is worth (memory by rows, ``rss_series``);
- ``raw_vllm_1proc``: raw vLLM ``LLM.generate`` on the same prompts, in one process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; ``benchmarks/offline.py``'s worker): the throughput peer;
- ``resume``: ``--resume`` of the finished ``ours`` job.

Results: ``benchmarks/results/scale-<date>[-<name>].json`` (every round, not just the best).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import free_port

OPENINGS = ["My name is Arthur and I live in", "Hello, I'm a language model,", "The history of the city begins",
            "In a shocking finding, scientists discovered", "Here is a recipe for", "The best way to learn",
            "Once upon a time, in a small village,", "The main problem with modern software is",
            "Yesterday the committee decided that", "When the sun went down over the harbour,"]


def write_prompts(path: Path, rows: int, ids: str, files: int = 1) -> None:
    """``rows`` short prompts over ``files`` Parquet files; ids int64 or strings ``k0000000``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True) if files > 1 else path.parent.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for f in range(files):
        lo, hi = f * per, min(rows, (f + 1) * per)
        n = np.arange(lo, hi, dtype=np.int64)
        id_col = pa.array(n) if ids == "int" else pc.utf8_lpad(pc.cast(pa.array(n), pa.string()), 7, "0")
        if ids != "int":
            id_col = pc.binary_join_element_wise(pa.scalar("k"), id_col, "")
        table = pa.table({"id": id_col, "prompt": pa.array(OPENINGS).take(pa.array(n % len(OPENINGS)))})
        pq.write_table(table, path / f"part-{f:05d}.parquet" if files > 1 else path, row_group_size=65_536)


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 7200) -> dict[str, Any]:
    """Run under /usr/bin/time -v: wall seconds, peak RSS (MB) of the largest process, exit code,
    and the process tree's RSS every 10 s (``rss_series``: [seconds, MB])."""
    import psutil

    before = load()
    started = time.monotonic()
    series: list[list[float]] = []
    with open(log, "w") as fh:
        proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        while proc.poll() is None and time.monotonic() - started < timeout:
            try:
                tree = psutil.Process(proc.pid).children(recursive=True)
                series.append([round(time.monotonic() - started), round(sum(p.memory_info().rss for p in tree) / 2**20)])
            except psutil.Error:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    wall = time.monotonic() - started
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "exit": proc.returncode, "load_before": before, "load_after": load(), "command": " ".join(cmd),
            "rss_series": series}


def files_in(folder: Path) -> dict[str, Any]:
    top = sorted(folder.glob("part-*.parquet"))
    return {"output_files": len(top), "files_total": sum(1 for p in folder.rglob("*") if p.is_file()),
            "mean_file_mb": round(sum(p.stat().st_size for p in top) / max(1, len(top)) / 2**20, 2),
            "staging_left": (folder / "_staging").exists(), "input_left": (folder / "_input").exists()}


def run_ours(a: argparse.Namespace, prompts: Path, out: Path, log: Path, executor: str, resume: bool,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pipeline", "run", "--input", str(prompts), "--output", str(out), "--model", a.model,
           "--max-tokens", "1", "--temperature", "1.0", "--ignore-eos", "--executor", executor]
    cmd += ["--resume"] if resume else ["--overwrite"]
    res = timed(cmd, log, env)
    summary = json.loads((out / "_summary.json").read_text()) if (out / "_summary.json").exists() else {}
    res.update({k: summary.get(k) for k in ("status", "rows_out", "duplicates", "missing", "shards", "wall_time_s",
                                            "completion_tokens", "phases", "message")})
    return {**res, **files_in(out)}


def run_raw(a: argparse.Namespace, prompts: Path, work: Path, log: Path) -> dict[str, Any]:
    result = work / "raw.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "offline.py"), "--worker", "raw_vllm_1proc", "--result", str(result),
           "--prompts", str(prompts), "--output", str(work / "out-raw"), "--model", a.model, "--max-tokens", "1",
           "--temperature", "1.0"]
    res = timed(cmd, log)
    if result.exists():
        data = json.loads(result.read_text())
        res.update({k: data.get(k) for k in ("rows_out", "completion_tokens", "startup_s", "generation_s")})
    return res


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def local_s3(work: Path, src: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server (a process of its own) holding ``src``'s files in bucket ``bench``; returns
    the server and the input's ``s3://`` URI (pyarrow's S3 filesystem, path-style, plain HTTP)."""
    import socket

    import boto3

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    client.create_bucket(Bucket="bench")
    for f in sorted(src.iterdir()):
        client.upload_file(str(f), "bench", f"plan-input/{f.name}")
    return server, f"s3://bench/plan-input?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"


def plan_only(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Plan --plan-rows ids over --plan-files files (duplicate check included): time and peak RSS;
    with --plan-s3 the files are read through pyarrow's S3 filesystem from a local S3 server."""
    src = work / "plan-input"
    write_prompts(src, a.plan_rows, a.ids, files=a.plan_files)
    server, where = local_s3(work, src) if a.plan_s3 else (None, str(src))
    try:
        code = ("import time; from pipeline import io; t=time.monotonic(); "
                f"p=io.plan_input({where!r}, 'prompt', 'id', []); "
                "print('planned', p.total_rows, len(p.fragments), round(time.monotonic()-t, 2))")
        res = timed([sys.executable, "-c", code], work / "log-plan.txt", env=S3_CREDENTIALS if server else None)
    finally:
        if server is not None:
            server.kill()
            server.wait()
    res["printed"] = (work / "log-plan.txt").read_text().splitlines()[0]
    return {"files": a.plan_files, "rows": a.plan_rows, "ids": a.ids, "storage": "s3 (moto)" if server else "local", **res}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="100000", help="Comma list of row counts.")
    p.add_argument("--systems", default="ours,raw_vllm_1proc,resume", help="ours, ours_ray, ours_arenas (glibc's default malloc arenas), ours_onednn (oneDNN's default primitive cache), raw_vllm_1proc, resume.")
    p.add_argument("--ids", choices=["int", "str"], default="int")
    p.add_argument("--model", default="demo")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--plan-files", type=int, default=0, help="Planning only: this many input files ...")
    p.add_argument("--plan-rows", type=int, default=10_000_000, help="... holding this many ids.")
    p.add_argument("--plan-s3", action="store_true", help="... read through pyarrow's S3 filesystem from a local S3 server (moto).")
    p.add_argument("--name", default="")
    p.add_argument("--work-dir", default=None)
    a = p.parse_args()
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="gpt2-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out_file = ROOT / "benchmarks" / "results" / f"scale-{stamp}{'-' + a.name if a.name else ''}.json"
    report: dict[str, Any] = {"date": stamp, "model": a.model, "ids": a.ids, "cpus": os.cpu_count(), "runs": []}
    try:
        if a.plan_files:
            report["runs"].append({"system": "plan", **plan_only(a, work)})
            print(json.dumps(report["runs"][-1]), flush=True)
        for rows in ([int(r) for r in a.rows.split(",")] if not a.plan_files else []):
            prompts = work / f"prompts-{rows}-{a.ids}.parquet"
            write_prompts(prompts, rows, a.ids)
            for rnd in range(a.rounds):
                for system in a.systems.split(","):  # ours and the peer alternate within each round
                    log = work / f"log-{system}-{rows}-{rnd}.txt"
                    out = work / f"out-{rows}"
                    if system == "raw_vllm_1proc":
                        res = run_raw(a, prompts, work, log)
                    elif system in ("ours", "ours_ray"):
                        res = run_ours(a, prompts, out, log, "inline" if system == "ours" else "ray-data", False)
                    elif system == "ours_arenas":  # glibc's default arena count (8 per core), not one
                        res = run_ours(a, prompts, out, log, "inline", False, {"MALLOC_ARENA_MAX": str(8 * (os.cpu_count() or 1))})
                    elif system == "ours_onednn":  # oneDNN's default primitive cache, not the engine's cap
                        res = run_ours(a, prompts, out, log, "inline", False, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})
                    else:
                        res = run_ours(a, prompts, out, log, "inline", True)
                    report["runs"].append({"system": system, "rows": rows, "round": rnd, **res})
                    print(json.dumps(report["runs"][-1]), flush=True)
                    out_file.write_text(json.dumps(report, indent=2))
    finally:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(report, indent=2))
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
