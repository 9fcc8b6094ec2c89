"""Logprobs over real HTTP: echo + logprobs scores the prompt (OpenAI's legacy semantics), and
equals the offline score task's token logprobs computed on the same replica."""

import pyarrow as pa
import pytest

from tests.serving.conftest import APP

TEXT = "Café naïve — 😀 日本語 and the history of the city"


def post(client, **body):
    return client.post("/v1/completions", json={"model": "demo", "prompt": TEXT, **body})


def check_offsets(lp, text):
    assert "".join(lp["tokens"]) == text
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]


def test_echo_max_tokens_zero_scores_the_prompt(client):
    r = post(client, echo=True, logprobs=2, max_tokens=0)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    n = body["usage"]["prompt_tokens"]
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v < 0 for v in lp["token_logprobs"][1:])
    assert all(1 <= len(t) <= 3 for t in lp["top_logprobs"][1:])  # top 2, plus the prompt's own token
    check_offsets(lp, TEXT)


def test_echo_with_generation_lists_prompt_then_generated_tokens(client):
    body = post(client, echo=True, logprobs=1, max_tokens=4, temperature=0, ignore_eos=True).json()
    choice, n = body["choices"][0], body["usage"]["prompt_tokens"]
    lp = choice["logprobs"]
    assert body["usage"]["completion_tokens"] == 4 and len(lp["tokens"]) == n + 4
    assert lp["token_logprobs"][0] is None and all(v is not None for v in lp["token_logprobs"][1:])
    check_offsets(lp, choice["text"])
    plain = post(client, logprobs=1, max_tokens=4, temperature=0, ignore_eos=True).json()["choices"][0]
    assert choice["text"] == TEXT + plain["text"]
    assert lp["token_logprobs"][n:] == pytest.approx(plain["logprobs"]["token_logprobs"], rel=1e-5)


def events(client, **body):
    import json

    with client.stream("POST", "/v1/completions", json={"model": "demo", "prompt": TEXT, "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_echo_carries_the_prompt_logprobs_first(client):
    """stream + echo + logprobs: the first event is the prompt with its logprobs (as the
    non-streaming answer lists them), then the generated tokens; max_tokens 0 only scores."""
    whole = post(client, echo=True, logprobs=1, max_tokens=4, temperature=0, ignore_eos=True).json()
    n = whole["usage"]["prompt_tokens"]
    streamed = events(client, echo=True, logprobs=1, max_tokens=4, temperature=0, ignore_eos=True)
    first = streamed[0]["choices"][0]
    assert first["text"] == TEXT and first["logprobs"]["tokens"] == whole["choices"][0]["logprobs"]["tokens"][:n]
    assert first["logprobs"]["token_logprobs"][0] is None
    assert first["logprobs"]["token_logprobs"][1:] == pytest.approx(
        whole["choices"][0]["logprobs"]["token_logprobs"][1:n], rel=1e-5)
    assert "".join(e["choices"][0]["text"] for e in streamed) == whole["choices"][0]["text"]
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in streamed) == n + 4
    only = events(client, echo=True, logprobs=0, max_tokens=0)
    assert [c["text"] for e in only for c in e["choices"]] == [TEXT, ""]
    assert only[-1]["choices"][0]["finish_reason"] == "length"
    assert len(only[0]["choices"][0]["logprobs"]["tokens"]) == n
    two = events(client, prompt=[TEXT, "Hello there"], echo=True, logprobs=0, max_tokens=0)  # scored together
    echoed = {c["index"]: c for c in two[0]["choices"] + two[1]["choices"]}
    assert echoed[0]["text"] == TEXT and echoed[1]["text"] == "Hello there"
    assert echoed[0]["logprobs"]["token_logprobs"] == only[0]["choices"][0]["logprobs"]["token_logprobs"]


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": 0}, "echo"),
    ({"max_tokens": 0, "logprobs": 1}, "echo"),
])
def test_unsupported_combinations_are_400(client, body, message):
    r = post(client, **body)
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_echoed_logprobs_equal_the_offline_score(client, server):
    from ray import serve

    from pipeline.config import SamplingConfig, ScoreConfig
    from pipeline.records import ID, RowSpec

    lp = post(client, echo=True, logprobs=0, max_tokens=0).json()["choices"][0]["logprobs"]
    spec = RowSpec(task="score", prompt_column="prompt", sampling=SamplingConfig(), score=ScoreConfig(token_logprobs=True))
    batch = pa.table({ID: ["a"], "prompt": [TEXT]})
    rows = serve.get_app_handle(APP).process_batch.remote(batch, spec, "test").result(timeout_s=300).to_pylist()
    assert rows[0]["error"] is None
    assert rows[0]["token_logprobs"] == pytest.approx(lp["token_logprobs"][1:], rel=1e-5)
