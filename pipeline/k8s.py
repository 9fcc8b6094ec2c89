"""Kubernetes manifests for KubeRay, built from the same YAML specs as ``jobs/``.

A job spec becomes a ``RayJob`` (a Ray cluster that runs ``gpt2-pipeline run --spec`` on the
head and goes away when the job ends); a serve spec becomes a ``RayService`` (a long-lived Ray
cluster running our Serve application from ``pipeline.serving.server:app_builder``). Either way
the spec file travels verbatim in a ConfigMap mounted at ``/etc/gpt2-pipeline/spec.yaml`` in
every pod, so the job that runs on a laptop runs unchanged on Kubernetes.

Worker pods are sized from the spec's engine: each replica needs the GPUs that
``runtime.replica_resources`` asks Ray for (``gpus_per_replica``); a worker pod holds at least one replica.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import Field

from pipeline.config import ConfigError, EngineConfig, Ingress, JobConfig, ServeConfig, _Strict, build, load_spec
from pipeline.runtime import WORKER_ENV

SPEC_DIR = "/etc/gpt2-pipeline"
SPEC_FILE = "spec.yaml"
PROJECT_DIR = "/home/ray/gpt2-pipeline"   # where deploy/kuberay/Dockerfile puts the project
HF_CACHE_DIR = "/home/ray/.cache/huggingface"
API_KEY_ENV = "GPT2_PIPELINE_API_KEY"     # read by pipeline.serving.server (same name)
GPU_RESOURCE = "nvidia.com/gpu"
LABELS = {"app.kubernetes.io/name": "gpt2-pipeline", "app.kubernetes.io/part-of": "gpt2-pipeline"}


class Kind(str, Enum):
    auto = "auto"              # a spec with input/output is a job, else a serve spec
    rayjob = "RayJob"
    rayservice = "RayService"


def _default_image() -> str:
    try:
        return f"gpt2-pipeline:{metadata.version('gpt2-pipeline')}"
    except metadata.PackageNotFoundError:
        return "gpt2-pipeline:latest"


def ray_version() -> str:
    """The Ray version the image must carry (KubeRay's ``rayVersion``): the one installed here."""
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return "2.60.0"


class K8sOptions(_Strict):
    """What ``gpt2-pipeline k8s render`` adds to a spec; everything else comes from the spec."""

    kind: Kind = Field(Kind.auto, description="RayJob for a job spec, RayService for a serve spec (auto: by content).")
    image: str = Field(default_factory=_default_image, description="Image with the project installed (deploy/kuberay/Dockerfile).")
    namespace: Optional[str] = Field(None, description="metadata.namespace (default: kubectl's current one).")
    name: Optional[str] = Field(None, description="Resource name (default: gpt2-<spec file stem>).")
    workers: Optional[int] = Field(None, ge=0, description="Worker pods (autoscaling serve specs: the most). Default from the engine.")
    gpus_per_worker: Optional[int] = Field(None, ge=0, description="GPUs per worker pod (default: what one replica needs).")
    cpus_per_worker: Optional[int] = Field(None, ge=1, description="CPUs per worker pod (default 4 per GPU, 4 on CPU workers).")
    memory_per_worker: Optional[str] = Field(None, description="Memory per worker pod (default 16Gi per GPU, 16Gi on CPU workers).")
    head_cpus: int = Field(4, ge=1, description="Head pod CPUs (job driver, Parquet read/write tasks, Serve proxy).")
    head_memory: str = Field("16Gi", description="Head pod memory.")
    hf_cache_pvc: Optional[str] = Field(None, description="PersistentVolumeClaim holding a Hugging Face cache, mounted read-only.")
    api_key_secret: Optional[str] = Field(None, description="Serve: Secret whose key 'api-key' becomes GPT2_PIPELINE_API_KEY.")
    service_account: Optional[str] = Field(None, description="Pods' ServiceAccount (e.g. one bound to an IAM role for s3://).")
    # Overrides of the spec, as `run`/`submit` flags take them: passed to the job's `run` command
    # (RayJob) or as Serve application args (RayService); the ConfigMap keeps the spec verbatim.
    input: Optional[str] = Field(None, description="Job: overrides the spec's input.")
    output: Optional[str] = Field(None, description="Job: overrides the spec's output.")
    replicas: Optional[int] = Field(None, ge=1, description="Overrides engine.replicas.")
    gpus_per_replica: Optional[float] = Field(None, ge=0, description="Overrides engine.gpus_per_replica.")
    tensor_parallel_size: Optional[int] = Field(None, ge=1, description="Overrides engine.tensor_parallel_size.")

    def engine_overrides(self) -> dict[str, Any]:
        keys = ("replicas", "gpus_per_replica", "tensor_parallel_size")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def job_overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("input", "output") if getattr(self, k) is not None}


def dns_name(text: str) -> str:
    """A DNS-1123 label (lowercase letters, digits, '-'; at most 50 chars, room for KubeRay's suffixes)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:50].strip("-")
    if not name:
        raise ConfigError(f"cannot make a Kubernetes name from {text!r}: pass --name")
    return name


def detect_kind(spec: dict[str, Any]) -> Kind:
    """Job specs name an input and an output; serve specs never do."""
    return Kind.rayjob if ("input" in spec or "output" in spec) else Kind.rayservice


def load(spec_path: Path, opts: Optional[K8sOptions] = None) -> tuple[Kind, JobConfig | ServeConfig, str]:
    """Read a spec and validate it, with the options' overrides, with our own config models;
    return its kind, config and text."""
    opts = opts or K8sOptions()
    spec = load_spec(spec_path)
    kind = detect_kind(spec) if opts.kind == Kind.auto else Kind(opts.kind)
    if kind == Kind.rayservice and opts.job_overrides():
        raise ConfigError("--input/--output are for job specs (RayJob), not for a serve spec")
    overrides = {**opts.job_overrides(), "engine": opts.engine_overrides()}
    cfg = build(JobConfig if kind == Kind.rayjob else ServeConfig, spec, overrides)
    return kind, cfg, Path(spec_path).read_text()


# ---- sizing -----------------------------------------------------------------------------------------
def replica_gpus(engine: EngineConfig) -> float:
    from pipeline.runtime import replica_resources

    return replica_resources(engine)["num_gpus"]


def gpus_per_worker(engine: EngineConfig, opts: K8sOptions) -> int:
    if opts.gpus_per_worker is not None:
        return opts.gpus_per_worker
    return math.ceil(replica_gpus(engine)) if replica_gpus(engine) > 0 else 0


def pods_for(replicas: int, engine: EngineConfig, gpw: int) -> int:
    """Worker pods that hold ``replicas`` engine replicas (GPU pods by GPUs, CPU pods one each)."""
    g = replica_gpus(engine)
    if g <= 0 or gpw <= 0:
        return replicas
    per_pod = max(1, math.floor(gpw / g + 1e-9)) if g <= gpw else 0
    if per_pod == 0:
        raise ConfigError(f"one replica needs {g:g} GPUs (gpus_per_replica) but a worker "
                          f"pod has {gpw}: raise --gpus-per-worker to at least {math.ceil(g)}")
    return math.ceil(replicas / per_pod)


# ---- pod templates ----------------------------------------------------------------------------------
def _resources(cpus: int, memory: str, gpus: int) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        amounts[GPU_RESOURCE] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod_template(container: str, opts: K8sOptions, config_map: str, resources: dict, ports: list[dict],
                  env: list[dict]) -> dict[str, Any]:
    mounts = [{"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "spec", "configMap": {"name": config_map}}]
    if opts.hf_cache_pvc:
        mounts.append({"name": "hf-cache", "mountPath": HF_CACHE_DIR, "readOnly": True})
        volumes.append({"name": "hf-cache", "persistentVolumeClaim": {"claimName": opts.hf_cache_pvc, "readOnly": True}})
    c: dict[str, Any] = {"name": container, "image": opts.image, "workingDir": PROJECT_DIR, "resources": resources,
                         "volumeMounts": mounts}
    if ports:
        c["ports"] = ports
    if env:
        c["env"] = env
    pod: dict[str, Any] = {"containers": [c], "volumes": volumes}
    if opts.service_account:
        pod["serviceAccountName"] = opts.service_account
    return {"metadata": {"labels": dict(LABELS)}, "spec": pod}


def _env(opts: K8sOptions) -> list[dict[str, Any]]:
    env = [{"name": k, "value": v} for k, v in WORKER_ENV.items() if k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    if opts.api_key_secret:
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": opts.api_key_secret, "key": "api-key"}}})
    return env


def _cluster(engine: EngineConfig, opts: K8sOptions, config_map: str, serve_port: Optional[int],
             min_replicas: Optional[int] = None, max_replicas: Optional[int] = None) -> dict[str, Any]:
    """A RayCluster spec: a CPU head and one worker group sized for the engine replicas."""
    gpw = gpus_per_worker(engine, opts)
    cpus = opts.cpus_per_worker or 4 * max(1, gpw)
    memory = opts.memory_per_worker or f"{16 * max(1, gpw)}Gi"
    env = _env(opts)
    ports = [{"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
             {"name": "client", "containerPort": 10001}]
    if serve_port is not None:
        ports.append({"name": "serve", "containerPort": serve_port})
    autoscaling = min_replicas is not None
    if autoscaling:
        low, high = pods_for(min_replicas or 0, engine, gpw), pods_for(max_replicas or 1, engine, gpw)
        if opts.workers is not None:
            high = max(low, opts.workers)
        count = max(low, 1) if high else 0
    else:
        count = low = high = opts.workers if opts.workers is not None else pods_for(engine.replicas, engine, gpw)
    head_params = {"num-gpus": "0"}
    cluster: dict[str, Any] = {
        "rayVersion": ray_version(),
        "headGroupSpec": {
            "rayStartParams": head_params,
            "template": _pod_template("ray-head", opts, config_map, _resources(opts.head_cpus, opts.head_memory, 0),
                                      ports, env),
        },
        "workerGroupSpecs": [{
            "groupName": "gpu" if gpw else "cpu",
            "replicas": count, "minReplicas": low, "maxReplicas": high,
            "rayStartParams": {},
            "template": _pod_template("ray-worker", opts, config_map, _resources(cpus, memory, gpw), [], env),
        }],
    }
    if autoscaling:
        cluster["enableInTreeAutoscaling"] = True
        cluster["autoscalerOptions"] = {"idleTimeoutSeconds": 300, "upscalingMode": "Default"}
    return cluster


def _metadata(name: str, opts: K8sOptions, instance: Optional[str] = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {**LABELS, "app.kubernetes.io/instance": instance or name}}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return meta


def _config_map(name: str, opts: K8sOptions, spec_text: str, instance: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(name, opts, instance),
            "data": {SPEC_FILE: spec_text}}


# ---- the two resources ------------------------------------------------------------------------------
# KubeRay pastes the entrypoint unquoted into the submitter's shell command line
# (`... ray job submit ... -- ENTRYPOINT ; fi ; ...`): flag values must be plain words.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_.:/@%+=,~-]+")


def _flag(key: str, value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    if not _PLAIN_WORD.fullmatch(text):
        raise ConfigError(f"--{key.replace('_', '-')} {text!r}: only letters, digits and _.:/@%+=,~- fit the job's "
                          "command line (KubeRay runs it through a shell); put this value in the spec instead")
    return f" --{key.replace('_', '-')} {text}"


def rayjob(job: JobConfig, name: str, opts: K8sOptions, config_map: str) -> dict[str, Any]:
    flags = "".join(_flag(k, v) for k, v in {**opts.job_overrides(), **opts.engine_overrides()}.items())
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(name, opts),
        "spec": {
            "entrypoint": f"gpt2-pipeline run --spec {SPEC_DIR}/{SPEC_FILE}{flags}",
            # The job runs in a copy of the image's project folder (as `gpt2-pipeline submit` ships
            # the local one), so relative paths in the spec (jobs/data/...) resolve as on a laptop.
            "runtimeEnvYAML": yaml.safe_dump({"working_dir": PROJECT_DIR}),
            # A resumable job retries on a fresh cluster and skips what it committed; others fail once.
            "backoffLimit": 2 if job.resume else 0,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": _cluster(job.engine, opts, config_map, serve_port=None),
        },
    }


def serve_config(cfg: ServeConfig, engine_overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The Serve config (KubeRay's ``serveConfigV2``) running our app from the mounted spec."""
    args: dict[str, Any] = {"spec": f"{SPEC_DIR}/{SPEC_FILE}"}
    if engine_overrides:
        args["engine"] = dict(engine_overrides)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": cfg.port},
        "applications": [{
            "name": cfg.name, "route_prefix": "/",
            "import_path": "pipeline.serving.server:app_builder",
            "args": args,
            "runtime_env": {"env_vars": dict(WORKER_ENV)},
        }],
    }


def rayservice(cfg: ServeConfig, name: str, opts: K8sOptions, config_map: str) -> dict[str, Any]:
    if cfg.ingress == Ingress.direct:
        raise ConfigError("ingress 'direct' does not fit KubeRay (Serve's proxy listens on every pod): use 'auto' or 'proxy'")
    if cfg.api_key:
        raise ConfigError("api_key in the spec would be stored in a ConfigMap: remove it and pass "
                          "--api-key-secret NAME (a Secret with the key 'api-key')")
    low, high = (None, None)
    if cfg.autoscaling:
        low = cfg.min_replicas if cfg.min_replicas is not None else 1
        high = cfg.max_replicas or max(low, cfg.engine.replicas)
    cluster = _cluster(cfg.engine, opts, config_map, serve_port=cfg.port, min_replicas=low, max_replicas=high)
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": _metadata(name, opts),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(cfg, opts.engine_overrides()), sort_keys=False),
            "rayClusterConfig": cluster,
        },
    }


def render(spec_path: Path, opts: K8sOptions) -> tuple[list[dict[str, Any]], list[str]]:
    """The manifests (ConfigMap + RayJob or RayService) for a spec, and warnings for the user."""
    kind, cfg, text = load(spec_path, opts)
    name = dns_name(opts.name or f"gpt2-{Path(spec_path).stem}")
    config_map = f"{name}-spec"
    warnings: list[str] = []
    if kind == Kind.rayjob:
        assert isinstance(cfg, JobConfig)
        if "://" not in cfg.output:
            warnings.append(f"output {cfg.output!r} is a path inside the head pod and is lost with it: "
                            "use an s3:// or gs:// output (or mount a volume there)")
        if cfg.address:
            warnings.append("the spec's address is ignored on KubeRay: the job joins its own cluster")
        resource = rayjob(cfg, name, opts, config_map)
    else:
        assert isinstance(cfg, ServeConfig)
        resource = rayservice(cfg, name, opts, config_map)
    if replica_gpus(cfg.engine) == 0:
        warnings.append("the spec's engine asks for no GPUs (gpus_per_replica 0): replicas run on CPU workers")
    return [_config_map(config_map, opts, text, name), resource], warnings


def dump(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML; multi-line strings (the spec, serveConfigV2) as literal blocks."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors: plain, repeated blocks
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)
