"""A replica's death mid-batch loses nothing: on a two-replica application, ``ray.kill`` of the
replica that answers slices but does not own the batch runner (the job fails, the runner resumes
it), then of the replica that owns the runner (the runner dies with it; a new one resumes the
batch from storage). Either way the batch ends ``completed`` with every custom_id exactly once."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.serving.conftest import free_port, wait_healthy
from tests.serving.test_batches_api import check_each_once, request_lines, wait_status

APP = "gpt2-replica-death"
N, BAD = 400, (11, 250)


def replicas() -> list[dict]:
    """The application's live replica actors, with their worker address (Ray's actor table)."""
    from ray._private.state import actors

    return [a for a in actors().values()
            if a["ActorClassName"].startswith(f"ServeReplica:{APP}:") and a["State"] == "ALIVE"]


def runner_info() -> dict:
    from ray._private.state import actors

    (found,) = [a for a in actors().values() if a["Name"] == f"batches:{APP}" and a["State"] == "ALIVE"]
    return found


def address(actor: dict, key: str = "Address") -> tuple[str, int]:
    return actor[key]["IPAddress"], actor[key]["Port"]


def wait_replicas(n: int, timeout: float = 900) -> list[dict]:
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        app = serve.status().applications.get(APP)
        running = app.deployments["LLMServer"].replica_states.get("RUNNING", 0) if app else 0
        if running == n and len(found := replicas()) == n:
            return found
        assert time.monotonic() < deadline, f"{running} of {n} replicas running"
        time.sleep(1)


def wait_runner(timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return runner_info()
        except ValueError:  # none alive yet
            assert time.monotonic() < deadline, "no batch runner came back"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def fleet(ray_cluster, tmp_path_factory):
    from ray import serve

    from pipeline.config import ServeConfig
    from pipeline.serving.server import build_app

    storage = tmp_path_factory.mktemp("replica-death-storage")
    port = free_port()
    cfg = ServeConfig(name=APP, port=port, ingress="direct", embeddings=False, max_batch_in_flight=4,
                      engine={"model": "demo", "replicas": 2}, batches={"storage": str(storage), "batch_size": 8})
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # kept if Serve already runs
    serve.run(build_app(cfg), name=APP, route_prefix=f"/{APP}", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    wait_replicas(2)
    yield url, storage
    serve.delete(APP)


def run_and_kill(oai: openai.OpenAI, prefix: str, owner: bool) -> tuple[openai.types.Batch, dict, dict]:
    """Start a batch, kill a replica once some answers are committed, wait for the batch's end.
    ``owner``: kill the replica that owns the runner, else the other one."""
    import ray

    up = oai.files.create(file=(f"{prefix}.jsonl", request_lines(N, bad=BAD, max_tokens=32, prefix=prefix)),
                          purpose="batch")
    batch = oai.batches.create(input_file_id=up.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 600
    while (now := oai.batches.retrieve(batch.id)).request_counts.completed == 0:
        assert now.status in ("validating", "in_progress") and time.monotonic() < deadline, now
        time.sleep(0.2)
    runner = runner_info()
    (victim,) = [r for r in wait_replicas(2) if (address(r) == address(runner, "OwnerAddress")) == owner]
    assert now.status == "in_progress" and now.request_counts.completed < N
    ray.kill(ray.get_actor(victim["Name"], namespace="serve"))
    done = wait_status(oai, batch.id, {"completed", "failed", "cancelled", "expired"}, timeout=900)
    return done, runner, victim


def check_once(oai: openai.OpenAI, storage, done: openai.types.Batch, prefix: str) -> None:
    _, errors = check_each_once(oai, done, N, BAD, prefix=prefix)
    assert {r["response"]["status_code"] for r in errors} == {400}  # only the refused bodies
    summary = json.loads((storage / "batches" / done.id / "_summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["duplicates"] == 0


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_replica_death_mid_batch_loses_nothing(fleet):
    url, storage = fleet
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=5, timeout=120)

    # The replica answering slices dies, the runner lives: the failed job is resumed.
    done, runner, victim = run_and_kill(oai, "slices", owner=False)
    check_once(oai, storage, done, "slices")
    assert runner_info()["ActorID"] == runner["ActorID"]  # the same runner finished it

    # The runner's owner dies, and the runner with it: a new runner resumes the batch from storage.
    wait_replicas(2)
    done, runner, victim = run_and_kill(oai, "owner", owner=True)
    check_once(oai, storage, done, "owner")
    assert wait_runner()["ActorID"] != runner["ActorID"]
    wait_replicas(2)
