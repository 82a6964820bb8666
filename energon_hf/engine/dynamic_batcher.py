"""Dynamic batching for encoder requests (embeddings, classification): requests that arrive while the model
is busy run together in the next batch.

Each request holds one or more token sequences; a batch is a list of whole requests, run by one
`run_batch(sequences) -> one result per sequence` call on the batcher's thread. Two policies pick a batch:

- "packed" (the default, for our padding-free models): the oldest requests first, in arrival order, until
  the batch's real tokens reach `max_batch_tokens`. A padded batch costs its real tokens, so nothing is
  gained by reordering, and no request waits behind a later one.
- "priority" (EnergonAI's batch manager, for runners that pad to the batch's longest sequence): the
  waiting requests are sorted by length and split into contiguous groups that minimise the padded
  tokens plus a fixed cost per batch (dynamic programming); the group with the highest
  priority = sequences x exp(wait of its oldest / max_wait) runs first, and a group holding a request
  that has waited `max_wait_s` or longer runs before any other, so no request starves.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

POLICIES = ("packed", "priority")
BATCH_OVERHEAD_TOKENS = 32  # "priority": what one more batch costs, in padded tokens (launch, weights read)


@dataclass
class EncodeRequest:
    sequences: list[list[int]]
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)

    @property
    def longest(self) -> int:
        return max(len(s) for s in self.sequences)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[list[list[int]]], Sequence[Any]], max_batch_tokens: int = 4096,
                 policy: str = "packed", max_wait_s: float = 0.05):
        if policy not in POLICIES:
            raise ValueError(f"unknown batching policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.run_batch, self.max_batch_tokens, self.policy = run_batch, max_batch_tokens, policy
        self.max_wait_s = max_wait_s
        self.waiting: list[EncodeRequest] = []
        self.running: list[EncodeRequest] = []
        self.on_batch: Callable[[int], None] | None = None  # (sequences): for metrics
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="energon-encoder-batcher", daemon=True)
        self._thread.start()

    def submit(self, sequences: list[list[int]]) -> Future:
        """Queue the sequences of one request; the future gets their results in order."""
        if not sequences or any(not s for s in sequences):
            raise ValueError("every input needs at least one token")
        request = EncodeRequest([list(s) for s in sequences])
        with self._wake:
            if self._stopped:
                raise RuntimeError("the batcher is stopped")
            self.waiting.append(request)
            self._wake.notify()
        return request.future

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self.waiting:
                    self._wake.wait()
                if self._stopped:
                    for request in self.waiting:
                        request.future.set_exception(RuntimeError("the server is shutting down"))
                    return
                batch = (self._pick_packed() if self.policy == "packed" else
                         pick_priority(self.waiting, time.monotonic(), self.max_batch_tokens, self.max_wait_s))
                self.waiting = [r for r in self.waiting if all(r is not b for b in batch)]
                self.running = batch
            sequences = [s for r in batch for s in r.sequences]
            try:
                results = self.run_batch(sequences)
            except Exception as e:  # noqa: BLE001 - the batch's requests get the error; the batcher goes on
                for request in batch:
                    request.future.set_exception(e)
            else:
                start = 0
                for request in batch:
                    request.future.set_result(list(results[start:start + len(request.sequences)]))
                    start += len(request.sequences)
            if self.on_batch is not None:
                self.on_batch(len(sequences))
            self.running = []

    def _pick_packed(self) -> list[EncodeRequest]:
        batch, tokens = [], 0
        for request in self.waiting:
            if batch and tokens + request.tokens > self.max_batch_tokens:
                break
            batch.append(request)
            tokens += request.tokens
        return batch

def pick_priority(waiting: list[EncodeRequest], now: float, max_batch_tokens: int,
                  max_wait_s: float) -> list[EncodeRequest]:
    """EnergonAI's choice: among the least-padding length groups, the one holding a request that waited
    max_wait_s or longer, else the one with the highest sequences x exp(wait / max_wait_s)."""
    groups = _split_by_padded_cost(sorted(waiting, key=lambda r: r.longest), max_batch_tokens)
    oldest = min(waiting, key=lambda r: r.arrived)
    if now - oldest.arrived >= max_wait_s:  # the bound on waiting
        return next(g for g in groups if any(r is oldest for r in g))

    def priority(group: list[EncodeRequest]) -> float:
        waited = now - min(r.arrived for r in group)
        return sum(len(r.sequences) for r in group) * math.exp(waited / max_wait_s)

    return max(groups, key=priority)


def _split_by_padded_cost(ordered: list[EncodeRequest], max_batch_tokens: int) -> list[list[EncodeRequest]]:
    """Contiguous groups of length-sorted requests with the least padded tokens plus per-batch overhead; a
    group's padded size (sequences x its longest) stays within max_batch_tokens unless it is one request."""
    n = len(ordered)
    best = [0.0] + [math.inf] * n   # best[i]: the cost of the first i requests
    start = [0] * (n + 1)
    for end in range(1, n + 1):
        sequences = 0
        for begin in range(end - 1, -1, -1):
            sequences += len(ordered[begin].sequences)
            padded = sequences * ordered[end - 1].longest  # sorted: the last is the longest
            if padded > max_batch_tokens and begin < end - 1:
                break
            cost = best[begin] + padded + BATCH_OVERHEAD_TOKENS
            if cost < best[end]:
                best[end], start[end] = cost, begin
    groups, end = [], n
    while end > 0:
        groups.append(ordered[start[end]:end])
        end = start[end]
    return groups[::-1]
