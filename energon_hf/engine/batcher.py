"""Continuous batching: requests join and leave the running batch at every step (iteration-level scheduling,
as in Orca and vLLM).

Each step: the Scheduler (engine/scheduler.py) picks its work, one model call runs it on the runner
(LocalRunner or the multi-process engine) and its KV cache, one batched pass turns the step's logits rows into
tokens (engine/sampler.py: each row under its own request's parameters), and the Scheduler takes the tokens
back and retires what finished. Requests hear of their tokens through their event queues. A server's batcher
runs the steps on a thread of its own, which sleeps while there is nothing to do; generate's are run by the
callers waiting on them.

Every generation runs here: the server's requests, and `EnergonModel.generate` (so the pipelines too), whose
prompts are one group of requests sharing a sampler. Concurrent calls batch together. A beam search's beams are
requests of one group too: each step they get their best tokens back instead of a drawn one, and the group's
BeamGroup (engine/beam_search.py) chooses how they continue (Scheduler.branch).
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

from .beam_search import BeamGroup, BeamSettings
from .params import GenerationParams
from .sampling import SampleRow, SamplerSpec, SamplingPlan, TokenLogprob
from .scheduler import Scheduler, Sequence, Step

DONE = object()  # the last event of a request


@dataclass(eq=False)
class Request(Sequence):
    """One generation request; iterate `stream()` for its tokens as they come, or call `result()`.

    Events go to `events` as (request, token) and (request, DONE); several requests may share one queue
    (n choices of one prompt) and a reader tells them apart by the request."""

    group: int = 0  # the key of its sampler (engine/sampling.py): the requests of one submit_group share it
    row: int = 0  # this request's row in its group
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely tokens'
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    beams: BeamGroup | None = None  # a beam search's requests: its beams, and where its results are
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
    """Serves generation requests on a runner, owning its KV cache.

    `max_batch_tokens` bounds the tokens of one step (decodes and prompt chunks); `max_running` the sequences
    running together. The cache holds `num_blocks`; with `grow` it grows when requests arrive to what every
    live request could hold at its longest (generate's way: it never preempts), else it is fixed (the
    server's, sized from memory) and requests beyond it wait or are preempted.

    With `background` a thread of its own runs the steps (a server). Without, the callers of `wait` run them,
    one step at a time whoever's requests are in it, until their own requests finish (generate, as vLLM's
    offline engine). This keeps a lone generate on its caller's thread: each thread that runs torch's
    parallel ops keeps its own OpenMP pool, and with a second pool alive on this 2-core machine libgomp stops
    spinning its workers, so every parallel op waits for a wake-up (SmolLM2 int4 decode step: 22 ms on the
    thread whose pool is the only one, 37 ms on a second thread).
    """

    def __init__(self, runner, vocab_size: int, num_blocks: int = 0, block_size: int = BLOCK_SIZE,
                 max_batch_tokens: int = 4096, max_running: int = 256,
                 grow: bool = False, background: bool = True, recompute_at: int | None = None):
        self.runner, self.vocab_size, self.grow = runner, vocab_size, grow
        self.scheduler = Scheduler(num_blocks, block_size, max_batch_tokens, max_running, recompute_at)
        self._cache_blocks = 0  # blocks the runner's cache holds (allocated by the thread that runs steps)
        self._ids = itertools.count()
        self._groups = itertools.count()  # sampler keys
        self._unsent: dict[int, SamplerSpec] = {}  # groups the runner's samplers do not know yet
        self._live: dict[int, int] = {}  # per group, its requests not done
        self._gone: list[int] = []  # groups the runner's samplers may forget
        self._reset = True  # the next plan clears the runner's samplers (groups of an earlier batcher)
        self._beams: dict[int, BeamGroup] = {}  # beam searches in flight, by group key
        self._reorders: dict[int, list[tuple[int, int, int]]] = {}  # their choices the samplers have not heard
        self._wake = threading.Condition()
        self._stepping = threading.Lock()  # one step at a time
        self._stopped = False
        self.steps = 0
        self.on_step: Callable[[str, int], None] | None = None  # (kind, sequences): for metrics
        self._thread: threading.Thread | None = None
        if background:
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
        return self._thread.is_alive() if self._thread is not None else not self._stopped

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: GenerationParams, generator: torch.Generator | None = None,
               logprobs: int | None = None, events: queue.Queue | None = None, hf_draws: bool = True) -> Request:
        """Queue a request. `logprobs=k` records each token's log-probability and the k most likely
        alternatives; `events` is a queue shared with other requests (default: its own); `hf_draws=False` lets
        an unseeded request draw the cheap way (see Sampler)."""
        return self.submit_group([prompt], params, generator, logprobs, events, hf_draws)[0]

    def submit_group(self, prompts: list[list[int]], params: GenerationParams,
                     generator: torch.Generator | None = None, logprobs: int | None = None,
                     events: queue.Queue | None = None, hf_draws: bool = True,
                     stops: Callable[[list[int]], bool] | None = None, beams: BeamSettings | None = None
                     ) -> list[Request]:
        """Queue prompts that sample together, as the rows of one HF generate call: each step, one sampler
        draws the tokens of the group's rows in that step in one call, in row order. A seeded group whose
        rows stay in step (prompts admitted in one step, no preemption) thus equals transformers'
        torch.manual_seed + generate on the same batch. `stops` tests a request's tokens after each new one (its
        stop strings). With `beams`, each prompt runs a beam search: num_beams requests (rows p * num_beams + j),
        the first queued, the others running from the first choice on; their results are the BeamGroup's. All are
        queued, or none (ValueError)."""
        eos = frozenset(params.eos_token_ids)
        key = next(self._groups)
        if beams is not None:
            if not self.grow:  # a fixed cache may preempt a beam, whose parent's blocks its siblings share
                raise ValueError("beam search runs on a model's own generate batcher, not on a server's")
            prompts = [p for p in prompts for _ in range(beams.num_beams)]
        requests = [Request(next(self._ids), list(p), params.max_new_tokens, eos, stops=stops, group=key, row=row,
                            logprobs=logprobs) for row, p in enumerate(prompts)]
        queued = requests
        if beams is not None:
            group = BeamGroup(requests, beams, stops)
            for request in requests:
                request.beams = group
            queued = requests[::beams.num_beams]
        for request in requests:
            if events is not None:
                request.events = events
        spec = SamplerSpec(key, params, self.vocab_size, generator, hf_draws,
                           [list(p) for p in prompts] if params.reads_history else None)
        with self._wake:
            if self._stopped:
                raise RuntimeError("the batcher is stopped")
            if self.grow:
                self.scheduler.allocator.grow(self.scheduler.blocks_wanted(*requests))
            self.scheduler.add(*queued)  # refuses an empty prompt or one the cache could never hold
            if beams is not None:
                self._beams[key] = requests[0].beams
            self._unsent[key] = spec
            self._live[key] = len(requests)
            self._wake.notify()
        return requests

    def wait(self, requests: list[Request]) -> list[list[int]]:
        """The tokens of each request, once all finished (running the steps, without a background thread);
        the first error raised, and an error for a request the batcher's closing cut short. Interrupted (or the
        loop gone), it cancels the requests and frees their blocks, so nothing keeps running for a caller that
        left."""
        try:
            for request in requests:
                while not request.done:
                    ran = self.step() if self._thread is None else request._done.wait(1.0) or self.alive
                    if not (ran or request.done):
                        raise RuntimeError("the batcher stopped before the requests finished")
                if request.finish_reason == "cancelled" and request.error is None:
                    raise RuntimeError("the batcher was closed before the requests finished")
            return [request.result() for request in requests]
        finally:
            left = [request for request in requests if not request.done]
            for request in left:
                self.cancel(request)
            if left and self._thread is None:  # no loop of ours will come by to free them
                with self._stepping, self._wake:
                    dropped = self.scheduler.drop_cancelled()
                for request in dropped:
                    self._finish(request)

    def cancel(self, request: Request) -> None:
        """Stop a request (a client that went away): it leaves the batch at the next step (a beam search's
        beams that were not running yet, now)."""
        with self._wake:
            parked = request.beams is not None and not request.finished and request not in self.scheduler.running \
                and request not in self.scheduler.waiting
            self.scheduler.cancel(request)
            self._wake.notify()
        if parked:
            self._finish(request)

    def close(self) -> None:
        """Stop: the requests left end cancelled, after the step in flight, if any (a background loop ends
        them as it exits; its thread is waited for 30 s)."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(30)
        else:
            self._cancel_left()

    def _cancel_left(self) -> None:
        with self._stepping, self._wake:
            left = self._with_parked_beams(self.scheduler.abort("cancelled"), "cancelled")
        for request in left:
            self._finish(request)

    # -- the steps ---------------------------------------------------------------------------------
    def step(self) -> bool:
        """Schedule and run one step; False when stopped or there was nothing to run."""
        with self._stepping:
            with self._wake:
                if self._stopped:
                    return False
                step = self.scheduler.schedule()
            if step is None:
                return False
            for request in step.retired:
                self._finish(request)
            if step.sequences:
                self._run(step)
            return True

    def _loop(self) -> None:
        """The background thread: the cache is allocated here (by the thread that uses it), then steps run
        while there is work, and it sleeps while there is none."""
        try:
            self._fit_cache()
        except Exception as e:  # noqa: BLE001 - the cache cannot be had: every request gets the error
            self._fail(e)
        while True:
            with self._wake:
                while not self._stopped and self.scheduler.idle:
                    self._wake.wait()
                if self._stopped:
                    break
            self.step()
        self._cancel_left()

    def _fit_cache(self) -> None:
        """Grow the runner's cache to the blocks the scheduler hands out (before a step may use them)."""
        blocks = self.scheduler.allocator.num_blocks_total
        if blocks > self._cache_blocks:
            self.runner.ensure_cache(blocks, self.scheduler.block_size)
            self._cache_blocks = blocks

    def _run(self, step: Step) -> None:
        """One model call for the step, sampled where the logits are, and the Scheduler's bookkeeping."""
        plan = None
        try:
            self._fit_cache()
            batch, plan = self._batch(step), self._plan(step)
            sampled = self.runner.step(batch, plan)
        except Exception as e:  # noqa: BLE001 - the engine failed: every request in flight gets the error
            if plan is not None:  # the runner may not have applied it: the next plan says it again
                with self._wake:
                    self._gone.extend(plan.dropped)
                    self._reset = self._reset or plan.reset
            self._fail(e)
            return
        tokens: list[int | None] = [None] * len(step.sequences)  # a chunk that does not end its prompt: none
        with self._wake:
            for i, token, logprob in zip(step.sampled_rows, sampled.tokens, sampled.logprobs, strict=True):
                request = step.sequences[i]
                if request.finished:  # cancelled while the step ran: its token is dropped
                    continue
                tokens[i] = token
                if logprob is not None:
                    request.token_logprobs.append(logprob)
                if request.group in sampled.errors:
                    request.finish_reason, request.error = "error", sampled.errors[request.group]
            managed = frozenset(r.seq_id for r in step.sequences if r.beams is not None)
            left = self.scheduler.postprocess(step, tokens, managed)
            if managed:
                left += self._advance_beams(step, sampled.candidates)
        for request, token in zip(step.sequences, tokens, strict=True):
            if token is not None and not request.done:
                request.events.put((request, token))
        for request in left:
            self._finish(request)
        self.steps += 1
        if self.on_step is not None:
            self.on_step(step.kind, len(step.sequences))

    def _plan(self, step: Step) -> SamplingPlan:
        """What the runner samples: the step's sampled rows (none for a request finished since it was
        scheduled), the groups it meets for the first time, and the groups gone since the last step; the first
        plan of a batcher clears the runner's samplers (a runner serves one batcher at a time: its group keys
        start at 0 again)."""
        with self._wake:
            rows = [None if (r := step.sequences[i]).finished else
                    SampleRow(r.group, r.row, len(r.tokens), r.logprobs, r.beams.settings.keep if r.beams else 0)
                    for i in step.sampled_rows]
            new = [self._unsent.pop(key) for key in dict.fromkeys(r.key for r in rows if r is not None)
                   if key in self._unsent]
            plan = SamplingPlan(rows, new, self._gone, self._reset, self._reorders)
            self._gone, self._reset, self._reorders = [], False, {}
        return plan

    def _fail(self, error: BaseException) -> None:
        with self._wake:
            failed = self._with_parked_beams(self.scheduler.abort("error"), "error")
        for request in failed:
            request.error = request.error or error
            self._finish(request)

    def _advance_beams(self, step: Step, candidates: dict[int, tuple[list[int], list[float]]]) -> list[Request]:
        """Each beam search of the step takes its beams' candidates (step rows in `candidates`, by index among
        the step's sampled rows) and chooses: the chosen beams branch from their parents (Scheduler.branch), the
        samplers hear the choice with the next plan, and a prompt whose search is done retires its beams.
        Returns the requests that left."""
        by_prompt: dict[tuple[int, int], dict[int, tuple[list[int], list[float]]]] = {}
        for n, i in enumerate(step.sampled_rows):
            request = step.sequences[i]
            if request.beams is not None and not request.finished and n in candidates:
                k = request.beams.settings.num_beams
                by_prompt.setdefault((request.group, request.row // k), {})[request.row % k] = candidates[n]
        left: list[Request] = []
        for (key, prompt), beams in by_prompt.items():
            group = self._beams[key]
            search, members = group.prompts[prompt], group.members(prompt)
            if any(member.finished for member in members):  # a beam was cancelled: the search ends
                self.scheduler.retire(members, "cancelled")
                left += members
                search.done = True
                continue
            ordered = [beams[j] for j in sorted(beams)]
            moves = search.advance([ids for ids, _ in ordered], [scores for _, scores in ordered])
            if search.done:
                self.scheduler.retire(members, "stop")
                left += members
                continue
            self.scheduler.branch([(members[j], members[parent], token) for j, (parent, token) in enumerate(moves)])
            self._reorders.setdefault(key, []).extend(
                (members[j].row, members[parent].row, token) for j, (parent, token) in enumerate(moves))
        return left  # (a group leaves _beams when its last request finishes: _finish)

    def _with_parked_beams(self, finished: list[Request], reason: str) -> list[Request]:
        """`finished` and the beams of their searches that were not running yet, finished too."""
        parked = [r for group in self._beams.values() for r in group.requests if not r.finished and r not in finished]
        for request in parked:
            request.finish_reason = reason
        self._beams.clear()
        return finished + parked

    def _batch(self, step: Step) -> PackedBatch:
        """The step's tokens: whole prompts attend within themselves (prefill_batch); decodes and prompt
        chunks attend through the cache (cached_batch), with logits only where a token is sampled."""
        allocator, block_size = self.scheduler.allocator, self.scheduler.block_size
        if step.kind == "prefill":
            contexts = [torch.tensor(r.context, dtype=torch.long) for r in step.sequences]
            tables = allocator.block_table_tensor([r.seq_id for r in step.sequences], "cpu")
            return prefill_batch(contexts, tables, block_size)
        tokens = [token for r, start, n in zip(step.sequences, step.starts, step.lengths, strict=True)
                  for token in r.context[start:start + n]]
        tables = [allocator.tables[r.seq_id] for r in step.sequences]
        rows = None if step.kind == "decode" else step.sampled_rows
        batch = cached_batch(tokens, step.lengths, step.starts, tables, block_size, rows)
        batch.block_copies = step.block_copies
        return batch

    def _finish(self, request: Request) -> None:
        """Once per request, whichever thread comes first (a canceller, the stepping thread)."""
        with self._wake:
            if request.done:
                return
            request._done.set()
            self._live[request.group] -= 1
            if not self._live[request.group]:  # the last request of its group: its sampler may go
                del self._live[request.group]
                self._beams.pop(request.group, None)
                self._reorders.pop(request.group, None)
                if self._unsent.pop(request.group, None) is None:
                    self._gone.append(request.group)
        request.events.put((request, DONE))
