"""Offline commands: ``run`` (the bulk job), ``generate`` (a quick completion), ``models``, ``prompts``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import (
    Choice, DtypeOpt, Grammar, IgnoreEos, JsonSchema, MaxModelLen, MaxTokens, MinP, MinTokens, Model, N, NoRepeatNgram,
    NumBeams, Offline, Regex, RepetitionPenalty, Seed, Spec, Stop, Temperature, TopK, TopP, Verbose, _decoding_flags,
    _engine_flags, _fail, _load, _sampling_flags, out, quiet_vllm, run_job_cli,
)
from pipeline.cli.jobflags import EMBED_FLAGS, SCORE_FLAGS, job_command, job_overrides
from pipeline.config import ConfigError, JobConfig, Task

app = typer.Typer()

# ---- run, score, embed: the bulk job's flags (cli/jobflags.py) over an optional spec ---------------------
@app.command()
@job_command()
def run(spec: Spec = None, *, flags: dict, verbose: Verbose = False) -> None:
    """Bulk generation (or embeddings): Parquet prompts in, Parquet shards out, exactly once per id."""
    run_job_cli(_load(JobConfig, spec, job_overrides(flags)), verbose)


@app.command()
@job_command(SCORE_FLAGS)
def score(spec: Spec = None, *, flags: dict, verbose: Verbose = False) -> None:
    """Perplexity: each text's mean negative log-likelihood per token (nll) and exp(nll), long texts by sliding window."""
    run_job_cli(_load(JobConfig, spec, {**job_overrides(flags), "task": Task.score.value}), verbose)


@app.command()
@job_command(EMBED_FLAGS)
def embed(spec: Spec = None, *, flags: dict, verbose: Verbose = False) -> None:
    """Feature extraction: one vector per text (mean of GPT-2's final hidden states) as a float32 list column."""
    run_job_cli(_load(JobConfig, spec, {**job_overrides(flags), "task": Task.embed.value}), verbose)


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
