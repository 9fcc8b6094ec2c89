"""Nothing lost: Ctrl-C, kill -9 of the driver, engine actor and node failures, error-rate aborts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from conftest import write_prompts
from pyarrow.fs import LocalFileSystem

from pipeline import compact
from pipeline.batch import run_job
from pipeline.shards import HOLD_ENV
from pipeline.config import JobConfig

ROOT = Path(__file__).resolve().parents[1]


def shards(out: Path) -> int:
    """Committed blocks: shards still staged plus those compacted into output files."""
    return compact.committed_blocks(LocalFileSystem(), str(out))


def start_run(src: Path, out: Path, *extra: str, hold_after: int | None = None,
              env: dict | None = None) -> subprocess.Popen:
    """The CLI in its own process group; ``hold_after=N`` holds every write once N shards are
    committed (shards.HOLD_ENV), so the job is still running whenever the test interrupts it."""
    env = {**os.environ, **(env or {}), **({HOLD_ENV: str(hold_after)} if hold_after else {})}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--input", str(src), "--output", str(out), "--batch-size", "4",
         "--max-tokens", "48", "--ignore-eos", "--seed", "0", "--num-cpus", "4", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT, env=env,
    )


def wait_shards(proc: subprocess.Popen, out: Path, at_least: int, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while shards(out) < at_least:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.5)


def test_ctrl_c_then_kill_9_then_resume_is_exactly_once(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", [f"Interrupted prompt number {i}" for i in range(64)])
    out = tmp_path / "out"

    first = start_run(src, out, hold_after=2)
    wait_shards(first, out, 2)
    first.send_signal(signal.SIGINT)  # Ctrl-C: stop cleanly, say how far it got
    log = first.communicate(timeout=180)[0]
    assert first.returncode == 130, log[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["status"] == "interrupted" and "--resume" in summary["message"]
    assert not (out / "_SUCCESS").exists()
    done_after_ctrl_c = shards(out)

    assert 2 <= done_after_ctrl_c < 16  # held: the job cannot have finished before the Ctrl-C

    second = start_run(src, out, "--resume", hold_after=done_after_ctrl_c + 1)
    wait_shards(second, out, done_after_ctrl_c + 1)
    os.killpg(second.pid, signal.SIGKILL)  # kill -9: no cleanup at all
    second.wait(60)

    third = start_run(src, out, "--resume")
    log = third.communicate(timeout=600)[0]
    assert third.returncode == 0, log[-3000:]
    ids = pq.read_table(out)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 64
    assert json.loads((out / "_summary.json").read_text())["skipped_resume"] > 0
    assert (out / "_SUCCESS").exists() and not list(out.glob(".tmp-*"))


def test_kill_9_mid_compaction_readers_and_resume_see_each_id_once(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl

    src = write_prompts(tmp_path / "in.parquet", [f"Compacted prompt number {i}" for i in range(64)],
                        id=[f"id-{i:02d}" for i in range(64)])
    out = tmp_path / "out"
    # Output files of 8 rows (2 commits of 4); the job holds right after the first file's rename,
    # before the 2 staged shards it holds are deleted: the one moment both copies exist.
    first = start_run(src, out, "--max-rows-per-file", "8", env={compact.HOLD_ENV: "1"})
    deadline = time.monotonic() + 400
    while not list(out.glob("part-*.parquet")):
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no output file"
        time.sleep(0.5)
    visible = list(out.glob("part-*.parquet"))
    held = set(compact.sources(LocalFileSystem(), str(visible[0])))
    assert len(held) == 2 and held <= {p.name for p in (out / "_staging").glob("part-*.parquet")}
    for ids in (pd.read_parquet(out)["id"].tolist(), pl.read_parquet(f"{out}/*.parquet")["id"].to_list(),
                [r[0] for r in duckdb.sql(f"select id from '{out}/*.parquet'").fetchall()]):
        assert len(ids) == len(set(ids)) == 8  # the staged copies are invisible to readers
    os.killpg(first.pid, signal.SIGKILL)  # kill -9 mid-compaction
    first.wait(60)

    second = start_run(src, out, "--resume", "--max-rows-per-file", "8")
    log = second.communicate(timeout=600)[0]
    assert second.returncode == 0, log[-3000:]
    ids = pq.read_table(out)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 64
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["skipped_resume"] >= 8 and summary["duplicates"] == 0 and summary["shards"] == 8
    assert not (out / "_staging").exists()


def test_engine_actor_and_node_failures_lose_and_duplicate_nothing():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--rows", "64", "--faults", "kill-actor,remove-node"],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )
    assert "{" in proc.stdout, proc.stderr[-3000:]
    # Ray may print worker log lines after the report: decode the first JSON object only
    report, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])
    assert report["duplicates"] == 0 and report["lost"] == 0, report
    assert [f["fault"] for f in report["faults_injected"]] == ["kill-actor", "remove-node"]
    assert report["job_status"] == "succeeded" and proc.returncode == 0


def test_max_error_rate_aborts_and_keeps_good_rows(tmp_path, ray_cluster):
    prompts = [None if i % 3 else f"Good prompt {i}" for i in range(60)]  # two thirds are bad
    src = write_prompts(tmp_path / "in.parquet", prompts)
    job = JobConfig(input=str(src), output=str(tmp_path / "out"), batch_size=4, max_error_rate=0.2,
                    sampling={"max_tokens": 4})
    summary = run_job(job)
    assert summary.status == "aborted" and "max-error-rate" in summary.message and "--resume" in summary.message
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows > 0 and table["error"].null_count > 0  # committed good rows are kept
    assert not (tmp_path / "out" / "_SUCCESS").exists()
