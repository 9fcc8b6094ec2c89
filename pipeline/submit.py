"""Ray Jobs submission: ship the project and a job spec to a cluster, then list, follow and stop jobs.

A submitted job runs ``python -m pipeline run --spec <spec>`` (plus flag overrides) on the head
node, inside a copy of the project folder (the runtime_env ``working_dir``), so the cluster runs
the code and the spec you have here. Ray is imported inside the functions: importing this module
stays cheap.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from pipeline.config import JobConfig, build, load_spec

ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # what Ray's own client reads, in order
# Never shipped with a job (gitignore syntax, relative to the project folder); .gitignore'd files
# are skipped by Ray as well.
EXCLUDES = [
    ".git", "/out/", "/benchmarks/results/", ".venv/", "venv/", "__pycache__/", "*.pyc", ".pytest_cache/",
    ".ruff_cache/", ".mypy_cache/", "*.egg-info/", "/build/", "/dist/", ".ipynb_checkpoints/",
    "*.safetensors", "*.bin", "*.pt", "*.ckpt", "*.whl",
]
LARGE_FILE_BYTES = 10 * 1024 * 1024  # other files this big stay behind too (inputs belong in s3://)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STOP_WAIT_S = 30
META_KEY = "gpt2_pipeline"

class SubmitError(Exception):
    """A user-facing submission problem: one line, no traceback."""


@dataclass
class Submission:
    submission_id: str
    address: str
    entrypoint: str
    spec: str
    job: JobConfig
    client: Any = None
    warnings: list[str] = field(default_factory=list)


# ---- flags, specs, working dir ---------------------------------------------------------------------
def resolve_address(address: Optional[str]) -> Optional[str]:
    """``--address``, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else None; ``host:port`` means http."""
    address = address or next((os.environ[k] for k in ADDRESS_ENV if os.environ.get(k)), None)
    if not address:
        return None
    return address if "://" in address else f"http://{address}"


def project_dir(spec: Path) -> Path:
    """The folder shipped as the working dir: the nearest one above ``spec`` (else above the current
    folder) holding ``pyproject.toml`` and ``pipeline/``; else the spec's own folder (the cluster
    then runs its installed gpt2-pipeline)."""
    for start in (spec.resolve().parent, Path.cwd().resolve()):
        for d in (start, *start.parents):
            if (d / "pyproject.toml").is_file() and (d / "pipeline" / "__init__.py").is_file():
                return d
    return spec.resolve().parent


def _is_local_relative(path: str) -> bool:
    return "://" not in path and not os.path.isabs(os.path.expanduser(path))


def _excluded(patterns: list[str]) -> Any:
    """gitignore-style matcher, the one Ray applies to ``excludes`` (vendored in Ray)."""
    from ray._private.thirdparty.pathspec import PathSpec

    return PathSpec.from_lines("gitwildmatch", patterns)


def runtime_env(workdir: Path, keep: list[Path]) -> tuple[dict[str, Any], list[str]]:
    """The job's runtime_env: the project folder minus EXCLUDES and large files (except ``keep``)."""
    skip = _excluded(EXCLUDES)
    keep_set = {p.resolve() for p in keep}
    large: list[str] = []
    for root, dirs, files in os.walk(workdir):
        rel_root = Path(root).relative_to(workdir)
        dirs[:] = [d for d in dirs if not skip.match_file(f"{(rel_root / d).as_posix()}/")]
        for f in files:
            rel = (rel_root / f).as_posix()
            p = Path(root) / f
            if skip.match_file(rel) or p.resolve() in keep_set or any(k in p.resolve().parents for k in keep_set):
                continue
            try:
                if p.stat().st_size >= LARGE_FILE_BYTES:
                    large.append(rel)
            except OSError:
                continue
    env = {
        "working_dir": str(workdir),
        "excludes": EXCLUDES + [f"/{rel}" for rel in large],
        "env_vars": {
            "PYTHONUNBUFFERED": "1",  # logs reach `jobs logs --follow` as they happen
            # `jobs stop` interrupts the driver like Ctrl-C: it writes its summary (resumable) and
            # exits; Ray kills it only if that takes longer than STOP_WAIT_S.
            "RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S),
        },
    }
    warnings = [f"not shipped (over {LARGE_FILE_BYTES >> 20} MiB): {rel}" for rel in large]
    return env, warnings


def prepare(spec: Path, overrides: dict[str, Any], working_dir: Optional[Path] = None
            ) -> tuple[JobConfig, Path, str, list[str]]:
    """Validate the spec with the flags' ``overrides`` (as ``run`` would) and find what to ship.

    Returns the job, the working dir, the spec path inside it and warnings. Raises ConfigError or
    SubmitError."""
    job: JobConfig = build(JobConfig, load_spec(spec), overrides)
    workdir = (working_dir or project_dir(spec)).resolve()
    try:
        rel = spec.resolve().relative_to(workdir).as_posix()
    except ValueError:
        raise SubmitError(
            f"spec {str(spec)!r} is outside the project folder {str(workdir)!r} that is shipped to the "
            "cluster; move it there or pass --working-dir"
        ) from None
    if _excluded(EXCLUDES).match_file(rel):
        raise SubmitError(f"spec {rel!r} is in a folder that is never shipped ({', '.join(EXCLUDES[:3])}, ...)")
    warnings = []
    if _is_local_relative(job.input) and not any(ch in job.input for ch in "*?[") and not (workdir / job.input).exists():
        raise SubmitError(f"input {job.input!r} is not in the project folder {str(workdir)!r} shipped to the cluster")
    if not _is_local_relative(job.input) and "://" not in job.input:
        warnings.append(f"input {job.input!r} must exist on the cluster's head node (or use s3://, gs://)")
    if _is_local_relative(job.output):
        warnings.append(
            f"output {job.output!r} is relative: it lands in the job's copy of the project on the head node; "
            "pass --output s3://... (or an absolute path on shared storage) to keep it"
        )
    return job, workdir, rel, warnings


# ---- the Jobs API ----------------------------------------------------------------------------------
def quiet_ray_logs() -> None:
    """Keep Ray's client chatter (packaging, uploads, sockets) off a command's output."""
    import logging

    import ray  # noqa: F401  (configures the "ray" logger; set its level after that)

    logging.getLogger("ray").setLevel(logging.ERROR)


@contextmanager
def _address_env_cleared() -> Iterator[None]:
    """Ray's client prefers RAY_ADDRESS over its argument; make the resolved address win."""
    saved = {k: os.environ.pop(k) for k in ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str) -> Any:
    """A JobSubmissionClient for ``address`` (the dashboard URL, e.g. http://127.0.0.1:8265)."""
    from ray.job_submission import JobSubmissionClient

    for attempt in (1, 2):
        try:
            with _address_env_cleared():
                return JobSubmissionClient(address)
        except Exception as exc:  # ConnectionError, requests errors, AuthenticationError, versions
            auth = type(exc).__name__ == "AuthenticationError" or "401" in str(exc) or "Unauthorized" in str(exc)
            if auth and attempt == 1 and _use_local_token():
                continue
            if auth:
                raise SubmitError(
                    f"the Ray cluster at {address} wants a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                    "(from `ray get-auth-token` on the head)"
                ) from None
            raise SubmitError(f"cannot reach the Ray Jobs API at {address} ({type(exc).__name__}); is the cluster up?") from None
    raise AssertionError("unreachable")


def _use_local_token() -> bool:
    """Ray 2.60's `ray start` enables token auth when ~/.ray/auth_token exists and RAY_AUTH_MODE is
    unset, but its Jobs client sends the token only if RAY_AUTH_MODE=token. Do what ``ray.init``
    does when it connects: use the local token. True if there is one."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return False
    import logging

    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = log.level
    log.setLevel(logging.ERROR)  # its "token authentication is enabled" warning is noise here
    try:
        return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        log.setLevel(level)


def submit(spec: Path, address: str, overrides: dict[str, Any], run_args: list[str], *,
           working_dir: Optional[Path] = None, submission_id: Optional[str] = None, verbose: bool = False,
           client: Any = None) -> Submission:
    """Submit ``spec`` as a Ray job that runs ``run --spec SPEC RUN_ARGS`` (the flags given here,
    ``overrides`` being the same flags as JobConfig keys); returns without waiting for it."""
    job, workdir, rel, warnings = prepare(spec, overrides, working_dir)
    env, more = runtime_env(workdir, keep=[spec, *([workdir / job.input] if _is_local_relative(job.input) else [])])
    args = ["python", "-m", "pipeline", "run", "--spec", rel, *run_args, *(["--verbose"] if verbose else [])]
    entrypoint = shlex.join(args)
    sid = submission_id or f"{spec.stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    client = client or connect(address)
    metadata = {META_KEY: "1", "spec": rel, "output": job.output, "model": job.engine.model, "task": str(job.task)}
    try:
        sid = client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=sid, metadata=metadata)
    except Exception as exc:
        raise SubmitError(f"submission to {address} failed: {_one_line(exc)}") from None
    return Submission(sid, address, entrypoint, rel, job, client, warnings + more)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) < 400 else text[:400] + "..."


def info(client: Any, job_id: str, address: str) -> Any:
    """JobDetails for ``job_id``; SubmitError if the cluster does not know it."""
    try:
        return client.get_job_info(job_id)
    except Exception as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise SubmitError(f"no job {job_id!r} on {address} (see `gpt2-pipeline jobs list`)") from None
        raise SubmitError(f"cannot get job {job_id!r} from {address}: {_one_line(exc)}") from None


def list_jobs(client: Any) -> list[Any]:
    """All jobs on the cluster, oldest first."""
    return sorted(client.list_jobs(), key=lambda j: j.start_time or 0)


def follow(client: Any, job_id: str, write: Callable[[str], Any]) -> str:
    """Stream the job's logs to ``write`` until it ends (``tail_job_logs``); return its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the log socket closed early; the status below tells what happened
        write(f"\n[log stream ended: {_one_line(exc)}]\n")
    return wait(client, job_id, timeout=30)


def wait(client: Any, job_id: str, timeout: float = 600, poll: float = 0.5) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or ``timeout`` passes); the last status."""
    deadline = time.monotonic() + timeout
    while True:
        current = client.get_job_status(job_id)
        status = str(getattr(current, "value", current))
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll)


def status_of(details: Any) -> str:
    return str(getattr(details.status, "value", details.status))
