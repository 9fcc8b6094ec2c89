"""Prometheus metrics for one replica (served at ``/metrics``, labelled with the replica id)."""

from __future__ import annotations

import time
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, replica: str):
        self.registry = CollectorRegistry()
        labels = {"replica": replica}
        r = self.registry
        self.requests = Counter("gpt2_pipeline_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.errors = Counter("gpt2_pipeline_request_errors", "Requests answered with an error status",
                              ["route", "status"], registry=r)
        self.prompt_tokens = Counter("gpt2_pipeline_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("gpt2_pipeline_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("gpt2_pipeline_time_to_first_token_seconds", "Time to first token (streams)",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("gpt2_pipeline_request_latency_seconds", "Request latency", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("gpt2_pipeline_engine_requests_unfinished", "Requests inside the vLLM engine", registry=r)
        self.active = Gauge("gpt2_pipeline_http_requests_active", "HTTP requests being served", registry=r)
        self.batch_calls = Gauge("gpt2_pipeline_batch_calls_running", "Batch-job calls (run --via-serve) running",
                                 registry=r)
        self.batch_jobs = Gauge("gpt2_pipeline_batch_jobs_running", "Distinct batch jobs with calls running", registry=r)
        self.batch_requests = Counter("gpt2_pipeline_batch_api_requests", "Batch API request lines answered here, by outcome (done: 200, failed: other)",
                                      ["outcome"], registry=r)
        self.batches = Gauge("gpt2_pipeline_batch_api_batches", "Batch API batches in storage, by status", ["status"], registry=r)
        self.info = Gauge("gpt2_pipeline_replica_info", "Replica identity", ["replica"], registry=r)
        self.info.labels(**labels).set(1)

    def set_batches(self, counts: dict[str, int]) -> None:
        """The batches-by-status gauge (``counts``: every status, zeros included)."""
        for status, n in counts.items():
            self.batches.labels(status).set(n)

    def render(self, queue_depth: Optional[Callable[[], int]] = None) -> bytes:
        if queue_depth is not None:
            self.queue_depth.set(queue_depth())
        return generate_latest(self.registry)


class Meter:
    """Per-request timing and token counts, recorded into ``Metrics`` when the request ends."""

    def __init__(self, metrics: Optional[Metrics], route: str):
        self.metrics, self.route = metrics, route
        self.start = time.monotonic()
        self.first: Optional[float] = None
        self.streaming = False  # a stream records its status when it ends, not when the handler returns

    def first_token(self) -> None:
        if self.first is None:
            self.first = time.monotonic()
            if self.metrics:
                self.metrics.ttft.observe(self.first - self.start)

    def tokens(self, prompt: int, completion: int) -> None:
        if self.metrics:
            self.metrics.prompt_tokens.inc(prompt)
            self.metrics.completion_tokens.inc(completion)

    def done(self, status: int) -> None:
        if not self.metrics:
            return
        self.metrics.requests.labels(self.route, str(status)).inc()
        if status >= 400:
            self.metrics.errors.labels(self.route, str(status)).inc()
        self.metrics.latency.labels(self.route).observe(time.monotonic() - self.start)
