"""Prompts to token ids, checked against the model's context: one prompt (the HTTP API, a score
row) or a block's prompts at once (a job's slice: one call into the tokenizer for its texts).

Both give the same ids and the same ``PromptError`` for the same prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

from pipeline.config import SamplingConfig
from pipeline.outputs import PromptError


class PromptEncoder:
    """Tokenizes and fits prompts to a context of ``context_length`` tokens.

    ``truncate``: the default for prompts over the context (the engine config's ``truncate``).
    """

    def __init__(self, tokenizer: Any, context_length: int, vocab_size: int, truncate: bool = False):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.truncate = truncate

    def encode(self, prompt: Any, max_tokens: int = 1, truncate: Optional[bool] = None,
               check_length: bool = True, sampling: Optional[SamplingConfig] = None) -> list[int]:
        """Token ids for a text (or a list of token ids), checked against the context.

        A prompt needs room for at least one new token; with ``truncate`` it is left-truncated
        to leave room for ``max_tokens`` instead of failing. ``check_length=False`` (scoring,
        which slides a window over long texts) skips the context check. ``sampling``'s
        ``truncate_prompt_tokens`` / ``truncation_side`` cut the prompt first, as vLLM does.
        """
        return self._fit(self._ids(prompt), max_tokens, truncate, check_length, sampling)

    def encode_many(self, prompts: Sequence[Any], max_tokens: int = 1, truncate: Optional[bool] = None,
                    sampling: Optional[SamplingConfig] = None) -> list[Union[list[int], PromptError]]:
        """``encode`` for each prompt, a ``PromptError`` in place of the ids of one that fails;
        the texts go to the tokenizer in one call."""
        texts = [i for i, p in enumerate(prompts) if isinstance(p, str) and p and _valid_unicode(p)]
        out: list[Any] = [None] * len(prompts)
        if texts:
            for i, ids in zip(texts, self.tokenizer([prompts[i] for i in texts])["input_ids"]):
                out[i] = ids
        for i, prompt in enumerate(prompts):
            try:
                out[i] = self._fit(self._ids(prompt) if out[i] is None else out[i], max_tokens, truncate, True, sampling)
            except PromptError as exc:
                out[i] = exc
        return out

    def _ids(self, prompt: Any) -> list[int]:
        if prompt is None:
            raise PromptError("null_prompt", "prompt is null")
        if isinstance(prompt, str):
            if not prompt:
                raise PromptError("empty_prompt", "prompt is empty")
            if not _valid_unicode(prompt):
                raise PromptError("invalid_prompt", "prompt is not valid Unicode (lone surrogate)")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not prompt:
                raise PromptError("empty_prompt", "prompt has no tokens")
            if any(t < 0 or t >= self.vocab_size for t in prompt):
                raise PromptError("invalid_prompt", f"token ids must be in [0, {self.vocab_size})")
            return list(prompt)
        raise PromptError("invalid_prompt", f"prompt must be a string, got {type(prompt).__name__}")

    def _fit(self, ids: list[int], max_tokens: int, truncate: Optional[bool], check_length: bool,
             sampling: Optional[SamplingConfig]) -> list[int]:
        if sampling is not None and sampling.truncate_prompt_tokens is not None:
            ids = self._truncate_prompt(ids, sampling.truncate_prompt_tokens, sampling.truncation_side)
        limit = self.context_length - 1
        if check_length and len(ids) > limit:
            if not (self.truncate if truncate is None else truncate):
                raise PromptError(
                    "prompt_too_long",
                    f"prompt has {len(ids)} tokens; the context is {self.context_length} "
                    "(use truncate to keep the last tokens)",
                    tokens=len(ids),
                )
            keep = max(1, min(limit, self.context_length - max_tokens))
            ids = ids[-keep:]
        return ids

    def _truncate_prompt(self, ids: list[int], keep: int, side: Optional[str]) -> list[int]:
        """vLLM's ``truncate_prompt_tokens``: at most ``keep`` tokens (-1: the context less one),
        from the end with side ``left`` (vLLM's tokenizer default), from the start with ``right``."""
        if keep > self.context_length:
            raise PromptError("invalid_truncation", f"truncate_prompt_tokens={keep} cannot be greater than "
                              f"max_model_len = {self.context_length}. Please request a smaller truncation size.")
        keep = self.context_length - 1 if keep < 0 else keep
        if keep >= len(ids):
            return ids
        if keep == 0:
            raise PromptError("empty_prompt", "truncate_prompt_tokens=0 leaves no prompt tokens")
        side = side or getattr(self.tokenizer, "truncation_side", "left")
        return ids[-keep:] if side == "left" else ids[:keep]


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from JSON, say): the tokenizer would fail on it
        return False
    return True
