"""The Batch API survives ``kill -9`` of the whole ``serve`` process tree: a restart on the same
storage resumes the batch, and every custom_id is answered exactly once. Also the API key and
the ``batches`` CLI against that real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from pipeline.shards import HOLD_ENV
from tests.conftest import kill_tree
from tests.serving.conftest import free_port, wait_healthy
from tests.serving.test_batches_api import check_each_once, request_lines, wait_status

ROOT = Path(__file__).resolve().parents[2]
KEY, OTHER = "sk-batch-test", "sk-other-tenant"
N, BAD = 120, (5, 77)


def start_serve(port: int, storage: Path, hold_after: int | None = None, storage_uri: str | None = None,
                env: dict[str, str] | None = None) -> subprocess.Popen:
    """``serve`` with the Batch API on ``storage`` (or ``storage_uri``; ``storage``'s folder then
    holds only the keys file and the log), ``env`` added to its environment."""
    storage.mkdir(parents=True, exist_ok=True)
    keys = storage.parent / "keys.txt"
    keys.write_text(f"# one key per line\n{KEY}\n{OTHER}\n")
    env = {**{k: v for k, v in os.environ.items() if k != HOLD_ENV}, **(env or {})}
    if hold_after:
        env[HOLD_ENV] = str(hold_after)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--model", "demo", "--no-embeddings", "--port", str(port),
         "--batch-storage", storage_uri or str(storage), "--api-keys-file", str(keys), "--num-cpus", "4", "--max-batch-in-flight", "8",
         "--no-access-log"],
        stdout=(storage.parent / f"serve-{time.monotonic_ns()}.log").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True, cwd=ROOT, env=env,
    )


def stop(proc: subprocess.Popen) -> None:
    """kill -9 of the whole process tree: Ray's workers (the replica, the runner) run in their
    own process groups under the raylet, so every descendant is killed, not only the group."""
    kill_tree(proc)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "batches", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.timeout(3000)  # two serve start-ups
def test_kill_9_mid_batch_then_restart_answers_each_request_once(tmp_path):
    storage = tmp_path / "storage"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = start_serve(port, storage, hold_after=2)  # the batch's job holds after 2 committed shards
    try:
        wait_healthy(url, timeout=1500, proc=first)
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=5, timeout=120)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).files.list()
        up = oai.files.create(file=("restart.jsonl", request_lines(N, bad=BAD, max_tokens=8)), purpose="batch")
        batch = oai.batches.create(input_file_id=up.id, endpoint="/v1/completions", completion_window="24h")
        deadline = time.monotonic() + 600
        while (now := oai.batches.retrieve(batch.id)).request_counts.completed + now.request_counts.failed < 40:
            assert first.poll() is None and time.monotonic() < deadline, now
            time.sleep(0.3)
        assert now.status == "in_progress" and now.request_counts.total == N
    finally:
        stop(first)  # kill -9 of serve, its Ray and every replica and actor

    second = start_serve(port, storage)
    try:
        wait_healthy(url, timeout=1500, proc=second)
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=5, timeout=120)
        done = wait_status(oai, batch.id, {"completed", "failed"})
        check_each_once(oai, done, N, BAD)
        summary = json.loads((storage / "batches" / batch.id / "_summary.json").read_text())
        assert summary["skipped_resume"] >= 40 and summary["duplicates"] == 0  # resumed, not redone

        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert 'gpt2_pipeline_batch_api_batches{status="completed"} 1.0' in metrics
        assert 'gpt2_pipeline_batch_api_requests_total{outcome="failed"}' in metrics
        listed = cli("list", "--url", url, "--api-key", KEY)
        assert listed.returncode == 0 and batch.id in listed.stdout and "completed" in listed.stdout
        got = cli("download", batch.id, "--url", url, "--api-key", KEY, "-o", str(tmp_path / "dl"))
        assert got.returncode == 0, got.stderr
        assert len((tmp_path / "dl" / f"{batch.id}_output.jsonl").read_text().splitlines()) == N - len(BAD)
        other = openai.OpenAI(base_url=f"{url}/v1", api_key=OTHER, max_retries=5, timeout=120)
        with pytest.raises(openai.NotFoundError):  # each key sees only its own batches and files
            other.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            other.files.content(done.output_file_id)
        assert other.batches.list().data == [] and other.files.list().data == []
        denied = cli("show", batch.id, "--url", url, "--api-key", "sk-wrong")
        assert denied.returncode == 2 and "401" in denied.stderr
    finally:
        stop(second)
