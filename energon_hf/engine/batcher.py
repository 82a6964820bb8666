"""Continuous batching: requests join and leave the running batch at every step (iteration-level scheduling,
as in Orca and vLLM).

One background thread runs the loop: the Scheduler (engine/scheduler.py) picks each step's work, one model
call runs it on the runner (LocalRunner or the multi-process engine) and its KV cache, each request's own
sampler turns its logits row into a token, and the Scheduler takes the tokens back and retires what
finished. Requests hear of their tokens through their event queues. The thread sleeps on a condition when
there is nothing to do.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from energon_hf.batch import PackedBatch, cached_batch, prefill_batch
from energon_hf.kv_cache import BLOCK_SIZE

from .params import GenerationParams
from .sampler import Sampler
from .scheduler import Scheduler, Sequence, Step

DONE = object()  # the last event of a request


@dataclass
class TokenLogprob:
    """The log-probability of a generated token under the model's distribution (before sampling
    parameters), and the `top` most likely tokens with theirs."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Request(Sequence):
    """One generation request; iterate `stream()` for its tokens as they come, or call `result()`.

    Events go to `events` as (request, token) and (request, DONE); several requests may share one queue
    (n choices of one prompt) and a reader tells them apart by the request."""

    sampler: Sampler | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely tokens'
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    error: BaseException | None = None
    events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def request_id(self) -> int:
        return self.seq_id

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
    """Serves generation requests on a runner, sharing its KV cache.

    `max_batch_tokens` bounds the tokens of one step (decodes and prompt chunks); `max_running` the sequences
    running together.
    """

    def __init__(self, runner, vocab_size: int, num_blocks: int, block_size: int = BLOCK_SIZE,
                 max_batch_tokens: int = 4096, max_running: int = 256, device: torch.device | str = "cpu"):
        self.runner, self.vocab_size, self.device = runner, vocab_size, torch.device(device)
        runner.ensure_cache(num_blocks, block_size)
        self.scheduler = Scheduler(num_blocks, block_size, max_batch_tokens, max_running)
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._stopped = False
        self.steps = 0
        self.on_step: Callable[[str, int], None] | None = None  # (kind, sequences): for metrics
        self._thread = threading.Thread(target=self._loop, name="energon-batcher", daemon=True)
        self._thread.start()

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def allocator(self):
        return self.scheduler.allocator

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: GenerationParams, generator: torch.Generator | None = None,
               logprobs: int | None = None, events: queue.Queue | None = None) -> Request:
        """Queue a request. `logprobs=k` records each token's log-probability and the k most likely
        alternatives; `events` is a queue shared with other requests (default: its own)."""
        request = Request(next(self._ids), list(prompt), params.max_new_tokens, frozenset(params.eos_token_ids),
                          logprobs=logprobs)
        if events is not None:
            request.events = events
        with self._wake:
            if self._stopped:
                raise RuntimeError("the batcher is stopped")
            self.scheduler.add(request)  # refuses an empty prompt or one the cache could never hold
            request.sampler = Sampler(params, self.vocab_size, self.device, generator)  # before the loop sees it
            request.sampler.observe_prompts([torch.tensor(prompt)])
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client that went away): it leaves the batch at the next step."""
        with self._wake:
            self.scheduler.cancel(request)
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
                while not self._stopped and self.scheduler.idle:
                    self._wake.wait()
                if self._stopped:
                    break
            with self._wake:
                step = self.scheduler.schedule()
            if step is None:
                continue
            for request in step.retired:
                self._finish(request)
            if step.sequences:
                self._run(step)
        with self._wake:
            left = self.scheduler.abort("cancelled")
        for request in left:
            self._finish(request)

    def _run(self, step: Step) -> None:
        """One model call for the step, the requests' tokens, and the Scheduler's bookkeeping."""
        try:
            logits = self.runner.run(self._batch(step), use_cache=True)["logits"]
            tokens: list[int | None] = [None] * len(step.sequences)  # a chunk that does not end its prompt: none
            rows = step.sampled_rows
            for i, token in zip(rows, self._sample([step.sequences[i] for i in rows], logits), strict=True):
                tokens[i] = token
        except Exception as e:  # noqa: BLE001 - the engine failed: every request in flight gets the error
            with self._wake:
                failed = self.scheduler.abort("error")
            for request in failed:
                request.error = request.error or e
                self._finish(request)
            return
        with self._wake:
            left = self.scheduler.postprocess(step, tokens)
        for request, token in zip(step.sequences, tokens, strict=True):
            if token is not None and not request.done:
                request.events.put((request, token))
        for request in left:
            self._finish(request)
        self.steps += 1
        if self.on_step is not None:
            self.on_step(step.kind, len(step.sequences))

    def _batch(self, step: Step) -> PackedBatch:
        """The step's tokens: whole prompts attend within themselves (prefill_batch); decodes and prompt
        chunks attend through the cache (cached_batch), with logits only where a token is sampled."""
        tables = self.scheduler.allocator.block_table_tensor([r.seq_id for r in step.sequences], "cpu")
        block_size = self.scheduler.block_size
        if step.kind == "prefill":
            contexts = [torch.tensor(r.context, dtype=torch.long) for r in step.sequences]
            return prefill_batch(contexts, tables, block_size)
        tokens = torch.tensor([token for r, start, n in zip(step.sequences, step.starts, step.lengths, strict=True)
                               for token in r.context[start:start + n]])
        rows = None if step.kind == "decode" else torch.tensor(step.sampled_rows, dtype=torch.long)
        return cached_batch(tokens, torch.tensor(step.lengths), torch.tensor(step.starts), tables, block_size, rows)

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[int | None]:
        """Each request's next token (None for one that finished while the step ran, or whose sampling
        failed: that request alone ends with the error)."""
        wanted = [r.logprobs for r in requests if r.logprobs is not None]
        if wanted:  # one log_softmax and top-k for the whole step
            logp = torch.log_softmax(logits.float(), dim=-1)
            top_values, top_ids = logp.topk(max(wanted), dim=-1)
        tokens: list[int | None] = []
        for row, request in enumerate(requests):
            if request.finished:  # cancelled while the step ran
                tokens.append(None)
                continue
            try:
                token = int(request.sampler(logits[row:row + 1], torch.zeros(1, dtype=torch.long),
                                            len(request.tokens))[0])
            except RuntimeError as e:  # this request's sampling parameters: the others go on
                request.finish_reason, request.error = "error", e
                tokens.append(None)
                continue
            if request.logprobs is not None:
                k = request.logprobs
                top = list(zip(top_ids[row, :k].tolist(), top_values[row, :k].tolist(), strict=True))
                request.token_logprobs.append(TokenLogprob(float(logp[row, token]), top))
            tokens.append(token)
        return tokens

    @staticmethod
    def _finish(request: Request) -> None:
        if request.done:
            return
        request._done.set()
        request.events.put((request, DONE))
