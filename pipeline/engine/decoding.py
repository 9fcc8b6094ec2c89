"""Our ``SamplingConfig`` as vLLM's request objects, checked with vLLM's own validators, and
beam search through vLLM's beam-search loop.

- ``sampling_params``: ``vllm.SamplingParams`` (structured outputs as ``StructuredOutputsParams``;
  ``no_repeat_ngram_size`` as the argument of the engine's n-gram logits processor).
- ``check_sampling``: what vLLM's input processor checks (token ids against the vocabulary, a
  schema / regex / grammar compiled by the structured-output backend vLLM would pick), without an
  engine: jobs refuse a bad value before any engine starts, the API answers 400.
- ``beam_search``: vLLM's ``BeamSearchOnlineMixin.beam_search`` (the loop ``vllm serve`` runs: a
  one-token request with 2 x width logprobs per beam per step) over either engine driver.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from pipeline.sampling import SamplingConfig


def sampling_params(sampling: SamplingConfig, **extra: Any) -> Any:
    """``vllm.SamplingParams`` for ``sampling`` (``extra``: output_kind, prompt_logprobs, ...)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    kwargs = sampling.to_sampling_kwargs()
    if sampling.structured_outputs is not None:
        kwargs["structured_outputs"] = StructuredOutputsParams(**sampling.structured_outputs.to_params_kwargs())
    return SamplingParams(**kwargs, **extra)


def check_sampling(sampling: SamplingConfig, tokenizer: Any, vocab_size: int) -> None:
    """Raise ``ValueError`` (vLLM's message) for a value vLLM's engine would refuse: token ids
    outside the vocabulary, or a structured-output constraint no backend compiles."""
    from vllm.config import StructuredOutputsConfig
    from vllm.exceptions import VLLMClientError

    from vllm.sampling_params import BeamSearchParams

    try:
        if sampling.use_beam_search:  # beam search builds its own one-token requests
            BeamSearchParams(beam_width=sampling.n, max_tokens=sampling.max_tokens)
            return
        params = sampling_params(sampling)
        model = SimpleNamespace(get_vocab_size=lambda: vocab_size, is_diffusion=False)
        params._validate_logit_bias(model)
        params._validate_stop_token_ids(model)
        params._validate_allowed_token_ids(model)
        if params.structured_outputs is not None:
            params._validate_structured_outputs(model, StructuredOutputsConfig(), tokenizer)
    except VLLMClientError as exc:
        raise ValueError(str(exc)) from None


@lru_cache(maxsize=4)
def _folder_tokenizer(folder: str) -> Any:
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(folder)


def check_job_sampling(sampling: SamplingConfig, folder: Path) -> None:
    """``check_sampling`` for a job's model folder (tokenizer only, no engine)."""
    import json

    config = json.loads((folder / "config.json").read_text())
    check_sampling(sampling, _folder_tokenizer(str(folder)), int(config["vocab_size"]))


class _Client:
    """The part of vLLM's ``EngineClient`` its beam-search loop calls, over ``AsyncLLM`` or
    ``InprocLLM``, with the request's scheduling priority."""

    def __init__(self, llm: Any, priority: int):
        self._llm, self._priority = llm, priority
        self.input_processor = llm.input_processor

    def generate(self, prompt: Any, params: Any, request_id: str, **_: Any) -> AsyncIterator[Any]:
        return self._llm.generate(prompt, params, request_id, priority=self._priority)


def _beam_runner(llm: Any, tokenizer: Any, priority: int) -> Any:
    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin

    class Runner(BeamSearchOnlineMixin):
        def __init__(self) -> None:
            self.engine_client = _Client(llm, priority)
            self.renderer = SimpleNamespace(get_tokenizer=lambda: tokenizer)

    return Runner()


async def beam_search(llm: Any, tokenizer: Any, prompt_ids: list[int], sampling: SamplingConfig,
                      request_id: str, priority: int) -> Any:
    """vLLM's beam search of width ``sampling.n``: one ``RequestOutput``, the n best beams."""
    from vllm.inputs import tokens_input
    from vllm.sampling_params import BeamSearchParams

    params = BeamSearchParams(
        beam_width=sampling.n, max_tokens=sampling.max_tokens, ignore_eos=sampling.ignore_eos,
        temperature=sampling.temperature, length_penalty=sampling.length_penalty,
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        skip_special_tokens=sampling.skip_special_tokens,
    )
    final: Optional[Any] = None
    async for out in _beam_runner(llm, tokenizer, priority).beam_search(tokens_input(prompt_ids), request_id, params):
        final = out
    return final


def best_of(outputs: list[Any], n: int) -> list[Any]:
    """The ``n`` samples with the highest cumulative log-probability, re-indexed 0..n-1."""
    ranked = sorted(outputs, key=lambda o: o.cumulative_logprob or float("-inf"), reverse=True)[:n]
    for i, o in enumerate(ranked):
        o.index = i
    return ranked
