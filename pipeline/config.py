"""Typed configuration: sampling, engine, batch job and serving.

Every entry point (CLI flags, YAML job specs in ``jobs/``, the HTTP API, Ray Jobs submission)
builds one of these models, so validation happens once, before any engine starts.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipeline.sampling import ROW_OVERRIDE_FIELDS, SamplingConfig, StructuredOutputs, _Strict

__all__ = [
    "BatchAPIConfig", "ConfigError", "Dedupe", "Dtype", "EngineConfig", "Executor", "InputFormat", "JobConfig",
    "OutputFormat", "SamplingConfig", "ScoreConfig", "ServeConfig", "StructuredOutputs", "Task",
    "ROW_OVERRIDE_FIELDS", "load_spec", "format_validation_error",
]


class ConfigError(ValueError):
    """A user-facing configuration problem (one clear line, no traceback)."""


class Task(str, Enum):
    generate = "generate"
    embed = "embed"
    score = "score"  # log-likelihood / perplexity of each text


class InputFormat(str, Enum):
    """How input files are read (``auto``: by file extension)."""

    auto = "auto"
    parquet = "parquet"
    jsonl = "jsonl"                 # one JSON object per line (.jsonl, .json, .ndjson; .gz too)
    csv = "csv"                     # header row, then one row per prompt (.csv; .gz too)
    openai_batch = "openai-batch"   # OpenAI Batch / `vllm run-batch` request file (JSONL)


class OutputFormat(str, Enum):
    """What a job writes besides its Parquet shards (``auto``: openai-batch for openai-batch input)."""

    auto = "auto"
    parquet = "parquet"
    openai_batch = "openai-batch"   # also <output>/_results.jsonl, OpenAI Batch output lines


class Dedupe(str, Enum):
    """What to do with rows whose id appeared earlier in the input."""

    refuse = "refuse"  # a planning error listing them
    first = "first"    # keep the first row of each id


class Ingress(str, Enum):
    """How HTTP reaches the replicas."""

    auto = "auto"      # direct on an embedded (single-node) Ray, proxy when joining a cluster
    proxy = "proxy"    # Ray Serve's HTTP proxy routes each request (cluster-wide, autoscaling)
    direct = "direct"  # each replica listens on the port itself (SO_REUSEPORT): one hop fewer


class Executor(str, Enum):
    """Who runs a bulk job's blocks."""

    auto = "auto"          # inline for one replica on an embedded Ray or --via-serve, else ray-data
    inline = "inline"      # the driver process: one in-process engine, or the Serve replicas
    ray_data = "ray-data"  # Ray Data: a pool of engine actors that read, run and commit blocks, cluster-wide


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantization(str, Enum):
    none = "none"
    int8 = "int8"


class KVCacheDtype(str, Enum):
    """vLLM's ``kv_cache_dtype``: auto keeps the model's dtype; fp8 (= fp8_e4m3) and fp8_e5m2 store
    keys and values in one byte (unscaled on a CPU, which needs AVX-512 for it)."""

    auto = "auto"
    fp8 = "fp8"
    fp8_e4m3 = "fp8_e4m3"
    fp8_e5m2 = "fp8_e5m2"


class ScoreConfig(_Strict):
    """The score task: how each text's log-likelihood is computed and what is written."""

    stride: Optional[int] = Field(None, ge=1, description="Sliding-window step for texts over the context (default: half the context); at most the window (context - 1).")
    score_first_token: bool = Field(False, description="Put <|endoftext|> before each text so its first token is scored too.")
    token_logprobs: bool = Field(False, description="Also write a token_logprobs list column (one per scored token).")


# GPU memory per device: one engine alone, or generation + pooling sharing a Serve replica's GPUs.
GPU_SHARE_ALONE = 0.90
GPU_SHARE_COLOCATED = (0.80, 0.10)
GPU_MEMORY_CAP = 0.95


class EngineConfig(_Strict):
    """One engine replica: the model, its vLLM settings, and how many replicas to run."""

    model: str = Field("demo", description="Built-in name, local HF folder, or hub id (downloaded on first use).")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit); the driver pins it to a commit before any replica starts.")
    offline: bool = Field(False, description="Never download: hub ids must already be in the HF cache (like HF_HUB_OFFLINE=1).")
    served_model_name: Optional[str] = Field(None, description="Name reported by the API (default: model).")
    dtype: Dtype = Field(Dtype.auto, description="auto: the fastest precision the hardware runs well: bfloat16 on CPUs with AMX/AVX512-BF16 (float32 without, or for tiny models), half precision on GPUs, float32 for score; float32 gives tokens equal to HF's.")
    quantization: Quantization = Field(Quantization.none, description="int8 (CPU): the linear layers in int8, weights per channel and activations per token, quantized as the model loads (as CTranslate2's int8); faster steps, tokens differ from the dtype's. The LM head too, in slices; its weight stays for the embedding.")
    kv_cache_dtype: KVCacheDtype = Field(KVCacheDtype.auto, description="Keys and values in the KV cache: auto (the model's dtype) or fp8, fp8_e4m3, fp8_e5m2 (one byte each: half the memory a token takes and less to read per step; tokens differ).")
    max_model_len: Optional[int] = Field(None, ge=16, description="Context length (default: the model's).")
    max_num_seqs: int = Field(256, ge=1, description="Sequences the paged-attention scheduler runs at once.")
    stream_interval: int = Field(1, ge=1, le=64, description="Streaming: tokens per chunk after the first (vLLM stream_interval); larger cuts per-chunk overhead.")
    max_in_flight: int = Field(512, ge=1, description="Requests a replica accepts at once (a semaphore).")
    gpu_memory_utilization: Optional[float] = Field(None, gt=0.0, le=1.0, description="GPU share of the generation engine (default 0.80 beside a pooling engine, 0.90 alone); CPU: 0.3.")
    embed_gpu_memory_utilization: Optional[float] = Field(None, gt=0.0, le=1.0, description="GPU share of the pooling engine (default 0.10 beside a generation engine, 0.90 alone).")
    kv_cache_gib: Optional[float] = Field(None, gt=0.0, description="CPU only: KV-cache size (default: what max_num_seqs sequences of max_model_len tokens fill, at most 2 GiB).")
    enforce_eager: Optional[bool] = Field(None, description="Run the model eagerly, not compiled / CUDA graphs. Default: a CPU job compiles when it is big enough to pay for the compile (tokens x parameters, engine/compiled.py), else eager; serve on a CPU: compiled (demo-sized models eager); GPU: CUDA graphs.")
    enable_prefix_caching: bool = True
    replicas: int = Field(1, ge=1, le=1024, description="Engine replicas (actors).")
    gpus_per_replica: float = Field(0.0, ge=0.0, description="GPUs Ray gives one replica (its num_gpus); 0 on CPU machines, <1 shares a GPU, >1 needs tensor_parallel_size equal to it.")
    cpus_per_replica: Optional[float] = Field(None, gt=0.0, description="Logical CPUs Ray reserves per replica; a CPU engine computes with that many threads (OMP_NUM_THREADS). Default: on an embedded Ray without GPUs, this machine's cores shared among the replicas; otherwise 1.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism inside one replica: over the replica's GPUs (equal to gpus_per_replica on GPUs).")
    truncate: bool = Field(False, description="Left-truncate prompts over the context instead of an error row.")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    @model_validator(mode="after")
    def _gpus_fit(self) -> "EngineConfig":
        gpus, tp = self.gpus_per_replica, self.tensor_parallel_size
        if gpus > 0 and (gpus > 1 or tp > 1) and gpus != tp:
            raise ValueError(
                f"tensor_parallel_size ({tp}) must equal gpus_per_replica ({gpus:g}): one replica's engine "
                "spreads over exactly the GPUs Ray gives it (fractions of a GPU only with tensor_parallel_size 1)"
            )
        if gpus > 0 and self.quantization == Quantization.int8:
            raise ValueError("quantization int8 runs on CPUs only (gpus_per_replica must be 0); on GPUs give vLLM "
                             "a quantized checkpoint")
        self.gpu_memory_shares(colocated=False)
        return self

    def gpu_memory_shares(self, colocated: bool) -> tuple[float, float]:
        """(generation, pooling) shares of each GPU of a replica. ``colocated``: the replica runs both
        engines on the same GPUs, so their shares add up; the total may not pass ``GPU_MEMORY_CAP``."""
        gen = self.gpu_memory_utilization or (GPU_SHARE_COLOCATED[0] if colocated else GPU_SHARE_ALONE)
        pool = self.embed_gpu_memory_utilization or (GPU_SHARE_COLOCATED[1] if colocated else GPU_SHARE_ALONE)
        total = gen + pool if colocated else max(gen, pool)
        if total > GPU_MEMORY_CAP + 1e-9:
            what = (f"gpu_memory_utilization {gen:g} + embed_gpu_memory_utilization {pool:g} = {total:g}"
                    if colocated else f"a GPU memory share of {total:g}")
            raise ValueError(f"{what} is over {GPU_MEMORY_CAP} of the GPU; lower it"
                             + (" (or serve without embeddings)" if colocated else ""))
        return gen, pool


class JobConfig(_Strict):
    """An offline bulk job: Parquet prompts in, Parquet generations (or embeddings) out."""

    input: str = Field(..., description="Parquet, JSONL or CSV file, folder, glob or URI (s3://, gs://, file://).")
    output: str = Field(..., description="Output folder or URI.")
    input_format: InputFormat = Field(InputFormat.auto, description="auto: by file extension (.parquet, .jsonl/.json, .csv).")
    output_format: OutputFormat = Field(OutputFormat.auto, description="openai-batch also writes <output>/_results.jsonl.")
    results: Optional[str] = Field(None, description="openai-batch output: also copy the results JSONL to this path.")
    dedupe: Dedupe = Field(Dedupe.refuse, description="Duplicate input ids: refuse the job, or keep the first row of each.")
    task: Task = Task.generate
    prompt_column: str = "prompt"
    id_column: str = Field("id", description="Input id column; if absent, ids are '<file>#<row>'.")
    passthrough: list[str] = Field(default_factory=list, description="Input columns copied to the output.")
    batch_size: int = Field(64, ge=1, le=100_000, description="Rows per slice: one engine call and one committed shard (from 128 slices per replica, consecutive slices run together, up to 1,024 rows).")
    target_file_mb: int = Field(128, ge=1, le=65_536, description="Output files are sealed at about this size (MB).")
    max_rows_per_file: int = Field(1_000_000, ge=1, description="Output files hold at most this many rows.")
    overwrite: bool = False
    resume: bool = False
    force: bool = Field(False, description="With resume: accept a changed config or input.")
    max_error_rate: Optional[float] = Field(None, ge=0.0, le=1.0, description="Abort above this error share.")
    normalize: bool = Field(True, description="embed task: L2-normalize vectors.")
    via_serve: Optional[str] = Field(None, description="Send rows through this running Serve application.")
    executor: Executor = Field(Executor.auto, description="inline (driver process) or ray-data; auto picks inline for one replica on an embedded Ray and for via_serve.")
    address: Optional[str] = Field(None, description="Ray address; default RAY_ADDRESS or a local Ray.")
    num_cpus: Optional[int] = Field(None, ge=1, description="Logical CPUs for a local Ray (default 8).")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig, description="score task options.")
    engine: EngineConfig = Field(default_factory=EngineConfig)

    @model_validator(mode="before")
    @classmethod
    def _batch_ids(cls, data: Any) -> Any:
        """OpenAI Batch input: the id is each line's custom_id."""
        if isinstance(data, dict) and data.get("input_format") in (InputFormat.openai_batch, "openai-batch"):
            data = {**data, "id_column": "custom_id"}
        return data

    @model_validator(mode="after")
    def _modes(self) -> "JobConfig":
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        batch_in = self.input_format == InputFormat.openai_batch.value
        if self.output_format == OutputFormat.openai_batch.value and not batch_in:
            raise ValueError("output_format openai-batch needs input_format openai-batch (request lines to answer)")
        if self.results and not self.writes_openai_batch:
            raise ValueError("results is the OpenAI Batch output file: it needs openai-batch input")
        if batch_in and self.task != Task.generate.value:
            raise ValueError("openai-batch input takes the task from each request's url; drop task")
        return self

    def resolved_executor(self, embedded: bool) -> Executor:
        """``auto``: inline when one engine replica on this machine does the work (or a warm
        Serve fleet does), Ray Data when engines spread over replicas or a cluster."""
        if self.executor != Executor.auto:
            return Executor(self.executor)
        if self.via_serve or (embedded and self.engine.replicas == 1):
            return Executor.inline
        return Executor.ray_data

    @property
    def writes_openai_batch(self) -> bool:
        """Whether the job ends by writing the OpenAI Batch output JSONL."""
        if self.output_format == OutputFormat.auto.value:
            return self.input_format == InputFormat.openai_batch.value
        return self.output_format == OutputFormat.openai_batch.value

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a resume to continue a job: model, task, sampling, columns."""
        return {
            "task": self.task, "model": self.engine.model, "dtype": self.engine.dtype,
            **({"quantization": self.engine.quantization} if self.engine.quantization != Quantization.none else {}),
            **({"kv_cache_dtype": self.engine.kv_cache_dtype} if self.engine.kv_cache_dtype != KVCacheDtype.auto else {}),
            "max_model_len": self.engine.max_model_len, "truncate": self.engine.truncate,
            "prompt_column": self.prompt_column, "id_column": self.id_column,
            "passthrough": self.passthrough, "normalize": self.normalize,
            "sampling": self.sampling.model_dump(mode="json"), "score": self.score.model_dump(mode="json"),
        }


class BatchAPIConfig(_Strict):
    """OpenAI's Files and Batches endpoints on a served fleet: storage and limits (OpenAI's by default)."""

    storage: Optional[str] = Field(None, description="Folder or URI (s3://, gs://, file://) for uploaded files, batch state and results (default: ~/.cache/gpt2-pipeline/batches, or under $GPT2_PIPELINE_CACHE).")
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="Largest upload (OpenAI: 200 MB).")
    max_requests: int = Field(50_000, ge=1, description="Most request lines in one batch (OpenAI: 50,000).")
    completion_windows: list[str] = Field(["24h"], min_length=1, description="Accepted completion_window values (<n>h, <n>m or <n>s; OpenAI: 24h only).")
    concurrent: int = Field(2, ge=1, le=64, description="Batches running at once; more wait in creation order (FIFO).")
    batch_size: int = Field(64, ge=1, le=4096, description="Requests per slice (one committed shard; 64 as a job's --batch-size): also how soon a cancel takes effect.")

    @field_validator("completion_windows")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        for w in value:
            window_seconds(w)
        return value

    def storage_uri(self) -> str:
        if self.storage:
            return self.storage
        import os

        root = os.environ.get("GPT2_PIPELINE_CACHE") or str(Path.home() / ".cache" / "gpt2-pipeline")
        return str(Path(root) / "batches")


def window_seconds(window: str) -> int:
    """``24h`` / ``90m`` / ``30s`` as seconds; ValueError otherwise."""
    units = {"h": 3600, "m": 60, "s": 1}
    if len(window) < 2 or window[-1] not in units or not window[:-1].isdigit() or int(window[:-1]) <= 0:
        raise ValueError(f"completion window {window!r} must be <n>h, <n>m or <n>s (e.g. 24h)")
    return int(window[:-1]) * units[window[-1]]


class ServeConfig(_Strict):
    """The online endpoint: a Ray Serve application around the same engine class."""

    name: str = Field("gpt2", description="Serve application name (used by `run --via-serve`).")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: Optional[str] = Field(None, description="Require 'Authorization: Bearer <key>' (or env GPT2_PIPELINE_API_KEY).")
    api_keys_file: Optional[str] = Field(None, description="A file of API keys, one per line (read by each replica): any of them is accepted, and each key sees only its own Batch API files and batches.")
    embeddings: bool = Field(True, description="Also start a pooling engine for /v1/embeddings.")
    max_queued_requests: int = Field(256, ge=0, description="Requests a replica lets wait beyond engine.max_in_flight before answering 429.")
    max_batch_in_flight: int = Field(
        256, ge=1, description="Batch-job rows a replica runs at once while no online request is in flight (online first).")
    max_batch_in_flight_online: int = Field(
        8, ge=1, description="... while an online request is in flight: its first token waits for a short step.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    ingress: Ingress = Field(Ingress.auto, description="auto: direct on an embedded Ray, Serve's proxy on a cluster.")
    access_log: bool = Field(True, description="Serve's per-request access log (proxy and replicas).")
    max_prompts_per_request: int = Field(256, ge=1)
    min_replicas: Optional[int] = Field(None, ge=0, description="Autoscaling lower bound (enables autoscaling).")
    max_replicas: Optional[int] = Field(None, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(32.0, gt=0)
    address: Optional[str] = None
    num_cpus: Optional[int] = Field(None, ge=1)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    batches: BatchAPIConfig = Field(default_factory=BatchAPIConfig, description="/v1/files and /v1/batches.")

    @property
    def autoscaling(self) -> bool:
        """Either replica bound given: Serve autoscaling instead of a fixed replica count."""
        return self.min_replicas is not None or self.max_replicas is not None

    @model_validator(mode="after")
    def _direct_has_fixed_replicas(self) -> "ServeConfig":
        if self.ingress == Ingress.direct and self.autoscaling:
            raise ValueError("autoscaling needs Serve's proxy to count requests: use ingress 'proxy' (or 'auto' on a cluster)")
        return self

    @model_validator(mode="after")
    def _memory_fits(self) -> "ServeConfig":
        self.engine.gpu_memory_shares(colocated=self.embeddings)
        return self

    def resolved_ingress(self, embedded: bool) -> Ingress:
        """``auto``: direct when Ray is embedded and replicas are fixed, else Serve's proxy."""
        if self.ingress != Ingress.auto:
            return Ingress(self.ingress)
        return Ingress.direct if embedded and not self.autoscaling else Ingress.proxy


def format_validation_error(exc: ValidationError) -> str:
    """pydantic's report as one line per problem: ``sampling.top_p: Input should be ...``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read a YAML job spec as a plain dict (validated later, after CLI flags are merged)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"spec file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"spec file {str(p)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"spec file {str(p)!r} must hold a mapping of options")
    return data


def merge(spec: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge flag values (non-None) over a spec: flags win."""
    out = dict(spec)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, dict):
            out[key] = merge({}, value)
        else:
            out[key] = value
    return out


def build(model: type[BaseModel], spec: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """Merge flags over a spec and validate, turning pydantic's errors into one ConfigError."""
    try:
        return model.model_validate(merge(spec, overrides))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
