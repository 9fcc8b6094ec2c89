"""What the engine returns and raises: plain dataclasses and errors, no vLLM types.

The batch job and the HTTP API see only these (``pipeline.engine`` re-exports them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

# Priorities for vLLM's priority scheduler: lower runs first.
PRIORITY_ONLINE = 0
PRIORITY_BATCH = 10


class PromptError(ValueError):
    """A prompt that cannot run (null, empty, wrong type, over the context). Becomes an error row."""

    def __init__(self, code: str, message: str, tokens: Optional[int] = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.tokens = tokens  # the prompt's length, when known


class EngineFatalError(RuntimeError):
    """The engine process died: the replica must be restarted (never kept as a row error)."""


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)
    # vLLM's entries of this position by token id: (logprob, rank, decoded token)
    ranked: dict[int, tuple[float, Optional[int], str]] = field(default_factory=dict)


@dataclass
class Sample:
    """One generated sample (or, when streaming, the delta since the previous one)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    logprobs: Optional[list[TokenLogprob]] = None
    stop_reason: Optional[Union[int, str]] = None  # the stop string or token id that ended it


@dataclass
class Completion:
    prompt_tokens: int
    samples: list[Sample]
    # with ``prompt_logprobs``: one entry per prompt token, the first None (nothing predicts it)
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


@dataclass
class Scored:
    """A text's log-likelihood: the log-probability of each scored token (natural log)."""

    prompt_tokens: int  # tokens of the text (without an added <|endoftext|>)
    token_logprobs: list[float]

    @property
    def scored_tokens(self) -> int:
        return len(self.token_logprobs)

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token (nats)."""
        return -math.fsum(self.token_logprobs) / len(self.token_logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.nll < 709 else math.inf


def score_windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """HF's "Perplexity of fixed-length models" windows as (begin, end, trg_len): windows of
    ``max_length`` tokens every ``stride``; only the last ``trg_len = end - prev_end`` tokens of each
    are scored, so every token after the first is scored exactly once, with the most context."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, {max_length}] (the window), got {stride}")
    out, prev_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + max_length, length)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == length:
            break
    return out
