"""OpenAI-compatible request and response types, fields in OpenAI's order.

Extras beyond OpenAI (the GPT-2 pipeline's ``top_k``, ``min_tokens``, ``repetition_penalty``,
``ignore_eos``; embeddings' ``normalize``) are documented with ``Field(description=...)``.
Conversion to the engine's ``SamplingConfig`` lives on the request (``to_sampling``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import SamplingConfig

# Hard bounds a client can't exceed whatever the config says (cheap requests only).
MAX_N = 16
MAX_TOKENS = 4096

Prompt = Union[str, list[str], list[int], list[list[int]]]


def as_prompt_list(p: Prompt) -> list[Union[str, list[int]]]:
    """OpenAI's prompt forms as a list of texts or token-id lists."""
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(t, int) for t in p):
        return [p]  # type: ignore[list-item]
    return list(p)  # type: ignore[arg-type]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class CompletionRequest(OpenAIModel):
    """POST /v1/completions."""

    model: Optional[str] = None
    prompt: Prompt
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N, description="Only best_of == n is supported.")
    echo: bool = Field(False, description="Prepend the prompt; with logprobs also the prompt tokens' logprobs (the first is null).")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = Field(None, description="Not supported; must be empty.")
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    max_tokens: int = Field(16, ge=0, le=MAX_TOKENS, description="0 (with echo) scores the prompt without generating.")
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    suffix: Optional[str] = Field(None, description="Not supported by GPT-2; must be empty.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: Optional[str] = None
    # --- extras: the GPT-2 text-generation pipeline's options ---
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 disables.")
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS, description="Fewest tokens before EOS or stop may end a sample.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="HF-style repetition penalty (1 = off).")
    ignore_eos: bool = Field(False, description="Keep generating past EOS.")

    def prompts(self) -> list[Union[str, list[int]]]:
        return as_prompt_list(self.prompt)

    def to_sampling(self) -> SamplingConfig:
        """Request values win; fields the request leaves out keep SamplingConfig's defaults.

        Raises ``pydantic.ValidationError`` (a 400) for values SamplingConfig refuses.
        """
        if self.best_of not in (None, self.n):
            raise ValueError("best_of must equal n (or be omitted)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo: true (it returns the prompt and, with logprobs, scores it)")
        return SamplingConfig(
            # vLLM runs at least one step; with max_tokens 0 (echo) api.complete drops it
            max_tokens=max(self.max_tokens, 1), min_tokens=self.min_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=self.stop or [], n=self.n,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, ignore_eos=self.ignore_eos, logprobs=self.logprobs,
        )


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    finish_reason: Optional[str] = None
    index: int
    logprobs: Optional[CompletionLogprobs] = None
    text: str


class Usage(BaseModel):
    completion_tokens: int = 0
    prompt_tokens: int = 0
    total_tokens: int = 0


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=_completion_id)
    choices: list[CompletionChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["text_completion"] = "text_completion"
    usage: Optional[Usage] = None


class EmbeddingRequest(OpenAIModel):
    """POST /v1/embeddings."""

    input: Prompt
    model: Optional[str] = None
    dimensions: Optional[int] = Field(None, description="Not supported; must equal the model's width if given.")
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None
    normalize: bool = Field(True, description="L2-normalize each vector (default true).")

    def inputs(self) -> list[Union[str, list[int]]]:
        return as_prompt_list(self.input)


class Embedding(BaseModel):
    embedding: Union[list[float], str]
    index: int
    object: Literal["embedding"] = "embedding"


class EmbeddingResponse(BaseModel):
    data: list[Embedding]
    model: str
    object: Literal["list"] = "list"
    usage: Usage


class ModelCard(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    object: Literal["model"] = "model"
    owned_by: str = "gpt2-pipeline"
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Any] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
