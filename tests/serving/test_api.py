"""The OpenAI-compatible API over real HTTP: completions, streaming, embeddings, models, metrics."""

import base64
import json
import time

import numpy as np
import pytest

PROMPT = "My name is Arthur and I live in"


def complete(client, **body):
    r = client.post("/v1/completions", json={"model": "demo", "prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_models(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == "demo" and body["data"][0]["max_model_len"] == 1024


def test_replica_engine_core_runs_the_model_without_a_worker(client):
    """A Serve replica keeps vLLM's engine core in a process of its own (AsyncLLM), with the model
    inside it on a CPU: engine-core processes are up, and no vLLM worker process exists."""
    import psutil

    from conftest import process_titles

    titles = process_titles(psutil.process_iter())
    assert any("EngineCore" in t for t in titles), titles
    assert not any("VLLM::Worker" in t or "VllmWorker" in t for t in titles), titles


def test_replica_engine_core_lets_its_threads_sleep(client):
    """The replica's engine-core processes start with a short OpenMP spin (GOMP_SPINCOUNT: their
    threads soon sleep instead of spinning on the cores the replica's own process needs) and with
    oneDNN's primitive cache capped, as the in-process engine's (its memory does not grow with
    every batch size), and glibc keeps a step's large buffers in the heap (no mapping per step)."""
    import psutil

    from pipeline.engine.args import (
        CORE_MMAP_THRESHOLD, ONEDNN_CACHE, ONEDNN_CACHE_ENV, OMP_SPIN_KEY, OMP_WAIT_KEY, REPLICA_OMP_SPIN,
    )

    cores = []
    for proc in psutil.process_iter():
        try:
            is_core = "EngineCore" in proc.name() or any("EngineCore" in part for part in proc.cmdline())
            parent = proc.parent()
            # a replica's engine core (not one another test started in the test process)
            if is_core and parent is not None and "ServeReplica" in " ".join(parent.cmdline()):
                env = proc.environ()
                cores.append((env.get(OMP_WAIT_KEY), env.get(OMP_SPIN_KEY), env.get(ONEDNN_CACHE_ENV),
                              env.get("MALLOC_MMAP_THRESHOLD_")))
        except psutil.Error:
            continue
    assert cores and set(cores) == {(None, str(REPLICA_OMP_SPIN), str(ONEDNN_CACHE), str(CORE_MMAP_THRESHOLD))}, cores


def test_plain_completion_greedy_is_deterministic(client):
    first = complete(client, max_tokens=8, temperature=0)
    second = complete(client, max_tokens=8, temperature=0)
    assert first["object"] == "text_completion" and first["model"] == "demo"
    assert first["choices"][0]["text"] == second["choices"][0]["text"] != ""
    assert first["choices"][0]["finish_reason"] == "length"
    assert first["usage"] == {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16}


def test_list_prompt_with_n_and_seed(client):
    body = complete(client, prompt=["One", "Two", "Three"], n=2, max_tokens=5, seed=7)
    assert sorted(c["index"] for c in body["choices"]) == list(range(6))
    again = complete(client, prompt=["One", "Two", "Three"], n=2, max_tokens=5, seed=7)
    by_index = lambda b: {c["index"]: c["text"] for c in b["choices"]}  # noqa: E731
    assert by_index(body) == by_index(again)
    other = complete(client, prompt=["One", "Two", "Three"], n=2, max_tokens=5, seed=8)
    assert by_index(other) != by_index(body)


def test_token_id_prompt_echo_and_logprobs(client):
    body = complete(client, prompt=[3666, 1438, 318], max_tokens=4, temperature=0, echo=True, logprobs=2)
    choice = body["choices"][0]
    assert choice["text"].startswith("My name is")
    lp = choice["logprobs"]  # echo: the 3 prompt tokens (the first without a logprob), then 4 generated
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 7
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:]) and all(1 <= len(t) <= 3 for t in lp["top_logprobs"][1:])


def test_stop_string_and_extras(client):
    greedy = complete(client, max_tokens=12, temperature=0)["choices"][0]["text"]
    word = greedy.split()[2]
    stopped = complete(client, max_tokens=12, temperature=0, stop=[word])["choices"][0]
    assert stopped["finish_reason"] == "stop" and word not in stopped["text"]
    extra = complete(client, max_tokens=6, min_tokens=6, top_k=5, repetition_penalty=1.3, temperature=0.7)
    assert extra["usage"]["completion_tokens"] == 6


def test_streaming_arrives_in_chunks_and_ends_with_done(client):
    arrivals, events = [], []
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 48, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.monotonic()
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - start)
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 48
    text_chunks = [c for c in chunks[:-1] if c["choices"]]
    assert len(text_chunks) > 1
    assert arrivals[0] < arrivals[-2]  # the first tokens arrived before the last ones were generated
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_embeddings_shape_determinism_order_and_base64(client, demo_model):
    texts = ["The cat sat on the mat", "A completely different sentence", "The cat sat on the mat"]
    body = client.post("/v1/embeddings", json={"model": "demo", "input": texts}).json()
    vecs = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
    assert vecs.shape == (3, 128) and body["usage"]["prompt_tokens"] > 0
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert np.allclose(vecs[0], vecs[2], atol=1e-5) and not np.allclose(vecs[0], vecs[1], atol=1e-3)
    single = client.post("/v1/embeddings", json={"input": texts[1]}).json()["data"][0]["embedding"]
    assert np.allclose(single, vecs[1], atol=1e-5)  # batch order kept
    b64 = client.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype=np.float32)
    assert np.allclose(decoded, vecs[0], atol=1e-6)
    # Feature extraction = the mean of GPT-2's final hidden states (HF transformers), normalized.
    import torch
    from transformers import AutoTokenizer, GPT2Model

    tok = AutoTokenizer.from_pretrained(demo_model)
    hf = GPT2Model.from_pretrained(demo_model).eval()
    with torch.no_grad():
        hidden = hf(torch.tensor([tok.encode(texts[1])])).last_hidden_state[0].mean(0).numpy()
    assert np.allclose(hidden / np.linalg.norm(hidden), vecs[1], atol=1e-3)


def test_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["demo"]
    done = client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens == 5
    pieces = [c.choices[0].text for c in client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=5, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == done.choices[0].text
    emb = client.embeddings.create(model="demo", input=["hello world"])
    assert len(emb.data[0].embedding) == 128
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=5)


def test_metrics_count_requests_and_tokens(client):
    complete(client, max_tokens=3)
    text = client.get("/metrics").text
    for name in ("gpt2_pipeline_requests_total", "gpt2_pipeline_completion_tokens_total",
                 "gpt2_pipeline_request_latency_seconds", "gpt2_pipeline_engine_requests_unfinished",
                 "gpt2_pipeline_time_to_first_token_seconds", "gpt2_pipeline_batch_jobs_running"):
        assert name in text
    line = next(l for l in text.splitlines() if l.startswith("gpt2_pipeline_completion_tokens_total"))
    assert float(line.split()[-1]) >= 3


def test_health_and_readiness(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/health/ready").json()["status"] == "ready"
