"""vLLM's decoding fields on the real engine (demo, float32): each field's effect on the tokens.

Structured outputs (choice, regex, JSON schema, grammar), beam search and no_repeat_ngram_size
against HF ``generate``, bans / biases / stop ids against their tokens, truncation, best_of, and
the values vLLM refuses.
"""

from __future__ import annotations

import json
import re

import pytest

from pipeline.config import SamplingConfig

PROMPTS = ["The quick brown fox", "Once upon a time", "In 1999 the", "Hello"]


def _complete(engine, loop, sampling: SamplingConfig, prompt: str = PROMPTS[0]):
    return loop.run(engine.complete(engine.encode(prompt, sampling.max_tokens), sampling))


@pytest.fixture(scope="module")
def hf(demo_model):
    import torch
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(demo_model, torch_dtype=torch.float32).eval()


def test_choice_outputs_are_choices(engine, loop):
    labels = ["positive", "negative", "neutral"]
    for prompt in PROMPTS:
        for seed in range(3):
            s = SamplingConfig(max_tokens=8, seed=seed, structured_outputs={"choice": labels})
            assert {x.text for x in _complete(engine, loop, s, prompt).samples} <= set(labels)


def test_regex_outputs_match(engine, loop):
    pattern = r"[0-9]{3}-[a-z]{2}"
    for prompt in PROMPTS:
        s = SamplingConfig(max_tokens=20, seed=1, n=2, structured_outputs={"regex": pattern})
        for x in _complete(engine, loop, s, prompt).samples:
            assert re.fullmatch(pattern, x.text), x.text
            assert x.finish_reason == "stop"


def test_json_schema_outputs_validate(engine, loop):
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "ok": {"type": "boolean"}},
              "required": ["name", "ok"], "additionalProperties": False}
    for prompt in PROMPTS:
        s = SamplingConfig(max_tokens=60, seed=2, structured_outputs={"json": schema})
        [x] = _complete(engine, loop, s, prompt).samples
        assert x.finish_reason == "stop"
        jsonschema.validate(json.loads(x.text), schema)


def test_grammar_outputs_are_in_the_language(engine, loop):
    s = SamplingConfig(max_tokens=10, seed=3, n=4, structured_outputs={"grammar": 'root ::= ("yes" | "no") "!"?'})
    for x in _complete(engine, loop, s).samples:
        assert x.text in {"yes", "no", "yes!", "no!"}


def test_constraint_cut_by_max_tokens_is_length_with_the_text_so_far(engine, loop):
    s = SamplingConfig(max_tokens=3, temperature=0, structured_outputs={"json": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}})
    [x] = _complete(engine, loop, s).samples
    assert x.finish_reason == "length" and len(x.token_ids) == 3 and x.text.startswith("{")


def test_bad_constraints_are_refused_with_vllms_message(engine):
    for so, words in [({"regex": "(abc"}, "regex"), ({"json": {"type": "foo"}}, "foo"),
                      ({"grammar": "root ::= undefined_rule"}, "undefined_rule")]:
        with pytest.raises(ValueError, match=words):
            engine.check(SamplingConfig(structured_outputs=so))
    with pytest.raises(ValueError, match="out-of-vocab"):
        engine.check(SamplingConfig(logit_bias={60000: 5}))
    with pytest.raises(ValueError, match="exactly one"):
        SamplingConfig(structured_outputs={"regex": "a", "choice": ["a"]})


def test_beam_search_top_beam_matches_hf(engine, loop, hf):
    import torch

    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        for width in (2, 4):
            s = SamplingConfig(max_tokens=12, use_beam_search=True, n=width, temperature=0)
            ours = _complete(engine, loop, s, prompt).samples
            assert len(ours) == width
            ref = hf.generate(torch.tensor([ids]), num_beams=width, num_return_sequences=width, do_sample=False,
                              max_new_tokens=12, early_stopping="never", length_penalty=1.0,
                              pad_token_id=50256)[:, len(ids):].tolist()
            assert ours[0].token_ids == ref[0], (prompt, width)


def test_no_repeat_ngram_matches_hf(engine, loop, hf):
    import torch

    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        for size in (1, 2, 3):
            s = SamplingConfig(max_tokens=40, temperature=0, no_repeat_ngram_size=size, ignore_eos=True)
            [x] = _complete(engine, loop, s, prompt).samples
            ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40, min_new_tokens=40,
                              no_repeat_ngram_size=size, pad_token_id=50256)[0, len(ids):].tolist()
            assert x.token_ids == ref, (prompt, size)
            seq = ids + x.token_ids
            grams = [tuple(seq[i:i + size]) for i in range(len(seq) - size + 1)]
            assert len(grams) == len(set(grams))


def test_bans_biases_and_stop_ids_act_on_their_tokens(engine, loop):
    greedy = _complete(engine, loop, SamplingConfig(max_tokens=8, temperature=0)).samples[0].token_ids
    first = greedy[0]
    # a bad word (its token) never appears; a banned first token is replaced
    word = engine.tokenizer.decode([first])
    banned = _complete(engine, loop, SamplingConfig(max_tokens=8, temperature=0, bad_words=[word.strip()])).samples[0]
    assert first not in banned.token_ids
    # logit_bias -100 on the greedy token removes it, +100 on a token forces it
    biased = _complete(engine, loop, SamplingConfig(max_tokens=8, temperature=0, logit_bias={first: -100})).samples[0]
    assert biased.token_ids[0] != first
    forced = _complete(engine, loop, SamplingConfig(max_tokens=4, temperature=0, ignore_eos=True, logit_bias={464: 100})).samples[0]
    assert forced.token_ids == [464] * 4
    # allowed_token_ids: only those
    allowed = _complete(engine, loop, SamplingConfig(max_tokens=6, seed=0, allowed_token_ids=[11, 13, 464])).samples[0]
    assert set(allowed.token_ids) <= {11, 13, 464}
    # stop_token_ids: ends at the token (kept in token_ids as vLLM does), finish_reason stop
    stop_at = greedy[3]
    stopped = _complete(engine, loop, SamplingConfig(max_tokens=8, temperature=0, stop_token_ids=[stop_at])).samples[0]
    assert stopped.token_ids[-1] == stop_at and stopped.finish_reason == "stop"
    assert len(stopped.token_ids) == greedy.index(stop_at) + 1
    # min_p 1.0 is greedy
    assert _complete(engine, loop, SamplingConfig(max_tokens=8, seed=5, min_p=1.0)).samples[0].token_ids == greedy


def test_best_of_returns_the_most_likely_samples(engine, loop):
    s = SamplingConfig(max_tokens=6, seed=7, n=2, best_of=5, logprobs=0)
    samples = _complete(engine, loop, s).samples
    assert [x.index for x in samples] == [0, 1]
    total = [sum(t.logprob for t in x.logprobs) for x in samples]
    every = _complete(engine, loop, SamplingConfig(max_tokens=6, seed=7, n=5, logprobs=0)).samples
    best = sorted((sum(t.logprob for t in x.logprobs) for x in every), reverse=True)[:2]
    assert total == pytest.approx(best)


def test_truncate_prompt_tokens_keeps_the_chosen_side(engine):
    long = " ".join(["word"] * 2000)
    with pytest.raises(Exception, match="prompt has"):
        engine.encode(long, 8)
    left = engine.encode(long + " end", 8, sampling=SamplingConfig(truncate_prompt_tokens=100, truncation_side="left"))
    assert len(left) == 100 and engine.tokenizer.decode(left).endswith(" end")
    right = engine.encode("start " + long, 8, sampling=SamplingConfig(truncate_prompt_tokens=50, truncation_side="right"))
    assert len(right) == 50 and engine.tokenizer.decode(right).startswith("start")
    default = engine.encode(long + " end", 8, sampling=SamplingConfig(truncate_prompt_tokens=-1))
    assert len(default) == engine.context_length - 1 and engine.tokenizer.decode(default).endswith(" end")


def test_row_columns_give_each_row_its_constraint(engine, loop):
    import pyarrow as pa

    from pipeline.records import ID, RowSpec, process_batch

    spec = RowSpec(task="generate", prompt_column="prompt",
                   sampling=SamplingConfig(max_tokens=30, seed=0, structured_outputs={"choice": ["yes", "no"]}))
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "boolean"}}, "required": ["n"]})
    batch = pa.table({
        ID: ["job", "choice", "schema", "bad-schema", "bad-id"],
        "prompt": PROMPTS + ["Hi"],
        "choice": [None, ["red", "green"], None, None, None],
        "json_schema": [None, None, schema, '{"type": "foo"}', None],
        "stop_token_ids": [None, None, None, None, [70000]],
    })
    rows = {r[ID]: r for r in loop.run(process_batch(engine, batch, spec, 0)).to_pylist()}
    assert rows["job"]["generated_text"] in {"yes", "no"} and rows["job"]["error"] is None
    assert rows["choice"]["generated_text"] in {"red", "green"}
    assert isinstance(json.loads(rows["schema"]["generated_text"])["n"], bool)
    assert "foo" in rows["bad-schema"]["error"] and rows["bad-schema"]["generated_text"] is None
    assert "out-of-vocab" in rows["bad-id"]["error"]


def test_truncate_prompt_tokens_row_instead_of_error(engine, loop):
    import pyarrow as pa

    from pipeline.records import ID, RowSpec, process_batch

    long = " ".join(["word"] * 1500) + " end"
    batch = pa.table({ID: ["a"], "prompt": [long]})
    plain = RowSpec(task="generate", prompt_column="prompt", sampling=SamplingConfig(max_tokens=4))
    assert loop.run(process_batch(engine, batch, plain, 0)).to_pylist()[0]["error"].startswith("prompt_too_long")
    cut = RowSpec(task="generate", prompt_column="prompt", sampling=SamplingConfig(max_tokens=4, truncate_prompt_tokens=200))
    row = loop.run(process_batch(engine, batch, cut, 0)).to_pylist()[0]
    assert row["error"] is None and row["prompt_tokens"] == 200
