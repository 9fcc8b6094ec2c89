"""The Batch API on s3:// storage: ``serve --batch-storage s3://...`` against a local S3 server
(moto): upload, create, run (the batch's job folder is under the same URI), download."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import openai
import pytest

from tests.conftest import kill_tree
from tests.serving.conftest import free_port, wait_healthy
from tests.serving.test_batches_api import check_each_once, request_lines, wait_status
from tests.serving.test_batches_restart import KEY, start_serve, stop

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET, PREFIX = "batches", "fleet"
N, BAD = 60, (9,)


@pytest.fixture()
def s3():
    """A local S3 endpoint (moto's server, in a process of its own: its Flask app must not live in
    the test process, whose later jobs would see Flask's globals) with an empty bucket; yields
    its boto3 client and address."""
    import boto3

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:  # until the server listens (or has died)
            if server.poll() is not None:
                raise RuntimeError(f"moto's server exited with {server.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                server_wait(server)
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        yield client, f"127.0.0.1:{port}"
    finally:
        kill_tree(server)


def server_wait(server: subprocess.Popen) -> None:
    """Give a starting server a moment (returns at once if it exits)."""
    try:
        server.wait(timeout=0.2)
    except subprocess.TimeoutExpired:
        pass


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_batch_api_on_s3_storage(tmp_path, s3):
    client, endpoint = s3
    # allow_delayed_open: objects this small go up in one PUT. moto 5.2.1 answers a multipart
    # upload's completion with <CompleteMultipartUploadResponse>, not S3's
    # <CompleteMultipartUploadResult>, and pyarrow 26 takes that for an error.
    uri = (f"s3://{BUCKET}/{PREFIX}?endpoint_override={endpoint}&scheme=http&region=us-east-1"
           "&allow_delayed_open=true")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    local = tmp_path / "local"
    proc = start_serve(port, local, storage_uri=uri, env=CREDENTIALS)
    try:
        wait_healthy(url, timeout=1500, proc=proc)
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=5, timeout=120)
        data = request_lines(N, bad=BAD, max_tokens=8, prefix="s3")
        up = oai.files.create(file=("s3.jsonl", data), purpose="batch")
        assert oai.files.content(up.id).content == data
        batch = oai.batches.create(input_file_id=up.id, endpoint="/v1/completions", completion_window="24h")
        done = wait_status(oai, batch.id, {"completed", "failed", "cancelled", "expired"})
        check_each_once(oai, done, N, BAD, prefix="s3")

        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX)
                for o in page.get("Contents", [])]
        for name in (f"files/{up.id}.jsonl", f"files/{done.output_file_id}.jsonl", f"batches/{batch.id}.json",
                     f"batches/{batch.id}/_SUCCESS"):
            assert f"{PREFIX}/{name}" in keys, name
        summary = json.loads(client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/batches/{batch.id}/_summary.json")["Body"].read())
        assert summary["status"] == "succeeded" and summary["duplicates"] == 0
        assert sorted(p.name for p in local.iterdir()) == []  # nothing went to a local folder
    finally:
        stop(proc)


def test_state_reads_on_s3_are_whole_while_the_state_is_rewritten(s3, monkeypatch):
    """pyarrow sizes an S3 read from a HEAD, then GETs that range: a state file replaced in between
    by a longer version read torn (a batch's GET once answered 400, "Expecting ',' delimiter").
    While one thread rewrites a file, alternately short and long, every read is one whole version."""
    import threading

    from pydantic import BaseModel

    from pipeline.serving.batch_store import BatchStore

    class Doc(BaseModel):
        text: str

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    _, endpoint = s3
    store = BatchStore(f"s3://{BUCKET}/{PREFIX}?endpoint_override={endpoint}&scheme=http&region=us-east-1"
                       "&allow_delayed_open=true")
    path = store.batch_state("batch_" + "0" * 24)
    versions = (Doc(text="a" * 10), Doc(text="b" * 20_000))
    store.write_json(path, versions[0])
    done = threading.Event()

    def rewrite() -> None:
        for i in range(300):
            store.write_json(path, versions[i % 2])
        done.set()

    writer = threading.Thread(target=rewrite)
    writer.start()
    reads = []
    while not done.is_set():
        reads.append(store.read(path, Doc))
    writer.join()
    assert len(reads) > 20 and all(r in versions for r in reads)
