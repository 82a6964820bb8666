"""The scheduler of continuous batching: pure bookkeeping over sequences and KV cache blocks (no threads, no
tensors, no sampling), as nano-vllm's. `schedule()` says what the next engine step runs, `postprocess()`
takes the tokens the step produced and retires what finished.

A step is a prefill or a decode:
- prefill: waiting sequences admitted in arrival order while their tokens fit `max_batch_tokens` (the
  first one always) and the free blocks hold their context plus one token, keeping one block of headroom
  per running sequence; a sequence runs its whole context (prompt and anything generated before a
  preemption, which is recomputed);
- decode: one token for every running sequence. When the cache cannot hold the next token of each, the
  newest running sequence is preempted: its blocks are freed and it goes back to the front of the queue.
Prefill comes first whenever a waiting sequence can be admitted, so new requests join at the next step;
the caller runs a decode after each prefill (`schedule(prefill=False)`), or a steady trickle of arrivals
would starve the running sequences (bench/serve_vs_hf.py, SmolLM2 at 64 clients: 75 tokens/s with prefill
steps only while anything can be admitted, 102 with a decode after each prefill, two runs on this machine).
"""

from __future__ import annotations

from collections import deque
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
    finish_reason: str | None = None  # "stop" (EOS), "length", "cancelled" or "error"

    @property
    def context(self) -> list[int]:
        return self.prompt + self.tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Step:
    """The work of one engine step: `sequences` run as a prefill (their whole contexts) or a decode (their
    last tokens); `retired` left since the last step without running (cancelled)."""

    kind: str  # "prefill" or "decode"
    sequences: list[Sequence]
    retired: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_batch_tokens: int = 4096, max_running: int = 256):
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    def add(self, sequence: Sequence) -> None:
        """Queue a sequence; ValueError for an empty prompt or one the whole cache could never hold."""
        if not sequence.prompt:
            raise ValueError("the prompt is empty")
        prompt_len, new = len(sequence.prompt), sequence.max_new_tokens
        needed = self.allocator.blocks_for(prompt_len + new)
        if needed > self.allocator.num_blocks_total:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({new}) needs {needed} KV "
                             f"cache blocks; the cache holds {self.allocator.num_blocks_total}")
        self.waiting.append(sequence)

    def cancel(self, sequence: Sequence) -> None:
        """Mark a sequence cancelled; the next schedule() frees it (a step in flight may still produce for it,
        and postprocess() ignores that token)."""
        if sequence.finish_reason is None:
            sequence.finish_reason = "cancelled"

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self, prefill: bool = True) -> Step | None:
        """The next step, or None when there is nothing to run (every sequence left is retired).
        `prefill=False`: a decode step even when waiting sequences could be admitted."""
        retired = self._drop_cancelled()
        admitted = self._admit() if prefill else []
        if admitted:
            self.running.extend(admitted)
            return Step("prefill", admitted, retired)
        self._make_room()
        if not self.running:
            return Step("decode", [], retired) if retired else None
        for sequence in self.running:  # the last token is not cached yet: it is this step's input
            self.allocator.reserve(sequence.seq_id, len(sequence.context))
        return Step("decode", list(self.running), retired)

    def postprocess(self, step: Step, tokens: list[int | None]) -> list[Sequence]:
        """Append each sequence's new token (None: it produced none, e.g. its sampling failed and it was
        finished with an error) and retire the ones that finished. Returns every sequence that left."""
        left = []
        for sequence, token in zip(step.sequences, tokens, strict=True):
            if sequence.finished or token is None:  # cancelled while the step ran, or failed
                if sequence in self.running:
                    self._retire(sequence, sequence.finish_reason or "error")
                    left.append(sequence)
                continue
            sequence.tokens.append(token)
            if token in sequence.eos_token_ids:
                self._retire(sequence, "stop")
                left.append(sequence)
            elif len(sequence.tokens) >= sequence.max_new_tokens:
                self._retire(sequence, "length")
                left.append(sequence)
        return left

    def abort(self, reason: str) -> list[Sequence]:
        """Finish every sequence (the engine failed, or it is stopping); returns them."""
        everyone = [*self.running, *self.waiting]
        for sequence in everyone:
            self._finish(sequence, reason)
        self.running, self.waiting = [], deque()
        return everyone

    # -- internals -------------------------------------------------------------------------------
    def _retire(self, sequence: Sequence, reason: str) -> None:
        self.running.remove(sequence)
        self._finish(sequence, reason)

    def _finish(self, sequence: Sequence, reason: str) -> None:
        """Free its blocks and set why it finished (a reason already set stands, but for a cancel)."""
        self.allocator.release(sequence.seq_id)
        if sequence.finish_reason in (None, "cancelled"):
            sequence.finish_reason = reason

    def _drop_cancelled(self) -> list[Sequence]:
        dropped = [s for s in [*self.running, *self.waiting] if s.finish_reason == "cancelled"]
        for sequence in dropped:
            self.allocator.release(sequence.seq_id)
        self.running = [s for s in self.running if s.finish_reason != "cancelled"]
        self.waiting = deque(s for s in self.waiting if s.finish_reason != "cancelled")
        return dropped

    def _admit(self) -> list[Sequence]:
        admitted, tokens = [], 0
        headroom = len(self.running)
        while self.waiting and len(self.running) + len(admitted) < self.max_running:
            sequence = self.waiting[0]
            length = len(sequence.context)
            if admitted and tokens + length > self.max_batch_tokens:
                break
            if self.allocator.blocks_for(length + 1) + headroom > self.allocator.num_free:
                break
            self.allocator.reserve(sequence.seq_id, length + 1)
            admitted.append(self.waiting.popleft())
            tokens += length
        return admitted

    def _make_room(self) -> None:
        """Preempt the newest running sequences until every one can cache its next token."""
        def missing() -> int:
            return sum(max(0, self.allocator.blocks_for(len(s.context)) - len(self.allocator.tables[s.seq_id]))
                       for s in self.running)

        while self.running and missing() > self.allocator.num_free:
            victim = self.running.pop()
            self.allocator.release(victim.seq_id)
            self.preemptions += 1
            self.waiting.appendleft(victim)
