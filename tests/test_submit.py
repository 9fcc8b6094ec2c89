"""Job submission through the Ray Jobs API, against a REAL local Ray head with a dashboard.

The head runs in its own session (``ray start --head --block``) with its own temp dir and free
ports on 127.0.0.1, so it never touches another Ray on this machine; teardown ends exactly the
processes it started, by id (never ``ray stop``, which would stop every Ray here).
Jobs use the built-in ``demo`` model and 16 prompts: most of their time is vLLM's engine start.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import kill_tree
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SPEC = "jobs/demo.yaml"
ROWS = 16


# ---- the head -------------------------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # a throwaway head: no 30 s drain on SIGTERM
    return env


@pytest.fixture(scope="module")
def head():
    """A local Ray head with the dashboard (Jobs API); yields its URL."""
    tmp = tempfile.mkdtemp(prefix="g2p-ray-", dir="/tmp")  # short: Ray's socket paths are limited
    gcs, dash, client, agent, agent_grpc, rt_env, metrics, node_mgr, obj_mgr = _free_ports(9)
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
        "--node-ip-address=127.0.0.1", "--num-cpus=8", f"--temp-dir={tmp}", "--disable-usage-stats",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        f"--object-store-memory={256 * 1024 * 1024}",
    ]
    log = open(Path(tmp) / "head.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    auth_mode = os.environ.get("RAY_AUTH_MODE")  # connect() may switch this process to token mode
    try:
        from pipeline.submit import SubmitError, connect

        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}: {(Path(tmp) / 'head.log').read_text()[-2000:]}")
            try:
                connect(url)
                break
            except SubmitError:
                if time.monotonic() > deadline:
                    pytest.fail("the Ray dashboard did not come up in 180 s")
                time.sleep(1)
        yield url
    finally:
        kill_tree(proc, grace=3)  # a throwaway head: `ray start --block` stops its processes on SIGTERM
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("submit") / "prompts.parquet"
    pq.write_table(pa.table({"id": list(range(ROWS)), "prompt": [f"Prompt number {i} says" for i in range(ROWS)]}), path)
    return path


# ---- against the real head ------------------------------------------------------------------------
@pytest.mark.timeout(900)
def test_submit_follow_succeeds_with_every_id_once(head, prompts, tmp_path):
    out = tmp_path / "out"
    r = cli("submit", SPEC, "--address", head, "--input", str(prompts), "--output", str(out),
            "--max-tokens", "8", "--batch-size", "4", "--follow")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.splitlines()[0].strip()
    assert job_id.startswith("demo-")
    assert "job succeeded" in r.stdout  # the run command's summary, streamed from the driver
    assert "SUCCEEDED" in r.stderr

    shards = sorted(out.glob("part-*.parquet"))
    assert shards and (out / "_SUCCESS").is_file()
    ids = pa.concat_tables([pq.read_table(s, columns=["id", "error"]) for s in shards])
    assert sorted(ids["id"].to_pylist()) == list(range(ROWS))  # every input id, exactly once
    assert ids["error"].null_count == ROWS

    status = cli("jobs", "status", job_id, "--address", head, timeout=120)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and str(out) in status.stdout
    listing = cli("jobs", "list", "--address", head, timeout=120)
    assert listing.returncode == 0 and job_id in listing.stdout
    logs = cli("jobs", "logs", job_id, "--address", head, timeout=120)
    assert logs.returncode == 0 and "job succeeded" in logs.stdout


def _engine_actors(url: str) -> list:
    """Live Ray Data actor-pool workers (the engine replicas). Ray Data's detached helpers
    (stats, autoscaling coordinator) outlive jobs by design and are not counted."""
    from ray.util.state import list_actors

    actors = list_actors(address=url, filters=[("state", "!=", "DEAD")], raise_on_missing_output=False)
    return [a for a in actors if a.class_name.startswith("MapWorker")]


def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


@pytest.mark.timeout(600)
def test_stop_a_running_job(head, prompts, tmp_path):
    r = cli("submit", SPEC, "--address", head, "--input", str(prompts), "--output", str(tmp_path / "out"),
            "--max-tokens", "8", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = r.stdout.splitlines()[0].strip()
    from pipeline import submit as sub

    client = sub.connect(head)
    _until(lambda: sub.status_of(client.get_job_info(job_id)) != "PENDING", 120, "the job to start")
    assert sub.status_of(client.get_job_info(job_id)) == "RUNNING"
    _until(lambda: _engine_actors(head), 180, "the job's engine actor")  # stop it mid-way, engines starting

    stopped = cli("jobs", "stop", job_id, "--address", head, timeout=180)
    assert stopped.returncode == 0, stopped.stderr
    assert "STOPPED" in stopped.stderr
    assert sub.status_of(client.get_job_info(job_id)) == "STOPPED"
    _until(lambda: not _engine_actors(head), 120, "the stopped job's engines to go away")  # resources freed
    # Stopped like Ctrl-C: the driver recorded an interrupted (resumable) job, no _SUCCESS.
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["status"] == "interrupted" and "--resume" in summary["message"]
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    again = cli("jobs", "stop", job_id, "--address", head, timeout=120)
    assert again.returncode == 0 and "not running" in again.stdout


@pytest.mark.timeout(120)
def test_unknown_job_id_and_unreachable_address(head):
    r = cli("jobs", "status", "no-such-job", "--address", head, timeout=60)
    assert r.returncode == 2 and "no job 'no-such-job'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("jobs", "logs", "no-such-job", "--address", head, timeout=60)
    assert r.returncode == 2 and "no job" in r.stderr
    port = _free_ports(1)[0]
    r = cli("submit", SPEC, "--address", f"http://127.0.0.1:{port}", timeout=60)
    assert r.returncode == 2 and "cannot reach the Ray Jobs API" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- without a cluster ----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def _options(command: str) -> set[str]:
    """The long option names a command of the CLI takes (from Click's own parameter list)."""
    import typer.main

    from pipeline.cli import app

    group = typer.main.get_command(app)
    return {o for p in group.commands[command].params for o in p.opts + p.secondary_opts if o.startswith("--")}


def test_submit_takes_every_run_option():
    """`submit` runs `run` on the cluster: every flag of `run` reaches it (declared once, cli/jobflags.py)."""
    run, submit = _options("run"), _options("submit")
    assert run - submit == {"--spec"}, f"run flags missing from submit: {sorted(run - submit)}"  # its SPEC argument
    assert submit - run == {"--follow", "--submission-id", "--working-dir"}
    assert {"--input-format", "--dedupe", "--logprobs", "--stride", "--score-first-token", "--token-logprobs",
            "--via-serve", "--no-truncate"} <= submit
    assert _options("score") <= run and _options("embed") <= run


def test_a_run_flag_given_to_submit_reaches_the_remote_run(tmp_path):
    """What submit sends: the flags spelled as `run` arguments, validated here first like `run`."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    r = CliRunner().invoke(app, ["submit", SPEC, "--address", "http://127.0.0.1:1", "--dedupe", "first",
                                 "--input-format", "csv", "--stride", "0"])
    assert r.exit_code == 2 and "stride" in r.output  # refused before any connection, as `run` refuses it


def test_missing_spec_and_no_address(monkeypatch):
    from pipeline.cli import app

    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    r = runner.invoke(app, ["submit", "jobs/no-such.yaml", "--address", "http://127.0.0.1:1"])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["jobs", "list"])
    assert r.exit_code == 2 and "no Ray cluster address" in r.output


@pytest.mark.timeout(60)
def test_submit_without_address_runs_here_like_run(monkeypatch, tmp_path):
    import pipeline.report
    from pipeline.batch import Summary
    from pipeline.cli import app

    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    seen = []

    def fake_run(job, verbose=False):
        seen.append(job)
        return Summary(status="succeeded", output=job.output, rows_in=1)

    monkeypatch.setattr(pipeline.report, "run_with_progress", fake_run)
    monkeypatch.chdir(ROOT)
    r = CliRunner().invoke(app, ["submit", SPEC, "--output", str(tmp_path / "o"), "--max-tokens", "3", "--gpus-per-replica", "0"])
    assert r.exit_code == 0, r.output
    (job,) = seen
    assert (job.output, job.sampling.max_tokens, job.engine.model, job.input) == (
        str(tmp_path / "o"), 3, "demo", "jobs/data/prompts.parquet")


def test_entrypoint_and_runtime_env(tmp_path, tmp_path_factory, monkeypatch):
    from pipeline import submit as sub
    from pipeline.cli.jobflags import job_overrides, run_args
    from pipeline.config import Dedupe

    flags = {"output": "s3://b/o", "overwrite": True, "resume": None, "force": False, "max_tokens": 8, "replicas": 2,
             "stop": ["\n", "END"], "ignore_eos": False, "dedupe": Dedupe.first, "passthrough": [], "eager": False}
    assert run_args(flags) == ["--output", "s3://b/o", "--overwrite", "--max-tokens", "8", "--replicas", "2",
                               "--stop", "\n", "--stop", "END", "--no-ignore-eos", "--dedupe", "first", "--no-eager"]
    assert job_overrides(flags) == {"output": "s3://b/o", "overwrite": True, "force": False, "dedupe": "first",
                                    "sampling": {"max_tokens": 8, "stop": ["\n", "END"], "ignore_eos": False},
                                    "engine": {"replicas": 2, "enforce_eager": False}}
    _, workdir, rel, warnings = sub.prepare(ROOT / SPEC, {"output": "s3://b/o"})
    assert (workdir, rel, warnings) == (ROOT, SPEC, [])
    _, _, _, warnings = sub.prepare(ROOT / SPEC, {})
    assert any("relative" in w for w in warnings)  # out/demo would stay in the job's temp copy

    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.parquet").write_bytes(b"0")
    (tmp_path / "big.parquet").write_bytes(b"0" * sub.LARGE_FILE_BYTES)
    (tmp_path / "input.parquet").write_bytes(b"0" * sub.LARGE_FILE_BYTES)
    env, warnings = sub.runtime_env(tmp_path, keep=[tmp_path / "input.parquet"])
    assert env["working_dir"] == str(tmp_path) and "/out/" in env["excludes"] and ".git" in env["excludes"]
    assert "/big.parquet" in env["excludes"] and "/input.parquet" not in env["excludes"]
    assert warnings == [f"not shipped (over {sub.LARGE_FILE_BYTES >> 20} MiB): big.parquet"]
    assert sub.project_dir(tmp_path / "pipeline" / "__init__.py") == tmp_path
    elsewhere = tmp_path_factory.mktemp("specs") / "bulk.yaml"
    monkeypatch.chdir(elsewhere.parent)
    assert sub.project_dir(elsewhere) == elsewhere.parent  # no project around: ship the spec's folder


def test_address_resolution(monkeypatch):
    from pipeline.submit import resolve_address

    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_address(None) is None
    assert resolve_address("127.0.0.1:8265") == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9999")
    assert resolve_address(None) == "http://127.0.0.1:9999"
    assert resolve_address("http://127.0.0.1:8265") == "http://127.0.0.1:8265"  # the flag wins
