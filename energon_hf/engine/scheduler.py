"""Continuous batching: requests join and leave the running batch at every step (iteration-level scheduling,
as in Orca and vLLM).

Each iteration admits waiting requests as one packed prefill step, under a token budget and the free KV
cache blocks, then runs one decode step for every running sequence. A sequence that finishes (EOS, its
token limit, or a cancel) frees its blocks at once. When the cache cannot hold the next token of every
running sequence, the most recently admitted one is preempted: its blocks are freed and it goes back to
the front of the queue, to be prefilled again later with what it generated so far (recompute).

One background thread drives the loop and sleeps on a condition when there is nothing to do.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .batch import decode_batch, prefill_batch
from .kv_cache import BlockAllocator
from .params import GenerationParams
from .sampler import Sampler

DONE = object()  # the last event of a request


@dataclass
class TokenLogprob:
    """The log-probability of a generated token under the model's distribution (before sampling
    parameters), and the `top` most likely tokens with theirs."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Request:
    """One generation request; iterate `stream()` for its tokens as they come, or call `result()`.

    Events go to `events` as (request, token) and (request, DONE); several requests may share one queue
    (n choices of one prompt) and a reader tells them apart by the request."""

    request_id: int
    prompt: list[int]
    params: GenerationParams
    sampler: Sampler
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely tokens'
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS), "length", "cancelled" or "error"
    error: BaseException | None = None
    events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def context(self) -> list[int]:
        return self.prompt + self.tokens

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """Tokens as they come (only for a request with its own event queue)."""
        while True:
            _, item = self.events.get(timeout=timeout)
            if item is DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self, timeout: float | None = None) -> list[int]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.tokens)


class ContinuousBatcher:
    """Serves generation requests on a runner (LocalRunner or the multi-process engine), sharing its KV cache.

    `max_batch_tokens` bounds the tokens of one prefill step; `max_running` the sequences decoding together.
    """

    def __init__(self, runner, vocab_size: int, num_blocks: int, block_size: int = 16,
                 max_batch_tokens: int = 4096, max_running: int = 256, device: torch.device | str = "cpu"):
        self.runner, self.vocab_size, self.device = runner, vocab_size, torch.device(device)
        self.block_size, self.max_batch_tokens, self.max_running = block_size, max_batch_tokens, max_running
        runner.ensure_cache(num_blocks, block_size)
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._stopped = False
        self.steps = 0
        self.preemptions = 0
        self.on_step: Callable[[str, int], None] | None = None  # (kind, sequences): for metrics
        self._thread = threading.Thread(target=self._loop, name="energon-batcher", daemon=True)
        self._thread.start()

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: GenerationParams, generator: torch.Generator | None = None,
               logprobs: int | None = None, events: queue.Queue | None = None) -> Request:
        """Queue a request. `logprobs=k` records each token's log-probability and the k most likely
        alternatives; `events` is a queue shared with other requests (default: its own)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        needed = self.allocator.blocks_for(len(prompt) + params.max_new_tokens)
        if needed > self.allocator.num_blocks_total:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) needs "
                             f"{needed} KV cache blocks; the cache holds {self.allocator.num_blocks_total}")
        sampler = Sampler(params, self.vocab_size, self.device, generator)
        sampler.observe_prompts([torch.tensor(prompt)])
        request = Request(next(self._ids), list(prompt), params, sampler, logprobs)
        if events is not None:
            request.events = events
        with self._wake:
            if self._stopped:
                raise RuntimeError("the batcher is stopped")
            self.waiting.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client that went away): it leaves the batch at the next step."""
        with self._wake:
            if request.finish_reason is None:
                request.finish_reason = "cancelled"
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(30)

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stopped:
                    break
                self._drop_cancelled()
                admitted = self._admit()
            try:
                if admitted:
                    self._prefill(admitted)
                    self._observe("prefill", len(admitted))
                if self.running:
                    self._decode()
                    self._observe("decode", len(self.running))
                self.steps += 1
            except Exception as e:  # noqa: BLE001 - the engine failed: every request in flight gets the error
                with self._wake:  # admitted ones are in neither list while their prefill runs
                    for request in [*admitted, *self.running, *self.waiting]:
                        self._finish(request, "error", e)
                    self.running, self.waiting = [], deque()
        with self._wake:
            for request in [*self.running, *self.waiting]:
                self._finish(request, "cancelled")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _observe(self, kind: str, sequences: int) -> None:
        if self.on_step is not None:
            self.on_step(kind, sequences)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.running if r.finish_reason == "cancelled"]:
            self.running.remove(request)
            self._finish(request, "cancelled")
        for request in [r for r in self.waiting if r.finish_reason == "cancelled"]:
            self.waiting.remove(request)
            self._finish(request, "cancelled")

    def _admit(self) -> list[Request]:
        """Waiting requests that fit this step's token budget and the free blocks (the decode of every
        running sequence keeps one block of headroom each)."""
        admitted, tokens = [], 0
        headroom = len(self.running)
        while self.waiting and len(self.running) + len(admitted) < self.max_running:
            request = self.waiting[0]
            length = len(request.context)
            if admitted and tokens + length > self.max_batch_tokens:
                break
            if self.allocator.blocks_for(length + 1) + headroom > self.allocator.num_free:
                break
            self.allocator.reserve(request.request_id, length + 1)
            admitted.append(self.waiting.popleft())
            tokens += length
        return admitted

    def _prefill(self, requests: list[Request]) -> None:
        contexts = [torch.tensor(r.context, dtype=torch.long) for r in requests]
        tables = self.allocator.block_table_tensor([r.request_id for r in requests], "cpu")
        logits = self.runner.run(prefill_batch(contexts, tables, self.block_size), use_cache=True)["logits"]
        self.running.extend(requests)
        self._sample(requests, logits)

    def _decode(self) -> None:
        self._make_room()
        if not self.running:
            return
        requests = list(self.running)
        context = torch.tensor([len(r.context) for r in requests])  # the last token is not cached yet
        for request, n in zip(requests, context.tolist(), strict=True):
            self.allocator.reserve(request.request_id, n)
        tables = self.allocator.block_table_tensor([r.request_id for r in requests], "cpu")
        last = torch.tensor([r.tokens[-1] for r in requests])
        logits = self.runner.run(decode_batch(last, context, tables, self.block_size), use_cache=True)["logits"]
        self._sample(requests, logits)

    def _make_room(self) -> None:
        """Preempt the newest running sequences until every one can cache its next token."""
        def missing() -> int:
            return sum(max(0, self.allocator.blocks_for(len(r.context)) - len(self.allocator.tables[r.request_id]))
                       for r in self.running)

        with self._wake:
            while self.running and missing() > self.allocator.num_free:
                victim = self.running.pop()
                self.allocator.release(victim.request_id)
                self.preemptions += 1
                self.waiting.appendleft(victim)

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> None:
        wanted = [r.logprobs for r in requests if r.logprobs is not None]
        if wanted:  # one log_softmax and top-k for the whole step
            logp = torch.log_softmax(logits.float(), dim=-1)
            top_values, top_ids = logp.topk(max(wanted), dim=-1)
        for row, request in enumerate(requests):
            if request.finish_reason is not None:  # cancelled while the step ran
                continue
            try:
                token = int(request.sampler(logits[row:row + 1], torch.zeros(1, dtype=torch.long),
                                            len(request.tokens))[0])
            except RuntimeError as e:  # this request's sampling parameters: the others go on
                with self._wake:
                    if request in self.running:
                        self.running.remove(request)
                    self._finish(request, "error", e)
                continue
            if request.logprobs is not None:
                k = request.logprobs
                top = list(zip(top_ids[row, :k].tolist(), top_values[row, :k].tolist(), strict=True))
                request.token_logprobs.append(TokenLogprob(float(logp[row, token]), top))
            request.tokens.append(token)
            request.events.put((request, token))
            if token in request.params.eos_token_ids:
                self._retire(request, "stop")
            elif len(request.tokens) >= request.params.max_new_tokens:
                self._retire(request, "length")

    def _retire(self, request: Request, reason: str) -> None:
        with self._wake:
            if request in self.running:
                self.running.remove(request)
            self._finish(request, reason)

    def _finish(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        self.allocator.release(request.request_id)
        if request._done.is_set():
            return
        request.finish_reason = reason if request.finish_reason in (None, "cancelled") else request.finish_reason
        request.error = error
        request._done.set()
        request.events.put((request, DONE))
