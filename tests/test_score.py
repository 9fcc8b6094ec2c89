"""The score task: vLLM prompt logprobs through the shared Engine, checked against HF transformers
(float32 demo model), and the batch job end to end (score rows, error rows, corpus perplexity)."""

import json
import math

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import write_prompts
from pipeline.engine import PromptError, score_windows

SHORT = ["My name is Arthur and I live in", "Hello, I'm a language model,", "The history of the city begins"]
UNICODE = "Café naïve façade — 😀🎉 日本語のテキスト, 中文 and ñandú über Ångström"
RTOL = 1e-4


@pytest.fixture(scope="module")
def hf(demo_model):
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(demo_model)
    model = GPT2LMHeadModel.from_pretrained(demo_model, torch_dtype=torch.float32).eval()
    return tok, model


def hf_loss(model, ids: list[int]) -> float:
    """HF's own answer: ``model(ids, labels=ids).loss`` (mean NLL over tokens after the first)."""
    import torch

    with torch.no_grad():
        t = torch.tensor([ids])
        return float(model(t, labels=t).loss)


def hf_sliding(model, ids: list[int], max_length: int, stride: int) -> tuple[float, list[float]]:
    """The loop of HF's "Perplexity of fixed-length models" guide, also keeping each scored
    token's log-probability. The mean is over the tokens the loss really covers (the guide's
    ``num_valid_tokens - 1`` weight undercounts windows after the first by one token)."""
    import torch

    nll_sum, n_tokens, prev_end, logprobs = 0.0, 0, 0, []
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            out = model(input_ids, labels=target_ids)
        scored = int((target_ids[:, 1:] != -100).sum())  # labels shift by one inside the loss
        nll_sum += float(out.loss) * scored
        n_tokens += scored
        lp = torch.log_softmax(out.logits[0, :-1].double(), -1).gather(1, input_ids[0, 1:, None])[:, 0]
        logprobs += lp[-scored:].tolist()
        prev_end = end
        if end == len(ids):
            break
    return nll_sum / n_tokens, logprobs


def close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * abs(b)


def test_windows_score_every_token_after_the_first_once():
    assert score_windows(10, 1023, 512) == [(0, 10, 10)]
    wins = score_windows(2500, 1023, 512)
    assert wins[0] == (0, 1023, 1023) and wins[-1][1] == 2500
    assert sum(trg for _, _, trg in wins) == 2500  # the first window's first token has no prediction
    assert all(trg <= 512 for _, _, trg in wins[1:])
    with pytest.raises(ValueError, match="stride"):
        score_windows(2500, 1023, 2000)


def test_short_and_unicode_texts_match_hf_loss(engine, loop, hf):
    tok, model = hf
    for text in SHORT + [UNICODE]:
        ids = tok.encode(text)
        scored = loop.run(engine.score(engine.encode(text, check_length=False)))
        assert scored.prompt_tokens == len(ids) and scored.scored_tokens == len(ids) - 1
        assert close(scored.nll, hf_loss(model, ids)), text
        assert close(scored.perplexity, math.exp(hf_loss(model, ids)))
        _, ref = hf_sliding(model, ids, 1023, 512)
        assert all(close(a, b) for a, b in zip(scored.token_logprobs, ref, strict=True))


def test_first_token_scored_after_endoftext(engine, loop, hf):
    tok, model = hf
    ids = tok.encode(UNICODE)
    scored = loop.run(engine.score(ids, score_first_token=True))
    assert scored.scored_tokens == scored.prompt_tokens == len(ids)
    assert close(scored.nll, hf_loss(model, [50256] + ids))


def test_long_text_slides_like_hf_and_repeats_exactly(engine, loop, hf):
    tok, model = hf
    text = " ".join(f"Paragraph {i}: the river city grew, traded wool and salt, and burned twice." for i in range(90))
    ids = tok.encode(text)
    assert len(ids) > 1500
    for stride in (512, 300):
        ref_nll, ref_lps = hf_sliding(model, ids, 1023, stride)
        first = loop.run(engine.score(ids, stride=stride))
        assert first.scored_tokens == len(ids) - 1 == len(ref_lps)
        assert close(first.nll, ref_nll)
        assert all(close(a, b) for a, b in zip(first.token_logprobs, ref_lps))
        again = loop.run(engine.score(ids, stride=stride))  # prefix caching must not change anything
        assert again.token_logprobs == first.token_logprobs


def test_one_token_text_is_too_short(engine, loop):
    ids = engine.encode("Hello")
    assert len(ids) == 1
    with pytest.raises(PromptError, match="too_short"):
        loop.run(engine.score(ids))
    assert loop.run(engine.score(ids, score_first_token=True)).scored_tokens == 1


# ---- the batch job -----------------------------------------------------------------------------
def test_score_job_rows_errors_and_corpus_perplexity(tmp_path, ray_cluster, hf):
    from pipeline.batch import run_job
    from pipeline.config import JobConfig

    tok, model = hf
    long = " ".join(f"Line {i} of a long letter about the harbour." for i in range(150))
    texts = SHORT + [UNICODE, None, "", "Hello", long]
    src = write_prompts(tmp_path / "in.parquet", texts, id=pa.array(range(len(texts)), pa.int64()),
                        topic=[f"t{i}" for i in range(len(texts))])
    job = JobConfig(input=str(src), output=str(tmp_path / "out"), task="score", batch_size=3, passthrough=["topic"],
                    score={"token_logprobs": True})
    summary = run_job(job)
    assert summary.status == "succeeded", summary.message
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("nll").type == pa.float64()
    assert table.schema.field("token_logprobs").type == pa.list_(pa.float32())
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == list(range(len(texts)))
    assert rows[4]["error"].startswith("null_prompt") and rows[5]["error"].startswith("empty_prompt")
    assert rows[6]["error"].startswith("too_short") and rows[6]["nll"] is None
    for i in (0, 1, 2, 3, 7):
        r = rows[i]
        ids = tok.encode(texts[i])
        assert r["error"] is None and r["topic"] == f"t{i}"
        assert r["prompt_tokens"] == len(ids) and r["scored_tokens"] == len(ids) - 1 == len(r["token_logprobs"])
        assert close(r["nll"], hf_sliding(model, ids, 1023, 512)[0]) and close(r["perplexity"], math.exp(r["nll"]))
    assert rows[7]["prompt_tokens"] > 1024  # scored by sliding window, not an error row
    ok = [rows[i] for i in (0, 1, 2, 3, 7)]
    scored = sum(r["scored_tokens"] for r in ok)
    corpus = math.exp(sum(r["nll"] * r["scored_tokens"] for r in ok) / scored)
    assert summary.scored_tokens == scored and summary.error_rows == 3
    assert close(summary.perplexity, corpus)
    saved = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert saved["scored_tokens"] == scored and close(saved["perplexity"], corpus)
    assert pc.sum(table["scored_tokens"]).as_py() == scored
