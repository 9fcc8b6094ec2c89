"""Offline commands: ``run`` (the bulk job), ``generate`` (a quick completion), ``models``, ``prompts``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import (
    BatchSize, Choice, Grammar, Input, JsonSchema, MinP, NoRepeatNgram, NumBeams, NumCpus, Output, Overwrite,
    Passthrough, Regex, ViaServe, Address, DedupeOpt, DtypeOpt, GpusPerReplica, IgnoreEos, InputFormatOpt, Logprobs, MaxModelLen, MaxTokens,
    MinTokens, Model, N, Offline, OutputFormatOpt, Replicas, RepetitionPenalty, ScoreFirstToken, Seed, Spec, Stop,
    Stride, Temperature, TensorParallel, TokenLogprobs, TopK, TopP, Verbose, _engine_flags, _fail, _load,
    _decoding_flags, _sampling_flags, _score_flags, out, quiet_vllm, run_job_cli,
)
from pipeline.config import ConfigError, Executor, JobConfig, Task

app = typer.Typer()

# ---- run -------------------------------------------------------------------------------------------
@app.command()
def run(
    spec: Spec = None,
    input: Input = None,
    output: Output = None,
    input_format: InputFormatOpt = None, output_format: OutputFormatOpt = None, dedupe: DedupeOpt = None,
    results: Annotated[Optional[str], typer.Option(help="openai-batch output: also write the results JSONL here (like run-batch -o).")] = None,
    model: Model = None,
    task: Annotated[Optional[Task], typer.Option(help="generate (text), embed (a vector per text) or score (perplexity per text).")] = None,
    prompt_column: Annotated[Optional[str], typer.Option(help="Column holding the prompts.")] = None,
    id_column: Annotated[Optional[str], typer.Option(help="Column holding input ids (else '<file>#<row>').")] = None,
    passthrough: Passthrough = None,
    batch_size: BatchSize = None,
    max_tokens: MaxTokens = None, min_tokens: MinTokens = None, temperature: Temperature = None,
    top_p: TopP = None, top_k: TopK = None, seed: Seed = None, stop: Stop = None, n: N = None,
    repetition_penalty: RepetitionPenalty = None, ignore_eos: IgnoreEos = None, logprobs: Logprobs = None,
    min_p: MinP = None, no_repeat_ngram_size: NoRepeatNgram = None, num_beams: NumBeams = None,
    choice: Choice = None, regex: Regex = None, json_schema: JsonSchema = None, grammar: Grammar = None,
    stride: Stride = None, score_first_token: ScoreFirstToken = None, token_logprobs: TokenLogprobs = None,
    truncate: Annotated[Optional[bool], typer.Option("--truncate/--no-truncate", help="Left-truncate prompts over the context instead of error rows.")] = None,
    overwrite: Overwrite = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue a stopped job: skip committed ids.")] = None,
    force: Annotated[Optional[bool], typer.Option("--force", help="With --resume: accept a changed config.")] = None,
    max_error_rate: Annotated[Optional[float], typer.Option(help="Abort when the error share passes this (0-1).")] = None,
    via_serve: ViaServe = None,
    executor: Annotated[Optional[Executor], typer.Option(help="inline: the driver runs one engine (or feeds --via-serve); ray-data: an actor pool across the cluster; auto: inline for one replica on an embedded Ray.")] = None,
    replicas: Replicas = None, gpus_per_replica: GpusPerReplica = None, tensor_parallel_size: TensorParallel = None,
    dtype: DtypeOpt = None, max_model_len: MaxModelLen = None, offline: Offline = None, address: Address = None,
    num_cpus: NumCpus = None,
    verbose: Verbose = False,
) -> None:
    """Bulk generation (or embeddings): Parquet prompts in, Parquet shards out, exactly once per id."""
    overrides = {
        "input": input, "output": output, "task": task.value if task else None, "prompt_column": prompt_column,
        "input_format": input_format.value if input_format else None, "dedupe": dedupe.value if dedupe else None,
        "output_format": output_format.value if output_format else None, "results": results,
        "id_column": id_column, "passthrough": passthrough or None, "batch_size": batch_size,
        "overwrite": overwrite, "resume": resume, "force": force, "max_error_rate": max_error_rate,
        "via_serve": via_serve, "address": address, "num_cpus": num_cpus, "executor": executor.value if executor else None,
        "engine": {**_engine_flags(model, replicas, gpus_per_replica, tensor_parallel_size, dtype, max_model_len, truncate),
                   "offline": offline},
        "sampling": _sampling_flags(
            max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, stop=stop, n=n, repetition_penalty=repetition_penalty, ignore_eos=ignore_eos,
            logprobs=logprobs,
        ) | _decoding_flags(min_p, no_repeat_ngram_size, num_beams, choice, regex, json_schema, grammar),
        "score": _score_flags(stride, score_first_token, token_logprobs),
    }
    run_job_cli(_load(JobConfig, spec, overrides), verbose)


@app.command()
def score(
    spec: Spec = None,
    input: Input = None,
    output: Output = None,
    input_format: InputFormatOpt = None, dedupe: DedupeOpt = None,
    model: Model = None,
    prompt_column: Annotated[Optional[str], typer.Option(help="Column holding the texts.")] = None,
    id_column: Annotated[Optional[str], typer.Option(help="Column holding input ids.")] = None,
    passthrough: Passthrough = None,
    batch_size: BatchSize = None,
    stride: Stride = None, score_first_token: ScoreFirstToken = None, token_logprobs: TokenLogprobs = None,
    overwrite: Overwrite = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue a stopped job.")] = None,
    via_serve: ViaServe = None,
    replicas: Replicas = None, gpus_per_replica: GpusPerReplica = None, dtype: DtypeOpt = None,
    max_model_len: MaxModelLen = None, offline: Offline = None, address: Address = None,
    num_cpus: NumCpus = None,
    verbose: Verbose = False,
) -> None:
    """Perplexity: each text's mean negative log-likelihood per token (nll) and exp(nll), long texts by sliding window."""
    overrides = {
        "input": input, "output": output, "task": Task.score.value, "prompt_column": prompt_column,
        "input_format": input_format.value if input_format else None, "dedupe": dedupe.value if dedupe else None,
        "id_column": id_column, "passthrough": passthrough or None, "batch_size": batch_size,
        "overwrite": overwrite, "resume": resume, "via_serve": via_serve, "address": address, "num_cpus": num_cpus,
        "engine": {**_engine_flags(model, replicas, gpus_per_replica, None, dtype, max_model_len), "offline": offline},
        "score": _score_flags(stride, score_first_token, token_logprobs),
    }
    run_job_cli(_load(JobConfig, spec, overrides), verbose)


@app.command()
def embed(
    spec: Spec = None,
    input: Input = None,
    output: Output = None,
    input_format: InputFormatOpt = None, dedupe: DedupeOpt = None,
    model: Model = None,
    prompt_column: Annotated[Optional[str], typer.Option(help="Column holding the texts.")] = None,
    id_column: Annotated[Optional[str], typer.Option(help="Column holding input ids.")] = None,
    passthrough: Passthrough = None,
    batch_size: BatchSize = None,
    normalize: Annotated[Optional[bool], typer.Option("--normalize/--no-normalize", help="L2-normalize vectors.")] = None,
    overwrite: Overwrite = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue a stopped job.")] = None,
    replicas: Replicas = None, gpus_per_replica: GpusPerReplica = None, dtype: DtypeOpt = None, offline: Offline = None,
    address: Address = None, verbose: Verbose = False,
) -> None:
    """Feature extraction: one vector per text (mean of GPT-2's final hidden states) as a float32 list column."""
    overrides = {
        "input": input, "output": output, "task": Task.embed.value, "prompt_column": prompt_column,
        "input_format": input_format.value if input_format else None, "dedupe": dedupe.value if dedupe else None,
        "id_column": id_column, "passthrough": passthrough or None, "batch_size": batch_size, "normalize": normalize,
        "overwrite": overwrite, "resume": resume, "address": address,
        "engine": {**_engine_flags(model, replicas, gpus_per_replica, None, dtype, None), "offline": offline},
    }
    run_job_cli(_load(JobConfig, spec, overrides), verbose)


# ---- generate / embed (quick look, no Ray) ----------------------------------------------------------
@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    model: Model = "demo",
    max_tokens: MaxTokens = 32, min_tokens: MinTokens = None, temperature: Temperature = None,
    top_p: TopP = None, top_k: TopK = None, seed: Seed = None, stop: Stop = None, n: N = None,
    repetition_penalty: RepetitionPenalty = None, ignore_eos: IgnoreEos = None,
    min_p: MinP = None, no_repeat_ngram_size: NoRepeatNgram = None, num_beams: NumBeams = None,
    choice: Choice = None, regex: Regex = None, json_schema: JsonSchema = None, grammar: Grammar = None,
    dtype: DtypeOpt = None, max_model_len: MaxModelLen = None, offline: Offline = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print samples as JSON.")] = False,
    verbose: Verbose = False,
) -> None:
    """Print a completion of PROMPT from the same engine the jobs use (in-process, no Ray)."""
    quiet_vllm(verbose)
    from pipeline.config import EngineConfig, SamplingConfig

    engine_cfg = _load(EngineConfig, None, {**_engine_flags(model, None, None, None, dtype, max_model_len), "offline": offline})
    sampling = _load(SamplingConfig, None, _sampling_flags(
        max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed, stop=stop, n=n, repetition_penalty=repetition_penalty, ignore_eos=ignore_eos,
    ) | _decoding_flags(min_p, no_repeat_ngram_size, num_beams, choice, regex, json_schema, grammar))
    from pipeline.engine import complete_once

    try:
        completion = complete_once(engine_cfg, prompt, sampling)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    if json_output:
        out.print_json(json.dumps([{"index": s.index, "text": s.text, "token_ids": s.token_ids,
                                    "finish_reason": s.finish_reason} for s in completion.samples]))
        return
    for s in completion.samples:
        out.print(f"[bold]{prompt}[/]{s.text}", highlight=False)


@app.command()
def models() -> None:
    """List the built-in models (built on first use into the cache folder)."""
    from rich.table import Table

    from pipeline.models import BUILTIN_MODELS, cache_dir

    table = Table("name", "description", "built")
    for m in BUILTIN_MODELS.values():
        table.add_row(m.name, m.description, "yes" if (cache_dir() / m.name / "builtin.json").is_file() else "on first use")
    out.print(table)
    out.print(f"cache: {cache_dir()}  (hub ids such as gpt2 are downloaded into the HF cache on first use, "
              "--offline uses only that cache; local folders work too)")


@app.command()
def prompts(
    path: Annotated[Path, typer.Argument(help="Parquet file to write.")],
    rows: Annotated[int, typer.Option(min=1, help="How many prompts.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a synthetic prompt set (ids, prompts with a realistic spread of lengths)."""
    from pipeline.prompts import write_prompt_set

    write_prompt_set(path, rows, seed)
    out.print(f"wrote {rows} prompts to {path}")
