"""The bulk job's flags, declared once: ``run``, ``score``, ``embed`` and ``submit`` take them from here.

Each flag names where its value goes in a ``JobConfig`` (``("sampling", "top_p")``) and its Typer
option. ``job_command`` adds the flags to a command's signature and hands the command the values
given as one dict; ``job_overrides`` nests them for ``pipeline.config.build`` and ``run_args``
spells them again as ``run`` arguments (what ``submit`` runs on the cluster). A flag added here
reaches every command that takes the job's flags, so their option lists cannot drift apart.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import typer

from pipeline.cli.common import (
    Address, BatchSize, Choice, DedupeOpt, DtypeOpt, GpusPerReplica, Grammar, IgnoreEos, Input, InputFormatOpt,
    JsonSchema, KVCacheDtypeOpt, Logprobs, MaxModelLen, MaxRowsPerFile, MaxTokens, MinP, MinTokens, Model, N, NoRepeatNgram, NumBeams,
    NumCpus, Offline, Output, OutputFormatOpt, Overwrite, Passthrough, QuantizationOpt, Regex, Replicas, RepetitionPenalty,
    ScoreFirstToken, Seed, Stop, Stride, TargetFileMb, Temperature, TensorParallel, TokenLogprobs, TopK, TopP, ViaServe,
    _decoding_flags,
)
from pipeline.config import Executor, Task


@dataclass(frozen=True)
class JobFlag:
    path: tuple[str, ...]  # where the value goes in a JobConfig
    option: Any            # Annotated[Optional[T], typer.Option(...)]
    switch: bool = False   # a bare --flag (only True is passed on), not --flag/--no-flag


DECODING = ("sampling", "<decoding>")  # the path of the shortcuts that _decoding_flags combines


def _opt(help: str, *decls: str) -> Any:
    return typer.Option(*decls, help=help)


JOB_FLAGS: dict[str, JobFlag] = {
    "input": JobFlag(("input",), Input),
    "output": JobFlag(("output",), Output),
    "input_format": JobFlag(("input_format",), InputFormatOpt),
    "output_format": JobFlag(("output_format",), OutputFormatOpt),
    "dedupe": JobFlag(("dedupe",), DedupeOpt),
    "results": JobFlag(("results",), Annotated[Optional[str], _opt(
        "openai-batch output: also write the results JSONL here (like run-batch -o).")]),
    "model": JobFlag(("engine", "model"), Model),
    "task": JobFlag(("task",), Annotated[Optional[Task], _opt(
        "generate (text), embed (a vector per text) or score (perplexity per text).")]),
    "prompt_column": JobFlag(("prompt_column",), Annotated[Optional[str], _opt("Column holding the prompts (texts).")]),
    "id_column": JobFlag(("id_column",), Annotated[Optional[str], _opt("Column holding input ids (else '<file>#<row>').")]),
    "passthrough": JobFlag(("passthrough",), Passthrough),
    "batch_size": JobFlag(("batch_size",), BatchSize),
    "target_file_mb": JobFlag(("target_file_mb",), TargetFileMb),
    "max_rows_per_file": JobFlag(("max_rows_per_file",), MaxRowsPerFile),
    "max_tokens": JobFlag(("sampling", "max_tokens"), MaxTokens),
    "min_tokens": JobFlag(("sampling", "min_tokens"), MinTokens),
    "temperature": JobFlag(("sampling", "temperature"), Temperature),
    "top_p": JobFlag(("sampling", "top_p"), TopP),
    "top_k": JobFlag(("sampling", "top_k"), TopK),
    "seed": JobFlag(("sampling", "seed"), Seed),
    "stop": JobFlag(("sampling", "stop"), Stop),
    "n": JobFlag(("sampling", "n"), N),
    "repetition_penalty": JobFlag(("sampling", "repetition_penalty"), RepetitionPenalty),
    "ignore_eos": JobFlag(("sampling", "ignore_eos"), IgnoreEos),
    "logprobs": JobFlag(("sampling", "logprobs"), Logprobs),
    "min_p": JobFlag(("sampling", "min_p"), MinP),
    "no_repeat_ngram_size": JobFlag(("sampling", "no_repeat_ngram_size"), NoRepeatNgram),
    # decoding shortcuts: _decoding_flags turns them into SamplingConfig keys (structured_outputs, beams)
    "num_beams": JobFlag(DECODING, NumBeams),
    "choice": JobFlag(DECODING, Choice),
    "regex": JobFlag(DECODING, Regex),
    "json_schema": JobFlag(DECODING, JsonSchema),
    "grammar": JobFlag(DECODING, Grammar),
    "stride": JobFlag(("score", "stride"), Stride),
    "score_first_token": JobFlag(("score", "score_first_token"), ScoreFirstToken),
    "token_logprobs": JobFlag(("score", "token_logprobs"), TokenLogprobs),
    "normalize": JobFlag(("normalize",), Annotated[Optional[bool], _opt(
        "embed: L2-normalize vectors.", "--normalize/--no-normalize")]),
    "truncate": JobFlag(("engine", "truncate"), Annotated[Optional[bool], _opt(
        "Left-truncate prompts over the context instead of error rows.", "--truncate/--no-truncate")]),
    "overwrite": JobFlag(("overwrite",), Overwrite, switch=True),
    "resume": JobFlag(("resume",), Annotated[Optional[bool], _opt(
        "Continue a stopped job: skip committed ids.", "--resume")], switch=True),
    "force": JobFlag(("force",), Annotated[Optional[bool], _opt(
        "With --resume: accept a changed config.", "--force")], switch=True),
    "max_error_rate": JobFlag(("max_error_rate",), Annotated[Optional[float], _opt(
        "Abort when the error share passes this (0-1).")]),
    "via_serve": JobFlag(("via_serve",), ViaServe),
    "executor": JobFlag(("executor",), Annotated[Optional[Executor], _opt(
        "inline: the driver runs one engine (or feeds --via-serve); ray-data: an actor pool across the cluster; "
        "auto: inline for one replica on an embedded Ray.")]),
    "replicas": JobFlag(("engine", "replicas"), Replicas),
    "gpus_per_replica": JobFlag(("engine", "gpus_per_replica"), GpusPerReplica),
    "tensor_parallel_size": JobFlag(("engine", "tensor_parallel_size"), TensorParallel),
    "dtype": JobFlag(("engine", "dtype"), DtypeOpt),
    "quantization": JobFlag(("engine", "quantization"), QuantizationOpt),
    "kv_cache_dtype": JobFlag(("engine", "kv_cache_dtype"), KVCacheDtypeOpt),
    "max_model_len": JobFlag(("engine", "max_model_len"), MaxModelLen),
    "eager": JobFlag(("engine", "enforce_eager"), Annotated[Optional[bool], _opt(
        "Run the model eagerly (--eager) or compiled (--no-eager). Default on a CPU: compiled when the job is "
        "big enough to pay for the compile, else eager; GPU: CUDA graphs.", "--eager/--no-eager")]),
    "offline": JobFlag(("engine", "offline"), Offline, switch=True),
    "address": JobFlag(("address",), Address),
    "num_cpus": JobFlag(("num_cpus",), NumCpus),
}
# The flags that only make sense for one task (the task commands leave the others out).
GENERATION_ONLY = ("output_format", "results", "task", "max_tokens", "min_tokens", "temperature", "top_p", "top_k",
                   "seed", "stop", "n", "repetition_penalty", "ignore_eos", "logprobs", "normalize", "truncate",
                   "executor", "tensor_parallel_size", "min_p", "no_repeat_ngram_size", "num_beams", "choice",
                   "regex", "json_schema", "grammar")
SCORE_ONLY = ("stride", "score_first_token", "token_logprobs")
SCORE_FLAGS = tuple(n for n in JOB_FLAGS if n not in GENERATION_ONLY)
EMBED_FLAGS = tuple(n for n in JOB_FLAGS if n not in GENERATION_ONLY + SCORE_ONLY) + ("normalize",)


def job_command(names: Iterable[str] = tuple(JOB_FLAGS)) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the job flags ``names``, listed where its ``flags`` parameter stands; it is
    called with its own arguments plus ``flags``: the job flags' values (None where not given)."""
    names = tuple(names)

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        params: list[inspect.Parameter] = []
        for name, param in inspect.signature(command, eval_str=True).parameters.items():
            if name != "flags":
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
                continue
            params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=JOB_FLAGS[n].option)
                       for n in names]

        @functools.wraps(command)
        def with_flags(**kwargs: Any) -> Any:
            return command(**{k: v for k, v in kwargs.items() if k not in names},
                           flags={n: kwargs.get(n) for n in names})

        del with_flags.__wrapped__  # Typer reads the signature below, not the command's
        with_flags.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        with_flags.__annotations__ = {p.name: p.annotation for p in params}
        return with_flags

    return wrap


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)  # enums as their values


def job_overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """The given flags (None or an empty list = not given) nested as JobConfig keys."""
    out: dict[str, Any] = {}
    decoding = {n: flags.get(n) for n, f in JOB_FLAGS.items() if f.path == DECODING}
    if any(v not in (None, []) for v in decoding.values()):
        out["sampling"] = _decoding_flags(None, None, **decoding)
    for name, value in flags.items():
        if value is None or value == [] or name in decoding:
            continue
        *parents, leaf = JOB_FLAGS[name].path
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = [_plain(v) for v in value] if isinstance(value, list) else _plain(value)
    return out


def run_args(flags: dict[str, Any]) -> list[str]:
    """The given flags as ``gpt2-pipeline run`` arguments (repeatable flags repeated)."""
    args: list[str] = []
    for name, value in flags.items():
        if value is None or value == []:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value or not JOB_FLAGS[name].switch:
                args.append(flag if value else "--no-" + name.replace("_", "-"))
            continue
        for item in value if isinstance(value, list) else [value]:
            args += [flag, str(_plain(item))]
    return args
