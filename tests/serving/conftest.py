"""One real Serve application on the demo model for the serving tests (real HTTP on loopback)."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import pytest

APP = "gpt2-test"
# Small bounds so overload is reachable with a few dozen requests on a 2-core machine.
MAX_IN_FLIGHT = 8
MAX_QUEUED = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 600, headers: dict | None = None, proc: Any = None) -> None:
    """Wait until ``url`` answers /health; ``proc`` (a started server's Popen): fail at once if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before {url} became healthy")
        try:
            if httpx.get(f"{url}/health", timeout=5, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} did not become healthy")


@pytest.fixture(scope="session")
def batch_storage(tmp_path_factory):
    """The Batch API's storage for the session's server (files, batch state, results)."""
    return tmp_path_factory.mktemp("batch-storage")


@pytest.fixture(scope="session")
def server(ray_cluster, batch_storage):
    from ray import serve

    from pipeline.config import ServeConfig
    from pipeline.serving.server import build_app

    port = free_port()
    cfg = ServeConfig(
        name=APP, port=port, max_queued_requests=MAX_QUEUED, max_batch_in_flight=4,
        engine={"model": "demo", "max_in_flight": MAX_IN_FLIGHT},
        batches={"storage": str(batch_storage), "max_file_bytes": 64 * 1024, "batch_size": 8,
                 "completion_windows": ["24h", "1s"]},  # 1s: expiry is reachable in a test
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=APP, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    yield url
    serve.delete(APP)


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


def send_chunked(url: str, path: str, total: int, chunk: int = 64 * 1024, pause: float = 0.0,
                 headers: dict | None = None) -> tuple[int, int, bytes]:
    """POST up to ``total`` body bytes with ``Transfer-Encoding: chunked`` (no Content-Length),
    the way a streaming client sends them, stopping as soon as the server answers.

    ``pause``: seconds between chunks (a slow drip). Returns (status, bytes sent, response body).
    A raw socket on purpose: an HTTP client library writes the whole body before it reads."""
    import select
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            "Transfer-Encoding: chunked", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sent = 0
    with socket.create_connection((host, port), timeout=120) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        body = b'{"prompt": "' + b"a" * chunk
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:
                piece = body if sent == 0 else b"a" * chunk
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                sent += len(piece)
                if pause:
                    time.sleep(pause)
            if sent >= total:
                sock.sendall(b'2\r\n"}\r\n0\r\n\r\n')
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        response = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            response += data
    status_line, _, rest = response.partition(b"\r\n")
    status = int(status_line.split()[1]) if status_line else 0
    return status, sent, rest.partition(b"\r\n\r\n")[2]
