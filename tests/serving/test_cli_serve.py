"""`gpt2-pipeline serve` as a user runs it: a subprocess with its own embedded Ray, an API key."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import free_port, send_chunked, wait_healthy


@contextmanager
def serve_process(log: Path, model: str, name: str, env: dict) -> Iterator[str]:
    """``gpt2-pipeline serve`` of ``model`` in a subprocess (output to ``log``), healthy; its URL.
    Stopped with Ctrl-C as a user would, killed if it does not leave."""
    port = free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "serve", "--model", model, "--port", str(port), "--no-embeddings",
             "--name", name, "--num-cpus", "4"],
            stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc=proc)  # a server that exits fails the test at once
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(log, "demo", "keyed", {**os.environ, "GPT2_PIPELINE_API_KEY": "s3cret-key"}) as url:
        # a direct-ingress replica answers as soon as it listens; the CLI prints its banner once
        # Serve reports the whole application ready, a moment later
        deadline = time.monotonic() + 180
        while "serving demo at" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(1)
        yield url, log


def test_api_key_required_except_health(keyed_server):
    url, log = keyed_server
    assert httpx.get(f"{url}/health").status_code == 200
    body = {"model": "demo", "prompt": "hi", "max_tokens": 2}
    no_key = httpx.post(f"{url}/v1/completions", json=body)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/metrics").status_code == 401
    ok = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret-key"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    text = log.read_text()
    assert "s3cret-key" not in text  # the key is never logged
    assert f"serving demo at {url}/v1" in text  # loopback by default
    assert "direct ingress" in text  # embedded Ray, fixed replicas: the replica answers HTTP itself


def test_direct_ingress_bounds_a_chunked_body(keyed_server):
    url, _ = keyed_server
    status, sent, body = send_chunked(url, "/v1/completions", total=64 * 2**20, chunk=16 * 1024,
                                      headers={"Authorization": "Bearer s3cret-key"})
    assert status == 413 and b"request body over" in body, body[:200]
    assert sent < 32 * 2**20


def test_embeddings_disabled_is_a_clear_404(keyed_server):
    url, _ = keyed_server
    r = httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer s3cret-key"})
    assert r.status_code == 404 and "disabled" in r.json()["error"]["message"]


def test_replica_death_is_replaced_and_traffic_recovers(keyed_server):
    """Kill the replica's actor (and its vLLM engine) during traffic: Serve replaces it."""
    import threading

    import psutil

    url, _ = keyed_server
    headers = {"Authorization": "Bearer s3cret-key"}
    body = {"model": "demo", "prompt": "During the crash", "max_tokens": 16}
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                try:
                    statuses.append(c.post(f"{url}/v1/completions", json=body, headers=headers).status_code)
                except httpx.HTTPError:
                    statuses.append(-1)  # connection dropped mid-request: an error, not a hang
                time.sleep(0.05)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    time.sleep(2)
    replicas = [p for p in psutil.process_iter(["cmdline"])
                if (p.info["cmdline"] or [""])[0].startswith("ray::ServeReplica:keyed")]
    assert len(replicas) == 1
    victim = replicas[0]
    for p in [*victim.children(recursive=True), victim]:
        p.kill()
    deadline = time.monotonic() + 300
    recovered = False
    while time.monotonic() < deadline and not recovered:
        time.sleep(2)
        recovered = statuses[-3:] == [200, 200, 200]
    stop.set()
    thread.join(60)
    assert recovered, statuses[-20:]
    assert 200 in statuses[:5]  # it served before the crash
    assert httpx.get(f"{url}/health", timeout=60).status_code == 200


def test_a_server_on_the_124m_shape_compiles_its_model(tmp_path):
    """``serve`` on a model past ``demo``'s size compiles its generation engine: vLLM's compiled
    graphs land in the compile cache (``VLLM_CACHE_ROOT``, here a new folder), and it answers."""
    cache = tmp_path / "vllm"
    env = {**os.environ, "VLLM_CACHE_ROOT": str(cache)}
    with serve_process(tmp_path / "serve.log", "gpt2-small-random", "compiled", env) as url:
        r = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": "gpt2-small-random", "prompt": "The city", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        assert any((cache / "torch_compile_cache").rglob("*")), "no compiled graphs: the engine ran eagerly"
