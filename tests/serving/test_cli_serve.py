"""`gpt2-pipeline serve` as a user runs it: a subprocess with its own embedded Ray, an API key."""

import os
import signal
import subprocess
import sys

import httpx
import pytest

from tests.serving.conftest import free_port, wait_healthy


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "GPT2_PIPELINE_API_KEY": "s3cret-key"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "serve", "--model", "demo", "--port", str(port), "--no-embeddings",
             "--name", "keyed", "--num-cpus", "4"],
            stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield url, log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


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


def test_embeddings_disabled_is_a_clear_404(keyed_server):
    url, _ = keyed_server
    r = httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer s3cret-key"})
    assert r.status_code == 404 and "disabled" in r.json()["error"]["message"]
