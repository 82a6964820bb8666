"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("energon_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("energon_request_latency_seconds", "Time to the full response", ["endpoint"],
                                 registry=self.registry)
        self.tokens = Counter("energon_generated_tokens", "Tokens generated", registry=self.registry)
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
