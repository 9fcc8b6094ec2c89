"""Online command: ``serve`` deploys the OpenAI-compatible endpoint on Ray Serve."""

from __future__ import annotations

import signal
import sys
import time
from typing import Annotated, Optional

import typer

from pipeline.cli.common import (
    Address, DtypeOpt, GpusPerReplica, KVCacheDtypeOpt, MaxModelLen, Model, Offline, QuantizationOpt, Replicas, Spec,
    TensorParallel, Verbose,
    _engine_flags, _load, console, out,
)
from pipeline.config import Ingress, ServeConfig

app = typer.Typer()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _absolute(storage: Optional[str]) -> Optional[str]:
    """A local storage path as an absolute one: Ray workers do not share the shell's directory."""
    if storage is None or "://" in storage:
        return storage
    from pathlib import Path

    return str(Path(storage).expanduser().resolve())


@app.command()
def serve(
    spec: Spec = None,
    model: Model = None,
    replicas: Replicas = None, gpus_per_replica: GpusPerReplica = None, tensor_parallel_size: TensorParallel = None,
    dtype: DtypeOpt = None, quantization: QuantizationOpt = None,
    kv_cache_dtype: KVCacheDtypeOpt = None, max_model_len: MaxModelLen = None, offline: Offline = None,
    gpu_memory_utilization: Annotated[Optional[float], typer.Option(help="GPU memory share of the generation engine (default 0.80 with embeddings, 0.90 without).")] = None,
    embed_gpu_memory_utilization: Annotated[Optional[float], typer.Option(help="GPU memory share of the pooling engine for /v1/embeddings (default 0.10); the two may not pass 0.95.")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address (default 127.0.0.1: loopback only).")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port (default 8000).")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="GPT2_PIPELINE_API_KEY", show_envvar=True,
                                                   help="Require 'Authorization: Bearer KEY' on all routes but health.")] = None,
    api_keys_file: Annotated[Optional[str], typer.Option(help="File of API keys, one per line: any is accepted; each key sees only its own Batch API files and batches.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Serve application name (for run --via-serve).")] = None,
    embeddings: Annotated[Optional[bool], typer.Option("--embeddings/--no-embeddings", help="Serve /v1/embeddings (a second, pooling engine).")] = None,
    stream_interval: Annotated[Optional[int], typer.Option(help="Streaming: tokens per SSE chunk after the first (default 1).")] = None,
    ingress: Annotated[Optional[Ingress], typer.Option(help="direct: replicas listen on the port (one hop fewer); proxy: Ray Serve's HTTP proxy; auto: direct on an embedded Ray.")] = None,
    access_log: Annotated[Optional[bool], typer.Option("--access-log/--no-access-log", help="Log every request (default on).")] = None,
    max_queued_requests: Annotated[Optional[int], typer.Option(help="Requests waiting per replica before 429.")] = None,
    max_batch_in_flight: Annotated[Optional[int], typer.Option(help="Batch-job rows a replica runs at once while no online request is in flight (default 256).")] = None,
    max_batch_in_flight_online: Annotated[Optional[int], typer.Option(help="Batch-job rows a replica runs at once while online requests are in flight (default 8).")] = None,
    min_replicas: Annotated[Optional[int], typer.Option(help="Autoscaling: fewest replicas (enables autoscaling).")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(help="Autoscaling: most replicas.")] = None,
    target_ongoing_requests: Annotated[Optional[float], typer.Option(help="Autoscaling: target requests per replica.")] = None,
    batch_storage: Annotated[Optional[str], typer.Option(help="Folder or URI (s3://, gs://) for /v1/files and /v1/batches: uploads, batch state, results (default ~/.cache/gpt2-pipeline/batches).")] = None,
    max_file_bytes: Annotated[Optional[int], typer.Option(help="Largest upload to /v1/files (default 200 MB, as OpenAI).")] = None,
    max_batch_requests: Annotated[Optional[int], typer.Option(help="Most request lines in one batch (default 50,000, as OpenAI).")] = None,
    concurrent_batches: Annotated[Optional[int], typer.Option(help="Batches running at once; others wait in creation order (default 2).")] = None,
    address: Address = None,
    num_cpus: Annotated[Optional[int], typer.Option(help="Logical CPUs for an embedded Ray (default 8).")] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Return once deployed (needs --address: a running cluster).")] = False,
    verbose: Verbose = False,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API on Ray Serve (Ctrl-C stops it)."""
    overrides = {
        "host": host, "port": port, "api_key": api_key, "api_keys_file": _absolute(api_keys_file), "name": name, "embeddings": embeddings, "access_log": access_log,
        "ingress": ingress.value if ingress else None,
        "max_queued_requests": max_queued_requests, "max_batch_in_flight": max_batch_in_flight,
        "max_batch_in_flight_online": max_batch_in_flight_online,
        "min_replicas": min_replicas, "max_replicas": max_replicas, "target_ongoing_requests": target_ongoing_requests,
        "address": address, "num_cpus": num_cpus,
        "batches": {"storage": _absolute(batch_storage), "max_file_bytes": max_file_bytes,
                    "max_requests": max_batch_requests, "concurrent": concurrent_batches},
        "engine": {**_engine_flags(model, replicas, gpus_per_replica, tensor_parallel_size, dtype, max_model_len),
                   "quantization": quantization.value if quantization else None,
                   "kv_cache_dtype": kv_cache_dtype.value if kv_cache_dtype else None,
                   "stream_interval": stream_interval, "offline": offline, "gpu_memory_utilization": gpu_memory_utilization,
                   "embed_gpu_memory_utilization": embed_gpu_memory_utilization},
    }
    cfg: ServeConfig = _load(ServeConfig, spec, overrides)
    from pipeline.models import ModelNotFoundError, pinned

    try:  # build a built-in, or download a hub id, before Ray starts; replicas load this commit
        cfg = cfg.model_copy(update={"engine": pinned(cfg.engine)})
    except ModelNotFoundError as exc:
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(2)
    from ray import serve as ray_serve

    from pipeline.serving.server import start

    console.print(f"starting {cfg.engine.replicas} replica(s) of {cfg.engine.name} ...")
    started = time.monotonic()
    url, ingress = start(cfg, verbose)
    console.print(f"ready in {time.monotonic() - started:.1f} s", highlight=False)
    out.print(f"serving {cfg.engine.name} at {url}/v1 (Serve app {cfg.name!r}, {ingress.value} ingress); "
              f"{'API key required' if cfg.api_key or cfg.api_keys_file else 'no API key'}", highlight=False)
    sys.stdout.flush()  # scripts and log files wait for this line: don't leave it in a block buffer
    if detach:
        return
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` and container stops shut down cleanly too
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("shutting down ...")
        ray_serve.shutdown()
