"""The scheduler of continuous batching: pure bookkeeping over sequences and KV cache blocks (no threads, no
tensors, no sampling), as nano-vllm's. `schedule()` says what the next engine step runs, `postprocess()`
takes the tokens the step produced and retires what finished.

Every step mixes, under a budget of `max_batch_tokens` tokens (chunked prefill, as vLLM and Sarathi-Serve):
- a decode token for every running sequence whose context is cached but for its last token. When the cache
  cannot hold the next token of each, the newest running sequence is preempted: its blocks are freed and it
  goes back to the front of the queue, to recompute its whole context (prompt and tokens made so far);
- then the next chunk of each running sequence still prefilling, as far as the budget goes;
- then waiting sequences, admitted in arrival order while the budget lasts and the free blocks hold their
  context plus one token (keeping one block of headroom per running sequence), each with a first chunk.
A sequence samples a token in the step whose chunk ends its context. So a long prompt never stalls the
running decodes for more than one budget's worth of tokens, and new requests join at the next step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from energon_hf.kv_cache import BlockAllocator


@dataclass(eq=False)
class Sequence:
    """What the scheduler knows of a request: its tokens, its limits, and why it finished."""

    seq_id: int
    prompt: list[int]
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS, or `stops`), "length", "cancelled" or "error"
    num_cached: int = 0  # context tokens whose keys and values the cache holds
    stops: Callable[[list[int]], bool] | None = None  # the caller's test of the context after each token

    @property
    def context(self) -> list[int]:
        return self.prompt + self.tokens

    @property
    def uncached(self) -> int:
        """Context tokens still to run: 1 for a decoding sequence (its last token), more while prefilling."""
        return len(self.prompt) + len(self.tokens) - self.num_cached

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Step:
    """The work of one engine step: each of `sequences` runs its next `lengths[i]` uncached context tokens,
    from `starts[i]` on, and samples a token if `samples[i]` (its chunk ends its context); `retired` left
    since the last step without running (cancelled).

    `kind` says which batch serves it best: "prefill" (whole contexts from scratch: attention within the new
    tokens), "decode" (one token each) or "mixed" (attention through the cache)."""

    sequences: list[Sequence] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)
    retired: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write before the step writes

    def add(self, sequence: Sequence, length: int) -> int:
        """Run `length` of the sequence's uncached tokens in this step; returns `length`."""
        self.sequences.append(sequence)
        self.lengths.append(length)
        self.starts.append(sequence.num_cached)
        self.samples.append(length == sequence.uncached)
        return length

    @property
    def sampled_rows(self) -> list[int]:
        """The indices of the sequences that sample a token in this step."""
        return [i for i, samples in enumerate(self.samples) if samples]

    @property
    def kind(self) -> str:
        if all(start == 0 and sample for start, sample in zip(self.starts, self.samples, strict=True)):
            return "prefill"
        return "decode" if all(n == 1 and sample for n, sample in zip(self.lengths, self.samples, strict=True)) \
            else "mixed"


class Scheduler:
    """`recompute_at`: a running sequence whose context reaches this length, its cache holding one token fewer,
    runs its whole context again (StagedModel.recompute_at: Phi-3 switches its rotary factors there)."""

    def __init__(self, num_blocks: int, block_size: int, max_batch_tokens: int = 4096, max_running: int = 256,
                 recompute_at: int | None = None):
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.recompute_at = recompute_at
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    def add(self, *sequences: Sequence) -> None:
        """Queue sequences, all or none: ValueError for an empty prompt or one the whole cache could never
        hold."""
        for sequence in sequences:
            if not sequence.prompt:
                raise ValueError("the prompt is empty")
            prompt_len, new = len(sequence.prompt), sequence.max_new_tokens
            needed = self.allocator.blocks_for(prompt_len + new)
            if needed > self.allocator.num_blocks_total:
                raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({new}) needs {needed} KV "
                                 f"cache blocks; the cache holds {self.allocator.num_blocks_total}")
        self.waiting.extend(sequences)

    def blocks_wanted(self, *new: Sequence) -> int:
        """The blocks that every live sequence, and `new` ones, could hold at their longest, with one block of
        headroom each (what admitting them all at once asks): a cache this size never preempts them."""
        live = [*self.running, *self.waiting, *new]
        return sum(self.allocator.blocks_for(len(s.prompt) + s.max_new_tokens) + 1 for s in live)

    def cancel(self, sequence: Sequence) -> None:
        """Mark a sequence cancelled; the next schedule() frees it (a step in flight may still produce for it,
        and postprocess() ignores that token)."""
        if sequence.finish_reason is None:
            sequence.finish_reason = "cancelled"

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> Step | None:
        """The next step, or None when there is nothing to run (every sequence left is retired)."""
        step = Step(retired=self.drop_cancelled())
        self._make_room()
        if self.recompute_at is not None:
            self._recompute(step)
        budget = self.max_batch_tokens
        decoding = [s for s in self.running if s.uncached == 1]
        for sequence in decoding:  # the last token is not cached yet: it is this step's input
            self.allocator.reserve(sequence.seq_id, len(sequence.context))
            if self.allocator.sharing and \
                    (copy := self.allocator.writable(sequence.seq_id, len(sequence.context) - 1)) is not None:
                step.block_copies.append(copy)
            step.add(sequence, 1)
        budget -= len(decoding)
        for sequence in [s for s in self.running if s.uncached > 1]:  # prompts part-way through, oldest first
            if budget <= 0:
                break
            budget -= step.add(sequence, min(sequence.uncached, budget))
        while budget > 0 and (sequence := self._admit()) is not None:
            budget -= step.add(sequence, min(sequence.uncached, budget))
        return step if step.sequences or step.retired else None

    def postprocess(self, step: Step, tokens: list[int | None], managed: frozenset[int] = frozenset()
                    ) -> list[Sequence]:
        """Count each sequence's chunk as cached, append the token of each that sampled one (None: it produced
        none, e.g. its sampling failed and it was finished with an error) and retire the ones that finished.
        Sequences in `managed` (ids) only count their chunk: the caller picks their tokens (beam search: `branch`).
        Returns every sequence that left."""
        left = []
        for sequence, length, samples, token in zip(step.sequences, step.lengths, step.samples, tokens,
                                                    strict=True):
            if sequence.seq_id in managed and not sequence.finished:
                sequence.num_cached += length
                continue
            if sequence.finished or (samples and token is None):  # cancelled while the step ran, or failed
                if sequence in self.running:
                    self._retire(sequence, sequence.finish_reason or "error")
                    left.append(sequence)
                continue
            sequence.num_cached += length
            if not samples:
                continue
            sequence.tokens.append(token)
            if token in sequence.eos_token_ids:
                self._retire(sequence, "stop")
                left.append(sequence)
            elif len(sequence.tokens) >= sequence.max_new_tokens:
                self._retire(sequence, "length")
                left.append(sequence)
            elif sequence.stops is not None and sequence.stops(sequence.context):
                self._retire(sequence, "stop")
                left.append(sequence)
        return left

    def branch(self, moves: list[tuple[Sequence, Sequence, int]]) -> None:
        """Beam search's choice: each (sequence, parent, token) makes `sequence` its parent's tokens and cached
        context, sharing the parent's cache blocks, then `token` (its next input); one not running yet (a beam
        before the first choice) starts running."""
        before = {id(parent): (list(parent.tokens), parent.num_cached) for _, parent, _ in moves}
        self.allocator.share({s.seq_id: self.allocator.tables[parent.seq_id] for s, parent, _ in moves})
        for sequence, parent, token in moves:
            tokens, cached = before[id(parent)]
            sequence.tokens, sequence.num_cached = tokens + [token], cached
            if sequence not in self.running:
                self.running.append(sequence)

    def retire(self, sequences: list[Sequence], reason: str) -> None:
        """Finish these sequences now (a beam search that is done), running or not."""
        for sequence in sequences:
            self._retire(sequence, reason)

    def abort(self, reason: str) -> list[Sequence]:
        """Finish every sequence (the engine failed, or it is stopping); returns them."""
        everyone = [*self.running, *self.waiting]
        for sequence in everyone:
            self._finish(sequence, reason)
        self.running, self.waiting = [], deque()
        return everyone

    # -- internals -------------------------------------------------------------------------------
    def _retire(self, sequence: Sequence, reason: str) -> None:
        if sequence in self.running:  # (a beam not running yet is retired with its search)
            self.running.remove(sequence)
        self._finish(sequence, reason)

    def _finish(self, sequence: Sequence, reason: str) -> None:
        """Free its blocks and set why it finished (a reason already set stands, but for a cancel)."""
        self.allocator.release(sequence.seq_id)
        if sequence.finish_reason in (None, "cancelled"):
            sequence.finish_reason = reason

    def drop_cancelled(self) -> list[Sequence]:
        """Free the cancelled sequences' blocks and forget them (schedule() does it first); returns them."""
        dropped = [s for s in [*self.running, *self.waiting] if s.finish_reason == "cancelled"]
        for sequence in dropped:
            self.allocator.release(sequence.seq_id)
        self.running = [s for s in self.running if s.finish_reason != "cancelled"]
        self.waiting = deque(s for s in self.waiting if s.finish_reason != "cancelled")
        return dropped

    def _admit(self) -> Sequence | None:
        """The first waiting sequence, moved to the running ones, if the free blocks hold its context plus one
        token with one block of headroom per running sequence; else None."""
        if not self.waiting or len(self.running) >= self.max_running:
            return None
        sequence = self.waiting[0]
        blocks = self.allocator.blocks_for(len(sequence.context) + 1)
        if blocks + len(self.running) > self.allocator.num_free:
            return None
        self.allocator.reserve(sequence.seq_id, len(sequence.context) + 1)
        self.running.append(self.waiting.popleft())
        return sequence

    def _recompute(self, step: Step) -> None:
        """Sequences reaching `recompute_at` run from their first token again; blocks they share (beams) are
        copied first, as every position is written."""
        for sequence in self.running:
            if len(sequence.context) == self.recompute_at and sequence.num_cached == self.recompute_at - 1:
                self.allocator.reserve(sequence.seq_id, len(sequence.context))
                if self.allocator.sharing:
                    for position in range(0, len(sequence.context), self.block_size):
                        if (copy := self.allocator.writable(sequence.seq_id, position)) is not None:
                            step.block_copies.append(copy)
                sequence.num_cached = 0

    def _make_room(self) -> None:
        """Preempt the newest running sequences until every one can cache its next token."""
        def missing() -> int:
            return sum(max(0, self.allocator.blocks_for(len(s.context)) - len(self.allocator.tables[s.seq_id]))
                       for s in self.running)

        while self.running and missing() > self.allocator.num_free:
            victim = self.running.pop()
            self.allocator.release(victim.seq_id)
            victim.num_cached = 0
            self.preemptions += 1
            self.waiting.appendleft(victim)
