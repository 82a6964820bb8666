"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide). The
generation ones mean what vLLM's do: time to first token, inter-token latency, prompt and generated tokens,
KV cache usage, preemptions."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# vLLM's time-to-first-token buckets: fine enough in the 5-80 s that a loaded CPU server spends there.
FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


class _CounterOf(Collector):
    """A counter whose value another object keeps (the scheduler's preemptions), read at each scrape."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]):
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self):
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("energon_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("energon_request_latency_seconds", "Time to the full response", ["endpoint"],
                                 registry=self.registry)
        self.tokens = Counter("energon_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("energon_prompt_tokens", "Prompt tokens of generation requests",
                                     registry=self.registry)
        self.first_token = Histogram("energon_time_to_first_token_seconds", "From a request's arrival to its "
                                     "first generated token", buckets=FIRST_TOKEN_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("energon_inter_token_latency_seconds", "Between consecutive tokens of one "
                                     "sequence", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("energon_batch_size", "Sequences in one engine step", ["kind"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.queue = Gauge("energon_queue_length", "Requests waiting for admission", registry=self.registry)
        self.running = Gauge("energon_running_sequences", "Sequences in the running batch", registry=self.registry)
        self.kv_used = Gauge("energon_kv_cache_blocks_used", "KV cache blocks held by sequences",
                             registry=self.registry)
        self.kv_total = Gauge("energon_kv_cache_blocks_total", "KV cache blocks in all", registry=self.registry)

    def watch(self, waiting, running) -> None:
        """Read the queue and running lengths from the batcher at each scrape."""
        self.queue.set_function(lambda: len(waiting()))
        self.running.set_function(lambda: len(running()))

    def watch_preemptions(self, read: Callable[[], int]) -> None:
        self.registry.register(_CounterOf("energon_preemptions", "Sequences preempted (their blocks freed, "
                                          "recomputed later) because the KV cache was full", read))

    def watch_cache(self, allocator) -> None:
        """Read the KV cache's block usage at each scrape (a cancelled sequence's blocks are freed by the
        next engine step: watch them go)."""
        self.kv_used.set_function(lambda: allocator.num_blocks_total - allocator.num_free)
        self.kv_total.set_function(lambda: allocator.num_blocks_total)

    def step(self, kind: str, sequences: int) -> None:
        self.batch_size.labels(kind).observe(sequences)

    def answered(self, endpoint: str, status: int, started: float | None = None, tokens: int = 0) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if started is not None:
            self.latency.labels(endpoint).observe(time.perf_counter() - started)
        if tokens:
            self.tokens.inc(tokens)
