"""JSONL, CSV and OpenAI Batch inputs end to end on the shared Ray cluster with real engines."""

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import write_prompts
from pipeline.batch import run_job
from pipeline.cli import app
from pipeline.config import JobConfig

PROMPTS = [f"Format check {i}: the river" for i in range(6)]
IDS = [10, 11, 12, 13, 14, 15]
MAX_TOKENS = [3, None, 5, None, None, 2]  # a per-row override column
SAMPLING = {"max_tokens": 6, "temperature": 0.8, "seed": 3}
KEEP = ["id", "sample_index", "generated_text", "token_ids", "completion_tokens", "error"]


def rows(out: Path) -> list[dict]:
    return pq.read_table(out).select(KEEP).sort_by("id").to_pylist()


@pytest.fixture(scope="module")
def parquet_rows(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("ref")
    src = write_prompts(root / "in.parquet", PROMPTS, id=pa.array(IDS, pa.int64()), max_tokens=pa.array(MAX_TOKENS, pa.int64()))
    assert run_job(JobConfig(input=str(src), output=str(root / "out"), batch_size=4, sampling=SAMPLING)).status == "succeeded"
    return rows(root / "out")


def test_jsonl_gives_the_same_rows_as_parquet(tmp_path, parquet_rows):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(
        json.dumps({"id": i, "prompt": p, **({"max_tokens": m} if m else {})}) + "\n" for i, p, m in zip(IDS, PROMPTS, MAX_TOKENS)
    ))
    summary = run_job(JobConfig(input=str(src), output=str(tmp_path / "out"), batch_size=4, sampling=SAMPLING))
    assert summary.status == "succeeded" and summary.rows_in == 6
    assert rows(tmp_path / "out") == parquet_rows
    assert [r["completion_tokens"] for r in parquet_rows][:1] == [3]  # the override column was applied
    # the staged Parquet copy of the input is gone after success: a recursive glob finds the output only
    assert not (tmp_path / "out" / "_input").exists()
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.parquet")) == [f.name for f in (tmp_path / "out").glob("part-*")]


def test_csv_with_duplicates_deduped_gives_the_same_rows(tmp_path, parquet_rows):
    src = tmp_path / "in.csv"
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "prompt", "max_tokens"])
        for i, p, m in zip(IDS, PROMPTS, MAX_TOKENS):
            w.writerow([i, p, m if m else ""])
        w.writerow([IDS[1], "a later row with a repeated id", ""])
        w.writerow([IDS[4], "another one", 1])
    job = JobConfig(input=str(src), output=str(tmp_path / "out"), batch_size=4, sampling=SAMPLING)
    runner = CliRunner()
    refused = runner.invoke(app, ["run", "--input", str(src), "--output", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "input has 2 duplicate ids" in refused.output and "e.g. 11, 14" in refused.output
    assert "--dedupe first" in refused.output and not (tmp_path / "refused").exists()
    summary = run_job(job.model_copy(update={"dedupe": "first"}))
    assert summary.status == "succeeded", summary.message
    assert summary.rows_in == 6 and summary.deduplicated == 2 and summary.missing == 0 and summary.duplicates == 0
    assert rows(tmp_path / "out") == parquet_rows  # the first row of each id, nothing else
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["deduplicated"] == 2


BATCH = [
    {"custom_id": "c-1", "url": "/v1/completions",
     "body": {"model": "demo", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "seed": 1}},
    {"custom_id": "c-2", "url": "/v1/completions",
     "body": {"model": "demo", "prompt": ["A", "B"], "max_tokens": 2, "n": 2, "top_k": 5, "seed": 2}},
    {"custom_id": "bad-temp", "url": "/v1/completions", "body": {"model": "demo", "prompt": "x", "temperature": 7}},
    {"custom_id": "e-1", "url": "/v1/embeddings", "body": {"model": "demo", "input": ["one text", "two texts"]}},
    {"custom_id": "wrong-model", "url": "/v1/embeddings", "body": {"model": "gpt-4", "input": "x"}},
]


def write_batch(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"method": "POST", **line}) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("executor", ["inline", "ray-data"])
def test_openai_batch_round_trip(tmp_path, ray_cluster, engine, loop, executor):
    src = write_batch(tmp_path / "requests.jsonl", BATCH)
    out, copy = tmp_path / "out", tmp_path / "elsewhere" / "results.jsonl"
    job = JobConfig(input=str(src), output=str(out), input_format="openai-batch", results=str(copy), batch_size=2,
                    executor=executor)
    summary = run_job(job)
    assert summary.status == "succeeded" and summary.rows_in == 5 and summary.error_rows == 2
    assert summary.executor == executor
    lines = [json.loads(x) for x in (out / "_results.jsonl").read_text().splitlines()]
    assert copy.read_text() == (out / "_results.jsonl").read_text()
    assert [x["custom_id"] for x in lines] == [b["custom_id"] for b in BATCH]  # input order, each once
    by_id = {x["custom_id"]: x for x in lines}
    for x in lines:
        assert x["id"].startswith("batch_req_") and x["error"] is None and x["response"]["request_id"]
    greedy = by_id["c-1"]["response"]
    assert greedy["status_code"] == 200 and greedy["body"]["object"] == "text_completion"
    assert greedy["body"]["usage"]["completion_tokens"] <= 4
    # the same body through the serving code on the in-process engine answers the same greedy text
    from pipeline.endpoint import api
    from pipeline.endpoint.metrics import Meter
    from pipeline.endpoint.protocol import CompletionRequest

    req = CompletionRequest.model_validate(BATCH[0]["body"])
    direct = loop.run(api.complete(engine, req, api.prepare(engine, req, 8), "demo", 0, Meter(None, "c")))
    assert greedy["body"]["choices"][0]["text"] == direct.choices[0].text
    multi = by_id["c-2"]["response"]["body"]
    assert [c["index"] for c in multi["choices"]] == [0, 1, 2, 3]
    bad = by_id["bad-temp"]["response"]
    assert bad["status_code"] == 400 and "temperature" in bad["body"]["error"]["message"]
    assert bad["body"]["error"]["type"] == "invalid_request_error" and bad["body"]["error"]["param"] == "temperature"
    emb = by_id["e-1"]["response"]["body"]
    assert emb["object"] == "list" and [d["index"] for d in emb["data"]] == [0, 1] and len(emb["data"][0]["embedding"]) == 128
    assert by_id["wrong-model"]["response"]["status_code"] == 404
    shards = pq.read_table(out)  # the Parquet shards stay the source of truth (and stay readable)
    assert sorted(shards["custom_id"].to_pylist()) == sorted(b["custom_id"] for b in BATCH)


def test_batch_file_kill_9_then_resume_answers_each_custom_id_once(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from test_faults import HOLD_ENV, ROOT, shards, wait_shards

    # 4 blocks of 3; the first run holds its writes once 2 shards are committed, so the kill lands mid-job
    lines = [{"custom_id": f"req-{i}", "url": "/v1/completions",
              "body": {"prompt": f"Request {i} says", "max_tokens": 4 + i, "ignore_eos": True, "seed": i}}
             for i in range(12)]
    src, out = write_batch(tmp_path / "batch.jsonl", lines), tmp_path / "out"

    def start(*extra: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "--input", str(src), "--output", str(out), "--input-format",
             "openai-batch", "--batch-size", "3", "--num-cpus", "4", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT, env=env,
        )

    first = start(env={**os.environ, HOLD_ENV: "2"})
    wait_shards(first, out, 2)
    os.killpg(first.pid, signal.SIGKILL)  # kill -9: no cleanup, no results file
    first.wait(60)
    assert not (out / "_results.jsonl").exists() and not (out / "_SUCCESS").exists()
    committed = shards(out)
    assert 2 <= committed < 4

    second = start("--resume")
    log = second.communicate(timeout=600)[0]
    assert second.returncode == 0, log[-3000:]
    results = [json.loads(x) for x in (out / "_results.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in lines]  # each once, in input order
    assert all(r["response"]["status_code"] == 200 for r in results)
    assert [r["response"]["body"]["usage"]["completion_tokens"] for r in results] == [b["body"]["max_tokens"] for b in lines]
    ids = pq.read_table(out)["custom_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 12
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["skipped_resume"] == 3 * committed
    assert summary["missing"] == 0 and summary["duplicates"] == 0
