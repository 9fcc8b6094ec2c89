"""Every error a client can cause: OpenAI's error JSON with the right status, never a 500."""

import asyncio

import httpx
import pytest

from tests.serving.conftest import MAX_IN_FLIGHT, MAX_QUEUED, send_chunked

LONG = "word " * 1100  # over GPT-2's 1024-token context


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 10**12}, "max_tokens"),
        ({"prompt": "hi", "n": 1000}, "n"),
        ({"prompt": "hi", "top_k": -5}, "top_k"),
        ({"prompt": "hi", "min_tokens": 9, "max_tokens": 3}, None),
        ({"prompt": "hi", "best_of": 2, "n": 3}, "best_of"),
        ({"prompt": "hi", "logit_bias": {"60000": -100}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"eos": -100}}, "logit_bias"),
        ({"prompt": "hi", "stop_token_ids": [50257]}, "stop_token_ids"),
        ({"prompt": "hi", "allowed_token_ids": []}, "allowed_token_ids"),
        ({"prompt": "hi", "structured_outputs": {"regex": "(abc"}}, "regex"),
        ({"prompt": "hi", "structured_outputs": {"json": {"type": "foo"}}}, "foo"),
        ({"prompt": "hi", "structured_outputs": {"grammar": "root ::= nowhere"}}, "nowhere"),
        ({"prompt": "hi", "structured_outputs": {"choice": []}}, "empty"),
        ({"prompt": "hi", "structured_outputs": {"choice": ["a"], "regex": "a"}}, "one of"),
        ({"prompt": "hi", "response_format": {"type": "json_schema"}}, "json_schema"),
        ({"prompt": "hi", "use_beam_search": True, "stream": True}, "beam search"),
        ({"prompt": "hi", "use_beam_search": True, "top_p": 0.5}, "top_p"),
        ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt": "hi", "prompt_embeds": "AAAA"}, "prompt_embeds"),
        ({"prompt": "hi", "kv_transfer_params": {"a": 1}}, "kv_transfer_params"),
        ({"prompt": "hi", "mm_payload": "none"}, "multimodal"),
        ({"prompt": "hi", "truncate_prompt_tokens": 5000}, "truncate_prompt_tokens"),
        ({"prompt": "hi", "no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"prompt": "hi", "suffix": "tail"}, None),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": LONG}, "prompt"),
        ({"prompt": "hi", "max_tokens": 1024}, "prompt"),  # prompt + completion over the context
        ({"prompt": 5}, "prompt"),
        ({"prompt": "hi", "stream": "yes please"}, "stream"),
        ({"prompt": "hi", "unknown_field": 1}, "unknown_field"),
        ({}, "prompt"),
    ],
)
def test_bad_completion_requests_are_400(client, body, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert param in (err["param"] or "") or param in err["message"]


@pytest.mark.parametrize(
    "raw", [b'{"prompt": "\\ud800 lone surrogate", "max_tokens": 2}', '{"prompt": "\u00e9\u4e2d\U0001F600\u200b", "max_tokens": 2}'.encode(),
            b'{"prompt": "\\u0000 nul", "max_tokens": 2}', b'{"prompt": "  ", "max_tokens": 2}']
)
def test_unicode_edge_cases_never_500(client, raw):
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (200, 400), r.text
    assert ("choices" in r.json()) if r.status_code == 200 else r.json()["error"]["message"]


def test_context_length_message_is_openais(client):
    err = client.post("/v1/completions", json={"prompt": LONG}).json()["error"]
    assert err["code"] == "context_length_exceeded" and "maximum context length is 1024 tokens" in err["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2", b"null", b'"just a string"', b"\xff\xfe"])
def test_malformed_json_is_400(client, raw):
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_unknown_model_route_and_method(client):
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/embeddings", json={"model": "nope", "input": "hi"})
    assert r.status_code == 404
    assert client.get("/v1/nothing-here").status_code == 404
    assert client.get("/v1/completions").status_code == 405


def test_bad_embedding_requests(client):
    for body in ({"input": ""}, {"input": []}, {"input": "x", "encoding_format": "hex"}, {"input": "x", "dimensions": 3},
                 {"input": LONG}):
        r = client.post("/v1/embeddings", json=body)
        assert r.status_code == 400, (body, r.text)


def test_oversized_body_is_413(client):
    r = client.post("/v1/completions", content=b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"]


@pytest.mark.parametrize("pause", [0.0, 0.002], ids=["chunked", "slow-drip"])
def test_oversized_chunked_body_is_413_before_it_is_read_whole(server, pause):
    """No Content-Length: the bytes are counted as they arrive and the 413 comes at the bound
    (4 MiB by default), not after the whole body was read and tokenized. Serve's HTTP proxy queues
    what arrives until the replica answers, so the client may get tens of MiB out before it is
    stopped (34 and 92 MB seen on a busy machine; how much depends on the load, not on the
    server's bound); a server that read the body whole would take all of the client's 1 GiB."""
    total = 2**30
    status, sent, body = send_chunked(server, "/v1/completions", total=total, chunk=16 * 1024, pause=pause)
    assert status == 413, body[:200]
    assert b"request body over" in body
    assert sent < total // 2  # the client was stopped long before the end of its body


def test_small_chunked_body_is_answered(server):
    status, sent, body = send_chunked(server, "/v1/completions", total=1, chunk=8)
    assert status == 200 and b"text_completion" in body, body[:300]


def test_overload_answers_429_quickly_and_serves_the_rest(server):
    async def one(c: httpx.AsyncClient):
        start = asyncio.get_running_loop().time()
        r = await c.post("/v1/completions", json={"prompt": "Overload test", "max_tokens": 64, "ignore_eos": True})
        return r.status_code, r.headers.get("retry-after"), asyncio.get_running_loop().time() - start, r

    async def burst():
        async with httpx.AsyncClient(base_url=server, timeout=300,
                                     limits=httpx.Limits(max_connections=200)) as c:
            return await asyncio.gather(*(one(c) for _ in range((MAX_IN_FLIGHT + MAX_QUEUED) * 3)))

    results = asyncio.run(burst())
    statuses = [s for s, *_ in results]
    assert 500 not in statuses
    assert statuses.count(200) >= MAX_IN_FLIGHT  # accepted requests complete
    rejected = [(s, ra, t, r) for s, ra, t, r in results if s in (429, 503)]
    assert rejected, statuses
    for status, retry_after, elapsed, r in rejected:
        assert retry_after is not None, (status, r.text, statuses)
        assert r.json()["error"]["message"]
    fastest_ok = min(t for s, _, t, _ in results if s == 200)
    assert min(t for _, _, t, _ in rejected) < fastest_ok  # rejections do not wait for the work
    with httpx.Client(base_url=server) as c:
        assert c.get("/health").status_code == 200  # still up


def test_client_disconnect_aborts_generation(client):
    body = {"prompt": "A very long story", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # got a token, now hang up
    deadline = 30
    import time

    for _ in range(deadline * 2):
        metrics = client.get("/metrics").text
        line = next(l for l in metrics.splitlines() if l.startswith("gpt2_pipeline_engine_requests_unfinished"))
        if float(line.split()[-1]) == 0:
            return
        time.sleep(0.5)
    pytest.fail("the aborted stream still holds an engine slot")


def _fuzz_strategies():
    from hypothesis import strategies as st

    scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
    anything = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                            max_leaves=8)
    prompt = st.one_of(st.text(max_size=300), st.lists(st.text(max_size=30), max_size=3),
                       st.lists(st.integers(-3, 60000), max_size=6), anything)
    completion = st.fixed_dictionaries({}, optional={
        "model": st.sampled_from(["demo", "other", ""]) | anything, "prompt": prompt,
        "max_tokens": st.integers(-5, 24) | anything, "temperature": st.floats(-1, 3) | anything,
        "top_p": st.floats(-0.5, 1.5) | anything, "top_k": st.integers(-3, 100) | anything,
        "n": st.integers(-1, 3) | anything, "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3),
        "seed": st.integers() | anything, "stream": st.booleans() | anything, "echo": st.booleans(),
        "logprobs": st.integers(-1, 25) | anything, "min_tokens": st.integers(-1, 30),
        "repetition_penalty": st.floats(-1, 5) | anything, "stream_options": anything,
    })
    embedding = st.fixed_dictionaries({}, optional={
        "input": prompt, "model": st.sampled_from(["demo", "x"]), "encoding_format": st.sampled_from(["float", "base64", "x"]),
        "dimensions": st.integers(-1, 200) | anything, "normalize": anything,
    })
    return completion, embedding


def test_fuzzed_requests_never_500(client):
    """Property-based: any JSON a client sends gets an answer below 500, and the server stays up."""
    import json as _json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    completion, embedding = _fuzz_strategies()

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(route=st.sampled_from(["/v1/completions", "/v1/embeddings"]), data=st.data())
    def check(route, data):
        body = data.draw(completion if route.endswith("completions") else embedding)
        raw = _json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        assert "Traceback" not in r.text and "/pipeline/" not in r.text

    check()
    assert client.get("/health").status_code == 200


def test_fuzzed_raw_bytes_never_500(client):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(raw=st.binary(max_size=300), route=st.sampled_from(["/v1/completions", "/v1/embeddings"]))
    def check(raw, route):
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
        assert r.status_code < 500, (raw, r.text[:300])

    check()
