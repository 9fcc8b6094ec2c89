"""Kubernetes command: ``k8s render`` prints KubeRay manifests (RayJob / RayService) for a spec."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import GpusPerReplica, Replicas, TensorParallel, _fail, console, out
from pipeline.config import ConfigError
from pipeline.k8s import Kind

app = typer.Typer()
k8s_app = typer.Typer(help="Run specs on Kubernetes with KubeRay (RayJob for jobs, RayService for the endpoint).",
                      no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")


@k8s_app.command()
def render(
    spec: Annotated[Path, typer.Argument(help="A job spec (input/output: RayJob) or a serve spec (RayService).")],
    kind: Annotated[Kind, typer.Option(case_sensitive=False, help="RayJob or RayService; auto: RayJob if the spec has input/output.")] = Kind.auto,
    image: Annotated[Optional[str], typer.Option(help="Image with the project installed (default gpt2-pipeline:<version>; see deploy/kuberay/Dockerfile).")] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n", help="Namespace (default: kubectl's current one).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Resource name (default gpt2-<spec file stem>).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker pods (default: enough for the spec's engine replicas; autoscaling serve specs: the most).")] = None,
    gpus_per_worker: Annotated[Optional[int], typer.Option(help="GPUs per worker pod (default: gpus_per_replica x tensor_parallel_size, rounded up).")] = None,
    cpus_per_worker: Annotated[Optional[int], typer.Option(help="CPUs per worker pod (default 4 per GPU).")] = None,
    memory_per_worker: Annotated[Optional[str], typer.Option(help="Memory per worker pod (default 16Gi per GPU).")] = None,
    head_cpus: Annotated[Optional[int], typer.Option(help="Head pod CPUs (default 4).")] = None,
    head_memory: Annotated[Optional[str], typer.Option(help="Head pod memory (default 16Gi).")] = None,
    hf_cache_pvc: Annotated[Optional[str], typer.Option(help="PVC holding a Hugging Face cache (hub models), mounted read-only.")] = None,
    api_key_secret: Annotated[Optional[str], typer.Option(help="Serve: Secret whose key 'api-key' is the API key.")] = None,
    service_account: Annotated[Optional[str], typer.Option(help="ServiceAccount for the pods (e.g. bound to an IAM role for s3:// input/output).")] = None,
    replicas: Replicas = None, gpus_per_replica: GpusPerReplica = None, tensor_parallel_size: TensorParallel = None,
    input: Annotated[Optional[str], typer.Option("--input", help="Job: override the spec's input (passed to `run` in the entrypoint).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="Job: override the spec's output, e.g. s3://BUCKET/PREFIX (passed to `run`).")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-o", help="Write the manifests to this file (default: stdout).")] = None,
) -> None:
    """Print the KubeRay manifests for SPEC: a ConfigMap holding the spec, and a RayJob or RayService.

    Engine, input and output flags override the spec as they do for `run` and `submit` (the ConfigMap keeps the spec verbatim; the flags go to the job's command or the Serve app's args).
    """
    from pydantic import ValidationError

    from pipeline import k8s
    from pipeline.config import format_validation_error

    given = {"kind": kind.value, "image": image, "namespace": namespace, "name": name, "workers": workers,
             "gpus_per_worker": gpus_per_worker, "cpus_per_worker": cpus_per_worker,
             "memory_per_worker": memory_per_worker, "head_cpus": head_cpus, "head_memory": head_memory,
             "hf_cache_pvc": hf_cache_pvc, "api_key_secret": api_key_secret, "service_account": service_account, "input": input, "output": output,
             "replicas": replicas, "gpus_per_replica": gpus_per_replica, "tensor_parallel_size": tensor_parallel_size}
    try:
        opts = k8s.K8sOptions.model_validate({k: v for k, v in given.items() if v is not None})
        docs, warnings = k8s.render(spec, opts)
    except ValidationError as exc:
        _fail(format_validation_error(exc))
    except ConfigError as exc:
        _fail(str(exc))
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    text = k8s.dump(docs)
    if file is None:
        out.file.write(text)
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
    console.print(f"wrote {file} ({docs[-1]['kind']} {docs[-1]['metadata']['name']}); apply: kubectl apply -f {file}",
                  highlight=False, soft_wrap=True)
