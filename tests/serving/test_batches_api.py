"""OpenAI's Files and Batches API on a real Serve application, driven by the official client."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

BAD = 3  # the request whose body the endpoint refuses (max_tokens -1: a 400 in the error file)


def request_lines(n: int, bad: tuple[int, ...] = (), max_tokens: int = 4, prefix: str = "req") -> bytes:
    lines = []
    for i in range(n):
        body = {"model": "demo", "prompt": f"Batch API prompt {i}", "max_tokens": max_tokens, "seed": i}
        if i in bad:
            body["max_tokens"] = -1
        lines.append(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/completions", "body": body}))
    return ("\n".join(lines) + "\n").encode()


def wait_status(oai: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = 600) -> openai.types.Batch:
    """Poll until the batch reaches one of ``statuses`` (a state, not a clock)."""
    deadline = time.monotonic() + timeout
    while True:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}: {batch}"
        time.sleep(0.3)


def result_lines(oai: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in oai.files.content(file_id).text.splitlines()]


def check_each_once(oai: openai.OpenAI, done: openai.types.Batch, n: int, bad: tuple[int, ...],
                    prefix: str = "req") -> tuple[list[dict], list[dict]]:
    """A completed batch of ``request_lines(n, bad, prefix=prefix)``: every custom_id exactly once
    across its output and error files, the refused bodies (``bad``) alone in the error file, both
    files in input order. Returns their lines."""
    assert done.status == "completed", done.errors
    output, errors = result_lines(oai, done.output_file_id), result_lines(oai, done.error_file_id)
    ids = [r["custom_id"] for r in output + errors]
    assert len(ids) == len(set(ids)) == n
    assert [r["custom_id"] for r in errors] == [f"{prefix}-{i}" for i in bad]
    assert [r["custom_id"] for r in output] == [f"{prefix}-{i}" for i in range(n) if i not in bad]
    return output, errors


@pytest.fixture()
def oai(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def test_lifecycle_upload_create_poll_download(oai):
    data = request_lines(20, bad=(BAD,))
    up = oai.files.create(file=("requests.jsonl", data), purpose="batch")
    assert up.id.startswith("file-") and up.bytes == len(data) and up.filename == "requests.jsonl" and up.purpose == "batch"
    assert oai.files.retrieve(up.id).bytes == len(data)
    assert oai.files.content(up.id).content == data
    assert up.id in [f.id for f in oai.files.list()]

    created = oai.batches.create(input_file_id=up.id, endpoint="/v1/completions", completion_window="24h",
                                 metadata={"project": "lifecycle"})
    assert created.status == "validating" and created.metadata == {"project": "lifecycle"}
    assert created.expires_at == created.created_at + 24 * 3600
    done = wait_status(oai, created.id, {"completed", "failed"})
    output, errors = check_each_once(oai, done, 20, (BAD,))
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert (done.request_counts.completed, done.request_counts.failed, done.request_counts.total) == (19, 1, 20)
    for r in output:
        assert r["id"].startswith("batch_req_") and r["error"] is None and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["object"] == "text_completion" and body["model"] == "demo" and body["usage"]["completion_tokens"] <= 4
    assert errors[0]["response"]["status_code"] == 400 and "max_tokens" in errors[0]["response"]["body"]["error"]["message"]
    out_file = oai.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.bytes > 0

    assert created.id in [b.id for b in oai.batches.list()]
    with pytest.raises(openai.BadRequestError):
        oai.batches.cancel(created.id)  # a completed batch stays completed
    oai.files.delete(up.id)
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(up.id)


def test_invalid_lines_fail_the_batch_with_line_numbers(oai):
    good = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}})
    lines = [good, "{not json", good, good.replace("/v1/completions", "/v1/embeddings").replace('"a"', '"b"'), "", '["a list"]']
    up = oai.files.create(file=("bad.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = oai.batches.create(input_file_id=up.id, endpoint="/v1/completions", completion_window="24h")
    failed = wait_status(oai, batch.id, {"failed", "completed"})
    assert failed.status == "failed" and failed.failed_at and failed.output_file_id is None
    found = {(e.line, e.code) for e in failed.errors.data}
    assert found == {(2, "invalid_request"), (3, "duplicate_custom_id"), (4, "mismatched_endpoint"), (6, "invalid_request")}


def test_create_refuses_bad_arguments_with_400(oai):
    up = oai.files.create(file=("one.jsonl", request_lines(1)), purpose="batch")
    for kwargs in ({"completion_window": "1h"}, {"endpoint": "/v1/chat/completions"}, {"input_file_id": "file-nope"},
                   {"input_file_id": "../../etc/passwd"}):
        args = {"input_file_id": up.id, "endpoint": "/v1/completions", "completion_window": "24h", **kwargs}
        with pytest.raises(openai.BadRequestError) as err:
            oai.batches.create(**args)
        assert next(iter(kwargs)) == err.value.body["param"]


def test_cancel_keeps_finished_work_and_lists_the_rest(oai):
    n = 300
    up = oai.files.create(file=("many.jsonl", request_lines(n, max_tokens=16, prefix="c")), purpose="batch")
    batch = oai.batches.create(input_file_id=up.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 600
    while oai.batches.retrieve(batch.id).request_counts.completed < 8:  # some work committed
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert oai.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_status(oai, batch.id, {"cancelled"})
    assert done.cancelling_at and done.cancelled_at and done.completed_at is None
    output, errors = result_lines(oai, done.output_file_id), result_lines(oai, done.error_file_id)
    ids = [r["custom_id"] for r in output + errors]
    assert len(ids) == len(set(ids)) == n  # every request exactly once across both files
    assert 8 <= len(output) < n and done.request_counts.completed == len(output)
    assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}


def test_expiry_lists_unfinished_requests_as_batch_expired(oai):
    n = 200
    up = oai.files.create(file=("slow.jsonl", request_lines(n, max_tokens=32, prefix="e")), purpose="batch")
    batch = oai.batches.create(input_file_id=up.id, endpoint="/v1/completions", completion_window="1s")
    done = wait_status(oai, batch.id, {"expired", "completed", "failed"})
    assert done.status == "expired" and done.expired_at >= done.expires_at == done.created_at + 1
    output, errors = result_lines(oai, done.output_file_id), result_lines(oai, done.error_file_id)
    ids = [r["custom_id"] for r in output + errors]
    assert len(ids) == len(set(ids)) == n and errors
    assert {r["error"]["code"] for r in errors} == {"batch_expired"} and all(r["response"] is None for r in errors)


def test_list_pagination(oai):
    up = oai.files.create(file=("tiny.jsonl", request_lines(1, prefix="p")), purpose="batch")
    made = [oai.batches.create(input_file_id=up.id, endpoint="/v1/completions", completion_window="24h").id for _ in range(3)]
    first = oai.batches.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    seen = [b.id for b in first.data]
    page = first
    while page.has_next_page():
        page = page.get_next_page()
        seen += [b.id for b in page.data]
    assert len(seen) == len(set(seen)) and set(made) <= set(seen)
    assert seen[:3] == made[::-1]  # newest first
    for batch_id in made:
        wait_status(oai, batch_id, {"completed"})


def test_hostile_file_names_ids_and_sizes(oai, server, batch_storage):
    up = oai.files.create(file=("../../../etc/passwd.jsonl", request_lines(1)), purpose="batch")
    assert up.filename == "../../../etc/passwd.jsonl"  # kept as a label only
    names = sorted(p.name for p in (batch_storage / "files").iterdir())
    assert f"{up.id}.jsonl" in names and all(n.startswith("file-") for n in names)
    for path in ("/v1/files/..%2F..%2Fetc%2Fpasswd", "/v1/files/file-..%2Fx/content", "/v1/batches/batch_%2E%2E"):
        r = httpx.get(server + path)
        assert r.status_code == 404 and r.json()["error"]["message"], path  # no route, or an id this server never made
    with pytest.raises(openai.APIStatusError) as err:  # over the server's max_file_bytes (64 KiB here)
        oai.files.create(file=("big.jsonl", b"x" * (200 * 1024)), purpose="batch")
    assert err.value.status_code == 413
    with pytest.raises(openai.BadRequestError):
        oai.files.create(file=("x.jsonl", request_lines(1)), purpose="fine-tune")
    assert not [p for p in (batch_storage / "files").iterdir() if p.name.startswith(".tmp")]
