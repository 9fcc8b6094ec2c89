"""Hub ids are downloaded on first use: a hub of our own on 127.0.0.1 (the API that huggingface_hub
calls: revision info, tree listing, HEAD/GET resolve) serves the demo checkpoint through HF_ENDPOINT.

Each resolution runs in a fresh process, as a CLI run would: huggingface_hub reads HF_ENDPOINT and
HF_HUB_OFFLINE when it is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

REPO = "acme/gpt2-tiny"
COMMIT = "c0ffee" + "0" * 34
NEEDED = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}
# Files a real GPT-2 repo also has, which a download must skip.
EXTRA = {"onnx/decoder_model.onnx": b"onnx", "flax_model.msgpack": b"flax", "pytorch_model.bin": b"torch",
         "64.tflite": b"tflite", "README.md": b"# tiny"}


class FakeHub(ThreadingHTTPServer):
    """A model repo over HTTP; ``cut`` names files whose body stops halfway (and whose resumption fails)."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files = files
        self.requests: list[tuple[str, str]] = []
        self.cut: set[str] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def file_gets(self) -> list[str]:
        prefix = f"/{REPO}/resolve/"
        return sorted(p[len(prefix):].split("/", 1)[1] for m, p in self.requests if m == "GET" and p.startswith(prefix))

    def api_calls(self) -> list[str]:
        return [p for _, p in self.requests if p.startswith("/api/models/")]


class HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def _json(self, data, status: int = 200) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.server.lock:
            self.server.requests.append(("HEAD" if head else "GET", path))
        files = self.server.files
        info = f"/api/models/{REPO}/revision/"
        tree = f"/api/models/{REPO}/tree/"
        resolve = f"/{REPO}/resolve/"
        if path == f"/api/models/{REPO}" or path.startswith(info) and path[len(info):] in ("main", COMMIT):
            return self._json({"id": REPO, "sha": COMMIT, "private": False,
                               "siblings": [{"rfilename": f} for f in sorted(files)]})
        if path.startswith(tree) and path[len(tree):] == COMMIT:
            return self._json([{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                               for f, b in sorted(files.items())])
        if path.startswith(resolve):
            rev, _, name = path[len(resolve):].partition("/")
            if rev in ("main", COMMIT) and name in files:
                return self._file(name, files[name], head)
        self.send_response(404)
        self.send_header("X-Error-Code", "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _file(self, name: str, body: bytes, head: bool) -> None:
        if name in self.server.cut and not head and self.headers.get("Range"):
            self.send_response(503)  # the hub stays down: the retry that resumes fails too
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if name in self.server.cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True  # the connection drops mid-body
            return
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)


@pytest.fixture
def hub(demo_model):
    files = {f.name: f.read_bytes() for f in demo_model.iterdir() if f.name in NEEDED}
    assert set(files) == NEEDED
    server = FakeHub({**files, **EXTRA})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def hub_env(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


RESOLVE = """
import json, sys
from pipeline.config import EngineConfig
from pipeline.models import ModelNotFoundError, pinned, resolve_model
name, revision, offline = sys.argv[1], sys.argv[2] or None, sys.argv[3] == "1"
try:
    folder = resolve_model(name, revision, offline)
    pin = pinned(EngineConfig(model=name, revision=revision, offline=offline)).revision
except ModelNotFoundError as exc:
    sys.exit(f"ModelNotFoundError: {exc}")
print(json.dumps({"folder": str(folder), "pinned": pin}))
"""


def resolve(env: dict[str, str], revision: str = "", offline: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RESOLVE, REPO, revision, "1" if offline else "0"],
                          capture_output=True, text=True, env=env, timeout=120)


def test_download_fetches_only_the_needed_files_pins_the_commit_then_uses_the_cache(hub, tmp_path, demo_model):
    env = hub_env(hub, tmp_path)
    first = resolve(env)
    assert first.returncode == 0, first.stderr[-2000:]
    out = json.loads(first.stdout)
    folder = Path(out["folder"])
    assert folder == tmp_path / "hub" / "models--acme--gpt2-tiny" / "snapshots" / COMMIT
    assert out["pinned"] == COMMIT  # the driver hands replicas this exact commit
    assert {p.name for p in folder.iterdir()} == NEEDED  # no onnx, flax, tflite, .bin or README
    assert hub.file_gets() == sorted(NEEDED)
    assert (folder / "model.safetensors").read_bytes() == (demo_model / "model.safetensors").read_bytes()

    hub.requests.clear()  # second run: the revision is checked, every file comes from the cache
    again = resolve(env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["folder"] == str(folder) and hub.file_gets() == []

    hub.requests.clear()  # a replica with the pinned commit: no network at all
    pinned_run = resolve(env, revision=COMMIT)
    assert pinned_run.returncode == 0 and hub.requests == []
    offline = resolve(hub_env(hub, tmp_path, HF_HUB_OFFLINE="1"))  # offline with the cache: fine
    assert offline.returncode == 0 and json.loads(offline.stdout)["folder"] == str(folder) and hub.requests == []


def test_offline_never_downloads_and_says_so(hub, tmp_path):
    for run in (resolve(hub_env(hub, tmp_path, HF_HUB_OFFLINE="1")), resolve(hub_env(hub, tmp_path), offline=True)):
        assert run.returncode == 1
        assert "Downloads are off (--offline or HF_HUB_OFFLINE=1)" in run.stderr and REPO in run.stderr
    assert hub.requests == []


def test_interrupted_download_leaves_no_usable_snapshot_and_the_next_run_completes_it(hub, tmp_path, demo_model):
    env = hub_env(hub, tmp_path)
    hub.cut = {"model.safetensors"}
    broken = resolve(env)
    assert broken.returncode == 1 and "downloading it from" in broken.stderr, broken.stderr[-2000:]
    snapshot = tmp_path / "hub" / "models--acme--gpt2-tiny" / "snapshots" / COMMIT
    assert not (snapshot / "model.safetensors").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".incomplete")]  # no half-written file kept
    assert resolve(env, offline=True).returncode == 1  # the partial snapshot is not usable

    hub.cut = set()
    hub.requests.clear()
    fixed = resolve(env)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert hub.file_gets() == ["model.safetensors"]  # only what was missing
    assert (snapshot / "model.safetensors").read_bytes() == (demo_model / "model.safetensors").read_bytes()


def test_generate_runs_on_a_downloaded_checkpoint(hub, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "generate", "My name is Arthur and I live in", "--model", REPO,
         "--max-tokens", "4", "--temperature", "0", "--json"],
        capture_output=True, text=True, env=hub_env(hub, tmp_path), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = json.loads(proc.stdout)
    assert len(samples) == 1 and 1 <= len(samples[0]["token_ids"]) <= 4
    assert "model.safetensors" in hub.file_gets()
