"""The row contract on the in-process engine: the generation logprobs column."""

import pyarrow as pa

from pipeline.config import SamplingConfig
from pipeline.records import ID, LOGPROBS_FIELD, RowSpec, process_batch


def test_generation_rows_carry_logprobs_with_top_n(engine, loop):
    spec = RowSpec(task="generate", prompt_column="prompt",
                   sampling=SamplingConfig(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3))
    batch = pa.table({ID: ["a", "b"], "prompt": ["The history of the city", None]})
    out = loop.run(process_batch(engine, batch, spec, 0))
    assert out.schema.field("logprobs") == LOGPROBS_FIELD
    ok, bad = out.to_pylist()
    assert bad["error"].startswith("null_prompt") and bad["logprobs"] is None
    assert len(ok["logprobs"]) == ok["completion_tokens"] == 5
    assert "".join(t["token"] for t in ok["logprobs"]) == ok["generated_text"]
    for t in ok["logprobs"]:
        tops = [x["logprob"] for x in t["top"]]
        assert 1 <= len(tops) <= 3 and tops == sorted(tops, reverse=True)
        assert t["logprob"] == tops[0]  # greedy: the chosen token is the most likely one
    plain = loop.run(process_batch(engine, batch, RowSpec(task="generate", prompt_column="prompt",
                                                          sampling=SamplingConfig(max_tokens=5)), 0))
    assert "logprobs" not in plain.column_names
