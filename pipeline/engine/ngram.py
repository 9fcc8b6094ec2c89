"""HF's ``no_repeat_ngram_size`` as a vLLM V1 logits processor.

Registered in the engine arguments (``logits_processors``); a request turns it on with
``SamplingParams.extra_args["no_repeat_ngram_size"]``. Same rule as transformers'
``NoRepeatNGramLogitsProcessor``: over the prompt and the tokens generated so far, every token
that would complete an n-gram already present gets -inf. Each request's n-gram table grows with
its tokens (no rescan per step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from pipeline.sampling import NO_REPEAT_NGRAM_ARG

FQCN = f"{__name__}:NoRepeatNGramLogitsProcessor"


@dataclass
class _Request:
    size: int
    prompt: list[int]
    output: list[int]  # vLLM's live list of the request's generated tokens
    seen: dict[tuple[int, ...], set[int]] = field(default_factory=dict)
    counted: int = 0  # sequence positions whose n-gram (ending there) is in ``seen``

    def banned(self) -> set[int]:
        seq_len = len(self.prompt) + len(self.output)
        n = self.size
        if seq_len + 1 < n:
            return set()
        seq = self.prompt + self.output if self.counted < seq_len else None
        if seq is not None:
            for end in range(max(self.counted, n - 1), seq_len):
                gram = tuple(seq[end - n + 1:end + 1])
                self.seen.setdefault(gram[:-1], set()).add(gram[-1])
            self.counted = seq_len
        tail = tuple((self.prompt + self.output)[seq_len - n + 1:]) if n > 1 else ()
        return self.seen.get(tail, set())


def _size(params: SamplingParams) -> Optional[int]:
    value = (params.extra_args or {}).get(NO_REPEAT_NGRAM_ARG)
    return value or None


class NoRepeatNGramLogitsProcessor(LogitsProcessor):
    """Bans tokens that would repeat an n-gram (per-request size in ``extra_args``)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        value = (sampling_params.extra_args or {}).get(NO_REPEAT_NGRAM_ARG)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{NO_REPEAT_NGRAM_ARG} must be a non-negative integer, got {value!r}")

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.requests: dict[int, _Request] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # a ban can remove the greedy token

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        def new_state(params: SamplingParams, prompt: Optional[list[int]], output: list[int]) -> Optional[_Request]:
            size = _size(params)
            return None if size is None else _Request(size, list(prompt or []), output)

        process_dict_updates(self.requests, batch_update, new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, request in self.requests.items():
            banned = request.banned()
            if banned:
                logits[row, list(banned)] = float("-inf")
        return logits
