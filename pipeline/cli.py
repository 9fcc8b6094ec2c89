"""``gpt2-pipeline``: the command line. Heavy imports (Ray, vLLM) happen inside commands,
so ``--help`` is instant. Flags override a YAML ``--spec``; both go through ``pipeline.config``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from pipeline.config import ConfigError, Dtype, JobConfig, Task, build, load_spec

app = typer.Typer(
    name="gpt2-pipeline",
    help="Run GPT-2-family models at cluster scale: bulk jobs on Ray Data, an OpenAI-compatible endpoint on Ray Serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()

# ---- shared options -------------------------------------------------------------------------------
Spec = Annotated[Optional[Path], typer.Option("--spec", help="YAML spec with the same options; flags override it.")]
Model = Annotated[Optional[str], typer.Option(help="Built-in name (demo, gpt2-small-random), local HF folder, or hub id in the HF cache.")]
Replicas = Annotated[Optional[int], typer.Option(help="Engine replicas (one per GPU, or per CPU slot).")]
GpusPerReplica = Annotated[Optional[float], typer.Option(help="GPUs per replica (0 on CPU machines).")]
TensorParallel = Annotated[Optional[int], typer.Option(help="vLLM tensor parallel size within a replica.")]
DtypeOpt = Annotated[Optional[Dtype], typer.Option(help="Weights dtype; auto = float32 on CPU.")]
MaxModelLen = Annotated[Optional[int], typer.Option(help="Context length (default: the model's).")]
Address = Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray and vLLM logs.")]
MaxTokens = Annotated[Optional[int], typer.Option(help="Most tokens to generate per sample.")]
MinTokens = Annotated[Optional[int], typer.Option(help="Fewest tokens before EOS/stop may end a sample.")]
Temperature = Annotated[Optional[float], typer.Option(help="0 = greedy decoding.")]
TopP = Annotated[Optional[float], typer.Option(help="Nucleus sampling mass, in (0, 1].")]
TopK = Annotated[Optional[int], typer.Option(help="Sample among the k most likely tokens; 0 disables.")]
Seed = Annotated[Optional[int], typer.Option(help="Seed: same seed, same samples.")]
Stop = Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")]
N = Annotated[Optional[int], typer.Option("--n", help="Samples per prompt (one output row each).")]
RepetitionPenalty = Annotated[Optional[float], typer.Option(help="HF-style repetition penalty (1 = off).")]
IgnoreEos = Annotated[Optional[bool], typer.Option("--ignore-eos/--no-ignore-eos", help="Generate past EOS.")]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _engine_flags(model, replicas, gpus_per_replica, tensor_parallel_size, dtype, max_model_len, truncate=None) -> dict:
    return {
        "model": model, "replicas": replicas, "gpus_per_replica": gpus_per_replica,
        "tensor_parallel_size": tensor_parallel_size, "dtype": dtype.value if dtype else None,
        "max_model_len": max_model_len, "truncate": truncate,
    }


def _sampling_flags(**kw: Any) -> dict:
    return {k: v for k, v in kw.items() if v is not None and v != []}


def _load(model_type: Any, spec: Optional[Path], overrides: dict) -> Any:
    try:
        return build(model_type, load_spec(spec) if spec else {}, overrides)
    except ConfigError as exc:
        _fail(str(exc))


# ---- run -------------------------------------------------------------------------------------------
@app.command()
def run(
    spec: Spec = None,
    input: Annotated[Optional[str], typer.Option("--input", "-i", help="Parquet file, folder, glob or URI.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output folder or URI.")] = None,
    model: Model = None,
    task: Annotated[Optional[Task], typer.Option(help="generate (text) or embed (a vector per text).")] = None,
    prompt_column: Annotated[Optional[str], typer.Option(help="Column holding the prompts.")] = None,
    id_column: Annotated[Optional[str], typer.Option(help="Column holding input ids (else '<file>#<row>').")] = None,
    passthrough: Annotated[Optional[list[str]], typer.Option(help="Input column copied to the output (repeatable).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Rows per engine call and per output shard.")] = None,
    max_tokens: MaxTokens = None, min_tokens: MinTokens = None, temperature: Temperature = None,
    top_p: TopP = None, top_k: TopK = None, seed: Seed = None, stop: Stop = None, n: N = None,
    repetition_penalty: RepetitionPenalty = None, ignore_eos: IgnoreEos = None,
    truncate: Annotated[Optional[bool], typer.Option("--truncate/--no-truncate", help="Left-truncate prompts over the context instead of error rows.")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite", help="Replace a non-empty output folder.")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue a stopped job: skip committed ids.")] = None,
    force: Annotated[Optional[bool], typer.Option("--force", help="With --resume: accept a changed config.")] = None,
    max_error_rate: Annotated[Optional[float], typer.Option(help="Abort when the error share passes this (0-1).")] = None,
    via_serve: Annotated[Optional[str], typer.Option(help="Send rows through this running Serve app (e.g. gpt2).")] = None,
    replicas: Replicas = None, gpus_per_replica: GpusPerReplica = None, tensor_parallel_size: TensorParallel = None,
    dtype: DtypeOpt = None, max_model_len: MaxModelLen = None, address: Address = None,
    num_cpus: Annotated[Optional[int], typer.Option(help="Logical CPUs for an embedded Ray (default 8).")] = None,
    verbose: Verbose = False,
) -> None:
    """Bulk generation (or embeddings): Parquet prompts in, Parquet shards out, exactly once per id."""
    overrides = {
        "input": input, "output": output, "task": task.value if task else None, "prompt_column": prompt_column,
        "id_column": id_column, "passthrough": passthrough or None, "batch_size": batch_size,
        "overwrite": overwrite, "resume": resume, "force": force, "max_error_rate": max_error_rate,
        "via_serve": via_serve, "address": address, "num_cpus": num_cpus,
        "engine": _engine_flags(model, replicas, gpus_per_replica, tensor_parallel_size, dtype, max_model_len, truncate),
        "sampling": _sampling_flags(
            max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, stop=stop, n=n, repetition_penalty=repetition_penalty, ignore_eos=ignore_eos,
        ),
    }
    job: JobConfig = _load(JobConfig, spec, overrides)
    from pipeline.report import run_with_progress

    try:
        summary = run_with_progress(job, verbose)
    except ConfigError as exc:
        _fail(str(exc))
    if summary.status != "succeeded":
        raise typer.Exit(1 if summary.status != "interrupted" else 130)


# ---- generate / embed (quick look, no Ray) ----------------------------------------------------------
@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    model: Model = "demo",
    max_tokens: MaxTokens = 32, min_tokens: MinTokens = None, temperature: Temperature = None,
    top_p: TopP = None, top_k: TopK = None, seed: Seed = None, stop: Stop = None, n: N = None,
    repetition_penalty: RepetitionPenalty = None, ignore_eos: IgnoreEos = None,
    dtype: DtypeOpt = None, max_model_len: MaxModelLen = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print samples as JSON.")] = False,
) -> None:
    """Print a completion of PROMPT from the same engine the jobs use (in-process, no Ray)."""
    from pipeline.config import EngineConfig, SamplingConfig

    engine_cfg = _load(EngineConfig, None, _engine_flags(model, None, None, None, dtype, max_model_len))
    sampling = _load(SamplingConfig, None, _sampling_flags(
        max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed, stop=stop, n=n, repetition_penalty=repetition_penalty, ignore_eos=ignore_eos,
    ))
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
    out.print(f"cache: {cache_dir()}  (hub ids such as gpt2 load from the HF cache; local folders work too)")


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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
