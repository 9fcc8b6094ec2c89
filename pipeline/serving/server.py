"""The online endpoint: a Ray Serve deployment whose replicas hold the same ``Engine`` as the
batch actors, behind an OpenAI-compatible FastAPI app.

Each replica runs a generation engine (vLLM priority scheduling: online requests first) and,
unless disabled, a pooling engine for ``/v1/embeddings``. Batch jobs reach the same replicas
through ``process_batch`` (``run --via-serve``), bounded by their own admission limit.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Optional

import pyarrow as pa
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse
from ray import serve

from pipeline.config import Ingress, ServeConfig, Task
from pipeline.endpoint import api, errors
from pipeline.endpoint.errors import APIError
from pipeline.endpoint.metrics import Meter, Metrics
from pipeline.endpoint.protocol import CompletionRequest, EmbeddingRequest, ModelCard, ModelList
from pipeline.engine import PRIORITY_BATCH, PRIORITY_ONLINE, Engine
from pipeline.engine.compiled import serve_compile
from pipeline.openai_batch import BatchAnswerer
from pipeline.records import RowSpec, process_batch
from pipeline.serving import batch_routes
from pipeline.serving.admission import BatchSlots
from pipeline.serving.batch_runner import runner
from pipeline.serving.batch_store import BatchStore

logger = logging.getLogger(__name__)
API_KEY_ENV = "GPT2_PIPELINE_API_KEY"
OPEN_PATHS = ("/health", "/health/ready")
RUNNER_CALL_S = 20.0  # under Serve's health check timeout


class Guard:
    """API key (constant-time compare) and body size, checked before and while the body is read.

    The size bound holds whatever the framing: a ``Content-Length`` over it is refused before
    anything is read, and the bytes of every body (chunked ones included) are counted as they
    arrive; the first chunk past the bound answers 413 and the app sees the client leave, so a
    chunked body is never read whole. Plain ASGI on purpose: Starlette's ``BaseHTTPMiddleware``
    re-pipes every chunk of a streaming response through an extra task, a cost paid per SSE event.
    """

    def __init__(self, app: Any, server: "LLMServer"):
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        keys, limit = self.server.bearers, self.server.cfg.max_body_bytes
        if scope["path"] == "/v1/files":  # uploads have their own bound (checked again as they stream)
            limit = self.server.cfg.batches.max_file_bytes + batch_routes.MULTIPART_SLACK
        if keys and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not any([hmac.compare_digest(given, bearer) for bearer in keys]):  # a list: compare every key
                return await errors.error_response(
                    401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key",
                )(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length and (not length.isdigit() or int(length) > limit):
            return await errors.error_response(413, f"request body over {limit} bytes")(scope, receive, send)
        await self.app(scope, *_bounded_body(scope, receive, send, limit))


def _bounded_body(scope: dict, receive: Any, send: Any, limit: int) -> tuple[Any, Any]:
    """``receive`` and ``send`` for the app: past ``limit`` body bytes, the client gets a 413 and
    the app a disconnect (and nothing it sends after that goes out)."""
    state = {"read": 0, "refused": False, "started": False}

    async def bounded_receive() -> dict:
        if state["refused"]:
            return {"type": "http.disconnect"}
        message = await receive()
        if message["type"] == "http.request":
            state["read"] += len(message.get("body", b""))
            if state["read"] > limit:
                state["refused"] = True
                if not state["started"]:
                    await errors.error_response(413, f"request body over {limit} bytes")(scope, receive, send)
                return {"type": "http.disconnect"}
        return message

    async def guarded_send(message: dict) -> None:
        if state["refused"]:
            return
        if message["type"] == "http.response.start":
            state["started"] = True
        await send(message)

    return bounded_receive, guarded_send


def build_api(server: "LLMServer") -> FastAPI:
    """The replica's FastAPI app. Handlers only map engine results (``api``) to HTTP."""
    app = FastAPI(title="gpt2-pipeline", summary="OpenAI-compatible GPT-2 endpoint", docs_url=None, redoc_url=None)
    errors.install(app)
    cfg = server.cfg
    app.add_middleware(Guard, server=server)
    batch_routes.install(app, server)

    @app.get("/health")
    async def health() -> dict:
        await server.engine.check_health()
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready() -> dict:
        await server.check_health()
        return {"status": "ready", "model": server.name, "active_requests": server.active}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=server.name, max_model_len=server.engine.context_length)])

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> Any:
        async with server.admitted("completions") as meter:
            server.check_model(req.model)
            job = api.prepare(server.engine, req, cfg.max_prompts_per_request)
            if not req.stream:
                return await api.complete(server.engine, req, job, server.name, PRIORITY_ONLINE, meter)
            meter.streaming = True
            events = api.stream(server.engine, req, job, server.name, PRIORITY_ONLINE, meter)
            return StreamingResponse(server.tail(events, meter), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> Any:
        async with server.admitted("embeddings") as meter:
            server.check_model(req.model)
            if server.embedder is None:
                raise APIError(404, "embeddings are disabled on this server (start it without --no-embeddings)")
            return await api.embed(server.embedder, req, server.name, cfg.max_prompts_per_request,
                                   PRIORITY_ONLINE, meter)

    @app.get("/metrics")
    async def prometheus() -> Response:
        server.metrics.set_batches(await asyncio.to_thread(server.batch_store.status_counts))
        return Response(server.metrics.render(lambda: server.engine.queued), media_type="text/plain; version=0.0.4")

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket that the replicas on one node share: the kernel spreads connections."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror} (is another server on that port?)") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


@serve.deployment(name="LLMServer")
@serve.ingress()
class LLMServer:
    async def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.name = cfg.engine.name
        self.api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
        self.bearers = [f"Bearer {k}".encode() for k in self._keys()]
        generation, compiled = serve_compile(cfg.engine)
        logger.info("generation engine: %s", compiled.reason)
        # Both engines share the replica's GPUs: each gets its own share of their memory.
        generate = lambda: Engine(generation, Task.generate, priority_scheduling=True, colocated=cfg.embeddings)  # noqa: E731
        embed = lambda: Engine(cfg.engine, Task.embed, colocated=True)  # noqa: E731
        if cfg.embeddings and not cfg.engine.gpus_per_replica:
            # CPU: the two engines load side by side (start-up is mostly their processes' imports).
            # On a GPU they start one after the other: vLLM sizes its cache from the free memory it sees.
            self.engine, self.embedder = await asyncio.gather(asyncio.to_thread(generate), asyncio.to_thread(embed))
        else:
            self.engine = generate()
            self.embedder = embed() if cfg.embeddings else None
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            replica = "local"
        self.metrics = Metrics(replica)
        self.batch_jobs: dict[str, int] = {}
        self._batch_slots = BatchSlots(cfg.max_batch_in_flight, cfg.max_batch_in_flight_online)
        self._app: Optional[FastAPI] = None
        self._http: Optional[asyncio.Task] = None
        self.batch_store = BatchStore(cfg.batches.storage_uri())
        self._runner: Any = None
        self.runner().start.remote()  # resumes unfinished batches in storage (once per application)
        if cfg.ingress == Ingress.direct:
            self._http = asyncio.create_task(self._serve_http(listen(cfg.host, cfg.port)))

    def _keys(self) -> list[str]:
        keys = [self.api_key] if self.api_key else []
        if self.cfg.api_keys_file:
            with open(os.path.expanduser(self.cfg.api_keys_file)) as fh:
                keys += [line.strip() for line in fh if line.strip() and not line.startswith("#")]
        return keys

    async def _serve_http(self, sock: socket.socket) -> None:
        """Direct ingress: this replica answers HTTP itself, on this event loop (no proxy hop)."""
        import uvicorn

        config = uvicorn.Config(self.__serve_build_asgi_app__(), lifespan="off", log_level="warning", access_log=self.cfg.access_log,
                                timeout_keep_alive=30)
        await uvicorn.Server(config).serve(sockets=[sock])

    def __serve_build_asgi_app__(self) -> FastAPI:
        """One app per replica, served by Serve's ingress and, with direct ingress, by uvicorn."""
        if self._app is None:
            self._app = build_api(self)
        return self._app

    # ---- admission: a bounded queue per replica; excess answers 429 quickly -------------------
    @asynccontextmanager
    async def admitted(self, route: str) -> AsyncIterator[Meter]:
        meter = Meter(self.metrics, route)
        if self.active >= self.cfg.engine.max_in_flight + self.cfg.max_queued_requests:
            meter.done(429)
            raise APIError(429, "the server is at capacity; retry later", code="queue_full", retry_after=1)
        self._online(+1)
        status = 200
        try:
            yield meter
        except APIError as exc:
            status = exc.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            self._online(-1)
            if not meter.streaming:
                meter.done(status)

    def check_model(self, model: Optional[str]) -> None:
        api.check_model(self.name, model)

    async def tail(self, events: AsyncIterator[str], meter: Meter) -> AsyncIterator[str]:
        """Keep a stream counted as active until it ends (or the client leaves)."""
        self._online(+1)
        try:
            async for event in events:
                yield event
        finally:
            self._online(-1)
            meter.done(200)

    @property
    def active(self) -> int:
        """Online requests in flight (the batch slots keep the count: they narrow while it is > 0)."""
        return self._batch_slots.online_requests

    def _online(self, delta: int) -> None:
        self._batch_slots.online(delta)
        self.metrics.active.set(self.active)

    # ---- batch jobs through the same replicas (run --via-serve, the Batch API) ----------------
    async def process_batch(self, batch: pa.Table, spec: RowSpec, job_id: str = "") -> pa.Table:
        engine = self.embedder if spec.task == Task.embed else self.engine
        if engine is None:
            raise RuntimeError("this server has embeddings disabled")
        with self._batch_call(job_id):
            return await process_batch(engine, batch, spec, PRIORITY_BATCH, limit=self._batch_slots)

    async def answer_requests(self, batch: pa.Table, job_id: str = "") -> pa.Table:
        """OpenAI Batch request rows, answered as this replica's endpoints answer them."""
        with self._batch_call(job_id):
            answers = await BatchAnswerer(self.name, self.engine, self.embedder, limit=self._batch_slots)(batch)
        ok = answers["status_code"].to_pylist().count(200)
        self.metrics.batch_requests.labels("done").inc(ok)
        self.metrics.batch_requests.labels("failed").inc(answers.num_rows - ok)
        return answers

    @contextmanager
    def _batch_call(self, job_id: str) -> Iterator[None]:
        """Count a batch call while it runs; the replica's batch slots bound its rows in the engine."""
        self.batch_jobs[job_id] = self.batch_jobs.get(job_id, 0) + 1
        self.metrics.batch_calls.inc()
        self.metrics.batch_jobs.set(len(self.batch_jobs))
        try:
            yield
        finally:
            self.metrics.batch_calls.dec()
            self.batch_jobs[job_id] -= 1
            if not self.batch_jobs[job_id]:
                del self.batch_jobs[job_id]
            self.metrics.batch_jobs.set(len(self.batch_jobs))

    def runner(self, renew: bool = False) -> Any:
        """The application's Batch API runner (a named actor; made again if it died)."""
        if self._runner is None or renew:
            self._runner = runner(self.cfg)
        return self._runner

    async def call_runner(self, method: str, *args: Any) -> Any:
        from ray.exceptions import RayActorError

        for attempt in range(2):
            try:
                return await getattr(self.runner(renew=attempt > 0), method).remote(*args)
            except RayActorError:
                if attempt:
                    raise APIError(503, "the batch runner is restarting; retry", retry_after=5) from None

    async def check_health(self) -> None:
        """Serve's own health check: a dead engine gets this replica replaced."""
        await self.engine.check_health()
        if self.embedder is not None:
            await self.embedder.check_health()
        await self.keep_runner()

    async def keep_runner(self) -> None:
        """The runner dies with the replica that made it (it owns the actor): the next health check
        of any replica makes a new one, which resumes every unfinished batch from storage."""
        try:
            await asyncio.wait_for(self.call_runner("start"), RUNNER_CALL_S)
        except Exception as exc:  # noqa: BLE001 - not this replica's health (e.g. storage down): retried next check
            logger.warning("batch runner not reachable: %s", exc)


def build_app(cfg: ServeConfig, embedded: bool = False) -> Any:
    """The Serve application for ``cfg`` (replicas or autoscaling, resources, queue bounds);
    ``embedded``: on a Ray this process started (``runtime.replica_resources``).

    The model is resolved here, on the driver: a hub id is downloaded and pinned to its commit."""
    from pipeline.models import pinned
    from pipeline.runtime import replica_resources

    cfg = cfg.model_copy(update={"engine": pinned(cfg.engine)})
    engine = cfg.engine
    options: dict[str, Any] = dict(
        ray_actor_options=replica_resources(engine, embedded=embedded),
        # Let requests reach the replica, which answers 429 itself (OpenAI JSON + Retry-After).
        # Serve's router queue is only a backstop (503): bursts wait there briefly while the
        # router assigns them, so it is sized well above the replica's own bound.
        max_ongoing_requests=engine.max_in_flight + cfg.max_queued_requests + 64,
        max_queued_requests=4 * (engine.max_in_flight + cfg.max_queued_requests) + 256,
        health_check_period_s=10,
        health_check_timeout_s=60,
        logging_config={"enable_access_log": cfg.access_log},
    )
    if cfg.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas if cfg.min_replicas is not None else 1,
            "initial_replicas": max(cfg.min_replicas or 1, 1),
            "max_replicas": cfg.max_replicas or max(cfg.min_replicas or 1, engine.replicas),
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = engine.replicas
    return LLMServer.options(**options).bind(cfg)


def app_builder(args: dict[str, Any]) -> Any:
    """For Serve config files / ``serve run pipeline.serving.server:app_builder model=demo``.

    ``args`` holds ServeConfig keys (``engine`` nested, or the flat shortcuts ``model``,
    ``replicas``, ``dtype``, ``max_model_len``) and optionally ``spec``: a serve spec file whose
    values the other args override (KubeRay's RayService mounts the spec and passes its path).
    Ingress ``auto`` means Serve's proxy here: a config file deploys onto a running cluster.
    """
    from pipeline.config import build, load_spec

    flat = dict(args)
    spec = load_spec(flat.pop("spec")) if flat.get("spec") else {}
    engine = {k: flat.pop(k) for k in list(flat) if k in ("model", "replicas", "dtype", "max_model_len")}
    cfg = build(ServeConfig, spec, {**flat, "engine": {**flat.get("engine", {}), **engine}})
    return build_app(cfg.model_copy(update={"ingress": cfg.resolved_ingress(embedded=False)}))


def start(cfg: ServeConfig, verbose: bool = False) -> tuple[str, Ingress]:
    """Deploy on the Ray cluster (embedded if no address); once ready, return the base URL and
    the ingress in use."""
    from ray.serve.config import ProxyLocation

    from pipeline.runtime import init_ray, ray_address

    t0 = time.monotonic()
    embedded = ray_address(cfg.address) is None
    cfg = cfg.model_copy(update={"ingress": cfg.resolved_ingress(embedded=embedded)})
    init_ray(cfg.address, cfg.num_cpus, verbose)
    t_ray = time.monotonic()
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config={"enable_access_log": cfg.access_log},
                proxy_location=ProxyLocation.Disabled if cfg.ingress == Ingress.direct else None)
    t_serve = time.monotonic()
    serve.run(build_app(cfg, embedded=embedded), name=cfg.name, route_prefix="/", blocking=False)
    t_ready = time.monotonic()
    logger.warning("serve start-up: ray %.1f s, serve %.1f s, replicas ready %.1f s; total %.1f s",
                   t_ray - t0, t_serve - t_ray, t_ready - t_serve, t_ready - t0)
    return f"http://{cfg.host}:{cfg.port}", cfg.ingress
