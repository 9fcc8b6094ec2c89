"""OpenAI-compatible request and response types, fields in OpenAI's order.

Completions take OpenAI's fields, then ``vllm serve``'s under vLLM's names (and HF's
``no_repeat_ngram_size``); vLLM fields that mean nothing for GPT-2 here get a 400 saying why
(``NOT_APPLICABLE``). Embeddings' ``normalize`` is an extra.
Conversion to the engine's ``SamplingConfig`` lives on the request (``to_sampling``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config import SamplingConfig, StructuredOutputs

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


class JsonSchemaFormat(OpenAIModel):
    name: str
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(OpenAIModel):
    """OpenAI's ``response_format`` (vLLM: text, json_object, json_schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


# vLLM request fields that have no meaning for a GPT-2 completion model here: a 400 saying why.
NOT_APPLICABLE = {
    "prompt_embeds": "prompt embeddings are not accepted; send text or token ids",
    "kv_transfer_params": "there is no disaggregated prefill (KV transfer) here",
    "ec_transfer_params": "there is no encoder-cache transfer here (GPT-2 has no encoder)",
    "mm_payload": "GPT-2 takes no multimodal input",
    "return_mm_kwargs": "GPT-2 takes no multimodal input",
    "routed_experts_prompt_start": "GPT-2 has no experts (not a mixture-of-experts model)",
    "thinking_token_budget": "GPT-2 is not a reasoning model",
    "watermarking": "no watermark is configured",
    "repetition_detection": "not supported; use no_repeat_ngram_size or repetition_penalty",
    "logprob_token_ids": "not supported; use logprobs",
    "return_tokens_as_token_ids": "not supported; use return_token_ids",
    "return_token_offsets": "only for vLLM's render endpoints",
    "vllm_xargs": "no custom extension reads it here",
    "cache_salt": "not supported (prefix-cache salting)",
    "session_id": "not supported (no session routing)",
    "stream_interval": "set per server (engine.stream_interval)",
    "request_id": "not supported; each completion gets its own id",
    "add_special_tokens": "GPT-2's tokenizer adds no special tokens",
}


class CompletionRequest(OpenAIModel):
    """POST /v1/completions: OpenAI's fields, then vLLM's (``vllm serve``) under its names."""

    model: Optional[str] = None
    prompt: Prompt
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N, description="Sample best_of, return the n most likely (not with stream).")
    echo: bool = Field(False, description="Prepend the prompt; with logprobs also the prompt tokens' logprobs (the first is null).")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[int, float]] = Field(None, description="Token id -> bias (clamped to [-100, 100]).")
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
    # --- vLLM's sampling fields (``vllm serve``), meanings as in SamplingConfig ---
    use_beam_search: bool = False
    top_k: int = Field(0, ge=-1, description="Sample among the k most likely tokens; 0 or -1 disables.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="HF-style repetition penalty (1 = off).")
    length_penalty: float = 1.0
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = Field(False, description="Keep generating past EOS.")
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS, description="Fewest tokens before EOS or stop may end a sample.")
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)
    truncation_side: Optional[Literal["left", "right"]] = None
    allowed_token_ids: Optional[list[int]] = None
    prompt_logprobs: Optional[int] = None
    bad_words: list[str] = Field(default_factory=list)
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    priority: int = Field(0, ge=-(2**63), lt=2**63, description="Lower runs earlier (vLLM's priority scheduling).")
    return_token_ids: Optional[bool] = None
    # --- HF's ---
    no_repeat_ngram_size: int = Field(0, ge=0, le=1024)

    @model_validator(mode="before")
    @classmethod
    def _not_applicable(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, why in NOT_APPLICABLE.items():
                if data.get(name) is not None:
                    raise ValueError(f"{name}: {why}")
            if data.get("stream") and data.get("use_beam_search"):
                raise ValueError("Streaming is not currently supported with beam search")
            prompt_logprobs = data.get("prompt_logprobs")
            if isinstance(prompt_logprobs, int) and not isinstance(prompt_logprobs, bool):
                if data.get("stream") and (prompt_logprobs > 0 or prompt_logprobs == -1):
                    raise ValueError("`prompt_logprobs` are not available when `stream=True`.")
                if prompt_logprobs < -1:
                    raise ValueError("`prompt_logprobs` must be a positive value or -1.")
            if data.get("use_beam_search") and data.get("echo") and data.get("logprobs") is not None:
                raise ValueError("`echo` with `logprobs` is not supported with beam search because beam search "
                                 "does not compute prompt logprobs.")
            if data.get("stream_options") and not data.get("stream"):
                raise ValueError("Stream options can only be defined when `stream=True`.")
        return data

    def prompts(self) -> list[Union[str, list[int]]]:
        return as_prompt_list(self.prompt)

    def constraint(self) -> Optional[StructuredOutputs]:
        """``structured_outputs`` with ``response_format`` applied (vLLM's rule: the format's
        constraint replaces the constraint, options stay)."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return self.structured_outputs
        if fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
            raise ValueError("When response_format type is 'json_schema', the 'json_schema' field must be provided.")
        base = self.structured_outputs.model_dump(exclude_none=True, by_alias=True) if self.structured_outputs else {}
        base = {k: v for k, v in base.items() if k not in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")}
        constraint = {"json_object": True} if fmt.type == "json_object" else {"json": fmt.json_schema.schema_}
        return StructuredOutputs.model_validate({**base, **constraint})

    def to_sampling(self) -> SamplingConfig:
        """Request values win; fields the request leaves out keep SamplingConfig's defaults.

        Raises ``pydantic.ValidationError`` (a 400) for values SamplingConfig refuses.
        """
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo: true (it returns the prompt and, with logprobs, scores it)")
        return SamplingConfig(
            # vLLM runs at least one step; with max_tokens 0 (echo) api.complete drops it
            max_tokens=max(self.max_tokens, 1), min_tokens=self.min_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=max(self.top_k, 0), min_p=self.min_p, seed=self.seed, stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [], include_stop_str_in_output=self.include_stop_str_in_output,
            n=self.n, best_of=self.best_of, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size, logit_bias=self.logit_bias, bad_words=self.bad_words,
            allowed_token_ids=self.allowed_token_ids, ignore_eos=self.ignore_eos, logprobs=self.logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            truncate_prompt_tokens=self.truncate_prompt_tokens, truncation_side=self.truncation_side,
            structured_outputs=self.constraint(), use_beam_search=self.use_beam_search,
            length_penalty=self.length_penalty,
        )


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob`` of one prompt position's token."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


class CompletionChoice(BaseModel):
    finish_reason: Optional[str] = None
    index: int
    logprobs: Optional[CompletionLogprobs] = None
    text: str
    # vLLM's additions: the stop string or token id that ended the sample, and (return_token_ids,
    # prompt_logprobs) the token ids and each prompt token's top log-probabilities
    stop_reason: Optional[Union[int, str]] = None
    token_ids: Optional[list[int]] = None
    prompt_logprobs: Optional[list[Optional[dict[int, PromptLogprob]]]] = None
    prompt_token_ids: Optional[list[int]] = None


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
