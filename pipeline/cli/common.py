"""Shared CLI pieces: consoles, option types, and the spec + flags loader."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from pipeline.config import ConfigError, Dedupe, Dtype, InputFormat, KVCacheDtype, OutputFormat, Quantization, build, load_spec

console = Console(stderr=True)
out = Console()

Input = Annotated[Optional[str], typer.Option("--input", "-i", help="Parquet, JSONL or CSV file, folder, glob or URI.")]
Output = Annotated[Optional[str], typer.Option("--output", "-o", help="Output folder or URI.")]
Passthrough = Annotated[Optional[list[str]], typer.Option(help="Input column copied to the output (repeatable).")]
BatchSize = Annotated[Optional[int], typer.Option(help="Rows per slice: one engine call and one committed shard (big jobs run consecutive slices together, up to 1,024 rows).")]
TargetFileMb = Annotated[Optional[int], typer.Option(help="Output files are sealed at about this size in MB (default 128).")]
MaxRowsPerFile = Annotated[Optional[int], typer.Option(help="Most rows in one output file (default 1,000,000).")]
Overwrite = Annotated[Optional[bool], typer.Option("--overwrite", help="Replace a non-empty output folder.")]
ViaServe = Annotated[Optional[str], typer.Option(help="Send rows through this running Serve app (e.g. gpt2).")]
NumCpus = Annotated[Optional[int], typer.Option(help="Logical CPUs for an embedded Ray (default 8).")]
Spec = Annotated[Optional[Path], typer.Option("--spec", help="YAML spec with the same options; flags override it.")]
Model = Annotated[Optional[str], typer.Option(help="Built-in name (demo, gpt2-small-random), local HF folder, or hub id (gpt2, openai-community/gpt2-medium, ...: downloaded on first use into the HF cache).")]
Offline = Annotated[Optional[bool], typer.Option("--offline", help="Never download: hub ids must already be in the HF cache (like HF_HUB_OFFLINE=1).")]
Replicas = Annotated[Optional[int], typer.Option(help="Engine replicas (one per GPU, or per CPU slot).")]
GpusPerReplica = Annotated[Optional[float], typer.Option(help="GPUs Ray gives each replica (0 on CPU machines; 0.5 shares a GPU; 2+ needs the same --tensor-parallel-size).")]
TensorParallel = Annotated[Optional[int], typer.Option(help="vLLM tensor parallel size within a replica (= --gpus-per-replica on GPUs).")]
DtypeOpt = Annotated[Optional[Dtype], typer.Option(help="Weights dtype; auto = bfloat16 on CPUs with AMX/AVX512-BF16 (float32 without, for tiny models and for score), half precision on GPUs. float32: tokens equal to HF's.")]
QuantizationOpt = Annotated[Optional[Quantization], typer.Option(help="int8 (CPU): linear layers in int8, quantized as the model loads (per-channel weights, per-token activations, as CTranslate2's int8); faster, tokens differ.")]
KVCacheDtypeOpt = Annotated[Optional[KVCacheDtype], typer.Option(help="KV cache: auto (the model's dtype) or fp8 / fp8_e4m3 / fp8_e5m2 (one byte a value: half the memory, faster decode steps; tokens differ).")]
MaxModelLen = Annotated[Optional[int], typer.Option(help="Context length (default: the model's).")]
Address = Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray).")]
InputFormatOpt = Annotated[Optional[InputFormat], typer.Option(help="Input files: auto (by extension: .parquet, .jsonl/.json, .csv), or openai-batch for an OpenAI Batch request file.")]
OutputFormatOpt = Annotated[Optional[OutputFormat], typer.Option(help="openai-batch also writes <output>/_results.jsonl (default for openai-batch input).")]
DedupeOpt = Annotated[Optional[Dedupe], typer.Option(help="Duplicate input ids: refuse (default) or keep the first row of each.")]
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
Logprobs = Annotated[Optional[int], typer.Option(help="Add a logprobs column: per generated token its logprob and the top N alternatives.")]
MinP = Annotated[Optional[float], typer.Option(help="Drop tokens below min_p times the top token's probability.")]
NoRepeatNgram = Annotated[Optional[int], typer.Option(help="HF's no_repeat_ngram_size: no n-gram of this size occurs twice.")]
NumBeams = Annotated[Optional[int], typer.Option(help="Beam search with this many beams (vLLM's use_beam_search, n beams: one row each, best first).")]
Choice = Annotated[Optional[list[str]], typer.Option("--choice", help="Structured output: the text is one of these (repeatable).")]
Regex = Annotated[Optional[str], typer.Option(help="Structured output: the text matches this regular expression.")]
JsonSchema = Annotated[Optional[Path], typer.Option("--json-schema", help="Structured output: JSON valid against this JSON Schema file.")]
Grammar = Annotated[Optional[Path], typer.Option(help="Structured output: text in the language of this grammar file (EBNF/GBNF or Lark).")]
Stride = Annotated[Optional[int], typer.Option(help="score: sliding-window step for texts over the context (default: half the context).")]
ScoreFirstToken = Annotated[Optional[bool], typer.Option("--score-first-token/--no-score-first-token", help="score: put <|endoftext|> first so the text's first token is scored too.")]
TokenLogprobs = Annotated[Optional[bool], typer.Option("--token-logprobs/--no-token-logprobs", help="score: add a token_logprobs column (one per scored token).")]


def quiet_vllm(verbose: bool) -> None:
    """Keep stdout for results: vLLM logs to stderr, warnings only with --verbose."""
    import logging
    import os
    import sys

    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    logging.basicConfig(stream=sys.stderr, level=logging.INFO if verbose else logging.ERROR)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _engine_flags(model, replicas, gpus_per_replica, tensor_parallel_size, dtype, max_model_len, truncate=None) -> dict:
    return {
        "model": model, "replicas": replicas, "gpus_per_replica": gpus_per_replica,
        "tensor_parallel_size": tensor_parallel_size, "dtype": dtype.value if dtype else None,
        "max_model_len": max_model_len, "truncate": truncate,
    }


def _sampling_flags(**kw: Any) -> dict:
    return {k: v for k, v in kw.items() if v is not None and v != []}


def _decoding_flags(min_p: Optional[float], no_repeat_ngram_size: Optional[int], num_beams: Optional[int],
                    choice: Optional[list[str]], regex: Optional[str], json_schema: Optional[Path],
                    grammar: Optional[Path]) -> dict:
    """The decoding flags as SamplingConfig keys (at most one structured-output constraint)."""
    constraints = {"choice": choice or None, "regex": regex,
                   "json": _read_flag_file(json_schema, "--json-schema", as_json=True),
                   "grammar": _read_flag_file(grammar, "--grammar")}
    given = {k: v for k, v in constraints.items() if v is not None}
    if len(given) > 1:
        _fail("--choice, --regex, --json-schema and --grammar exclude each other")
    out: dict[str, Any] = {"min_p": min_p, "no_repeat_ngram_size": no_repeat_ngram_size,
                           "structured_outputs": given or None}
    if num_beams is not None:
        out.update(use_beam_search=True, n=num_beams)
    return {k: v for k, v in out.items() if v is not None}


def _read_flag_file(path: Optional[Path], flag: str, as_json: bool = False) -> Any:
    if path is None:
        return None
    if not path.is_file():
        _fail(f"{flag} {str(path)!r} does not exist")
    text = path.read_text()
    if not as_json:
        return text
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"{flag} {str(path)!r} is not valid JSON: {exc}")


def _load(model_type: Any, spec: Optional[Path], overrides: dict) -> Any:
    try:
        return build(model_type, load_spec(spec) if spec else {}, overrides)
    except ConfigError as exc:
        _fail(str(exc))


def run_job_cli(job: Any, verbose: bool) -> None:
    """Run a validated JobConfig with the progress bar; map its end to the exit code."""
    from pipeline.report import run_with_progress

    try:
        summary = run_with_progress(job, verbose)
    except ConfigError as exc:
        _fail(str(exc))
    if summary.status != "succeeded":
        raise typer.Exit(1 if summary.status != "interrupted" else 130)
