"""``SamplingConfig``: the one sampling model of jobs, ``generate`` and the HTTP API.

Field names and meanings are vLLM's (``vllm.SamplingParams`` and ``vllm serve``'s completion
request), plus HF's ``no_repeat_ngram_size``. ``to_sampling_kwargs`` gives the keyword arguments
for ``SamplingParams``; the engine package builds the vLLM objects (structured outputs, the
no-repeat-n-gram logits processor's argument, beam search).
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["SamplingConfig", "StructuredOutputs", "ROW_OVERRIDE_FIELDS", "NO_REPEAT_NGRAM_ARG", "BEAM_SEARCH_FIELDS"]

# The key of SamplingParams.extra_args read by the engine's no-repeat-n-gram logits processor.
NO_REPEAT_NGRAM_ARG = "no_repeat_ngram_size"
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=True)


class StructuredOutputs(_Strict):
    """vLLM's ``StructuredOutputsParams``: exactly one constraint, plus its options."""

    json_: Optional[Union[dict[str, Any], str]] = Field(None, alias="json", description="JSON schema (object or JSON text).")
    regex: Optional[str] = Field(None, description="Regular expression the whole output matches.")
    choice: Optional[list[str]] = Field(None, description="The output is exactly one of these strings.")
    grammar: Optional[str] = Field(None, description="EBNF (GBNF) or Lark grammar.")
    json_object: Optional[bool] = Field(None, description="Any JSON object.")
    structural_tag: Optional[str] = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Optional[str] = None

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_constraint(self) -> "StructuredOutputs":
        given = [k for k in _CONSTRAINTS if getattr(self, "json_" if k == "json" else k) is not None]
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, regex, choice, grammar, json_object, "
                             f"structural_tag (got {', '.join(given) or 'none'})")
        if self.choice is not None and not self.choice:
            raise ValueError(f"Choice '{self.choice}' cannot be an empty list")
        for name in ("grammar", "structural_tag"):
            if isinstance(getattr(self, name), str) and not getattr(self, name).strip():
                raise ValueError(f"structured_outputs.{name} cannot be an empty string")
        if isinstance(self.json_, str):
            if not self.json_.strip():
                raise ValueError("structured_outputs.json cannot be an empty string")
            try:
                json.loads(self.json_)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if self.json_object is False:
            raise ValueError("structured_outputs.json_object must be True if set; omit structured_outputs to disable")
        if self.regex is not None and "\x00" in self.regex:
            raise ValueError("structured_outputs.regex must not contain a NUL character ('\\x00')")
        return self

    def to_params_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.sampling_params.StructuredOutputsParams``."""
        out = self.model_dump(by_alias=True, exclude_none=True)
        if isinstance(out.get("json"), str):
            out["json"] = json.loads(out["json"])
        return out


class SamplingConfig(_Strict):
    """Every decoding control of HF's text-generation pipeline and ``vllm serve``, under vLLM's names.

    ``temperature=0`` is greedy decoding. Defaults follow OpenAI/vLLM (temperature 1, top_p 1).
    """

    max_tokens: int = Field(64, ge=1, le=1_000_000, description="Most tokens to generate per sample.")
    min_tokens: int = Field(0, ge=0, description="Fewest tokens before EOS or a stop string may end a sample.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens; 0 disables.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p times the top token's probability.")
    seed: Optional[int] = Field(None, ge=0, lt=2**63, description="Per-request seed: same seed, same samples.")
    stop: list[str] = Field(default_factory=list, max_length=16, description="Stop strings.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Token ids that end a sample.")
    include_stop_str_in_output: bool = Field(False, description="Keep the stop string in the text.")
    n: int = Field(1, ge=1, le=64, description="Samples per prompt (beams with use_beam_search); one output row each.")
    best_of: Optional[int] = Field(None, ge=1, le=64, description="Sample best_of, return the n with the highest log-probability.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="HF-style repetition penalty.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    no_repeat_ngram_size: int = Field(0, ge=0, le=1024, description="HF's: no n-gram of this size occurs twice (prompt included); 0 disables.")
    logit_bias: Optional[dict[int, float]] = Field(None, description="Token id -> bias added to its logit (clamped to [-100, 100]).")
    bad_words: list[str] = Field(default_factory=list, description="Words never generated.")
    allowed_token_ids: Optional[list[int]] = Field(None, description="Only these token ids are generated.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks: equal work).")
    logprobs: Optional[int] = Field(None, ge=0, le=20, description="Top-k log-probabilities per token.")
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the text.")
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1, description="Cut longer prompts to this many tokens (-1: the context less one) instead of an error.")
    truncation_side: Optional[Literal["left", "right"]] = Field(None, description="left (default: vLLM's tokenizer side) keeps the last tokens, right the first.")
    structured_outputs: Optional[StructuredOutputs] = Field(None, description="Constrain the output: choice, regex, json (schema), grammar.")
    use_beam_search: bool = Field(False, description="Beam search with n beams (vLLM's); returns the n best.")
    length_penalty: float = Field(1.0, description="Beam search: score = cumulative logprob / length ** length_penalty.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop_token_ids", "bad_words", mode="before")
    @classmethod
    def _none_as_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("logit_bias")
    @classmethod
    def _clamp_bias(cls, value: Optional[dict[int, float]]) -> Optional[dict[int, float]]:
        return None if value is None else {k: min(100.0, max(-100.0, v)) for k, v in value.items()}

    @field_validator("allowed_token_ids")
    @classmethod
    def _allowed_not_empty(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        if value is not None and not value:
            raise ValueError("allowed_token_ids is not allowed to be empty.")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "SamplingConfig":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}.")
        if self.use_beam_search:
            fields = type(self).model_fields
            ignored = [k for k, f in fields.items()
                       if k not in BEAM_SEARCH_FIELDS and getattr(self, k) != f.get_default(call_default_factory=True)]
            if ignored:
                raise ValueError(f"use_beam_search does not take {', '.join(ignored)} (beam search scores tokens "
                                 "by their log-probabilities alone)")
        return self

    @property
    def checked_by_engine(self) -> bool:
        """Whether some value can only be checked against the model (token ids against its
        vocabulary, a constraint compiled with its tokenizer) before a job's engine starts."""
        return bool(self.logit_bias or self.stop_token_ids or self.allowed_token_ids or self.structured_outputs
                    or self.use_beam_search)

    @property
    def beam_width(self) -> Optional[int]:
        """The beam width (n) when beam search is on, else None."""
        return self.n if self.use_beam_search else None

    def to_sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.SamplingParams`` (the engine adds structured outputs and
        the no-repeat-n-gram argument, which need vLLM types)."""
        kwargs = self.model_dump(exclude={
            "stop", "logprobs", "best_of", "no_repeat_ngram_size", "structured_outputs", "use_beam_search",
            "length_penalty", "truncate_prompt_tokens", "truncation_side", "bad_words", "stop_token_ids",
        })
        kwargs["stop"] = list(self.stop) or None
        kwargs["stop_token_ids"] = list(self.stop_token_ids) or None
        kwargs["bad_words"] = list(self.bad_words) or None
        kwargs["logprobs"] = self.logprobs
        if self.best_of is not None and self.best_of > self.n:  # rank best_of samples by their logprob
            kwargs["n"] = self.best_of
            kwargs["logprobs"] = self.logprobs or 0
        if self.no_repeat_ngram_size:
            kwargs["extra_args"] = {NO_REPEAT_NGRAM_ARG: self.no_repeat_ngram_size}
        return kwargs

    def with_overrides(self, overrides: dict[str, Any]) -> "SamplingConfig":
        """A copy with per-row or per-request values applied (validated like the originals).

        A ``choice`` (list of strings) or ``json_schema`` (object or JSON text) value replaces the
        structured-output constraint.
        """
        clean = {k: v for k, v in overrides.items() if v is not None}
        if not clean:
            return self
        if "choice" in clean:
            clean["structured_outputs"] = {"choice": _json_text(clean.pop("choice"))}
        if "json_schema" in clean:
            clean["structured_outputs"] = {"json": _no_nulls(clean.pop("json_schema"))}
        data = self.model_dump(by_alias=True, exclude_unset=True)
        return SamplingConfig.model_validate({**data, **clean})


def _json_text(value: Any) -> Any:
    """A CSV cell holding a JSON list (``["a", "b"]``) as the list."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _no_nulls(value: Any) -> Any:
    """A JSON schema read from a struct column: Arrow fills keys other rows have with nulls."""
    if isinstance(value, dict):
        return {k: _no_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_no_nulls(v) for v in value]
    return value


# What beam search reads (vLLM's BeamSearchParams); any other field set with it is refused.
BEAM_SEARCH_FIELDS = frozenset({
    "max_tokens", "n", "temperature", "ignore_eos", "length_penalty", "include_stop_str_in_output",
    "skip_special_tokens", "use_beam_search", "truncate_prompt_tokens", "truncation_side",
})

# Optional input columns that override the job's sampling for their row (``choice``: a list of
# strings, ``json_schema``: a JSON schema, each the row's own structured-output constraint).
ROW_OVERRIDE_FIELDS = (
    "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "no_repeat_ngram_size", "length_penalty", "stop",
    "stop_token_ids", "bad_words", "choice", "json_schema",
)
