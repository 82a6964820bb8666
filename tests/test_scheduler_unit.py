"""The pure Scheduler, driven with fake token outputs and no model: admission under the token budget and
the free blocks, retirement on EOS and length, preemption with recompute, cancellation, refusal."""

import pytest

from energon_hf.engine.scheduler import Scheduler, Sequence
from energon_hf.kv_cache import BlockAllocator

EOS = 2


def seq(seq_id: int, length: int, new: int = 8) -> Sequence:
    return Sequence(seq_id, [5] * length, new, frozenset({EOS}))


def run(scheduler: Scheduler, token=7):
    """One step with every sequence producing `token` (or token(sequence))."""
    step = scheduler.schedule()
    tokens = [token(s) if callable(token) else token for s in step.sequences]
    return step, scheduler.postprocess(step, tokens)


def test_each_step_mixes_decodes_with_prompt_chunks_under_the_token_budget():
    scheduler = Scheduler(num_blocks=64, block_size=4, max_batch_tokens=25)
    for i, length in enumerate((30, 10, 10, 10)):
        scheduler.add(seq(i, length))
    steps = []
    for _ in range(4):
        step, _ = run(scheduler)
        steps.append((step.kind, [s.seq_id for s in step.sequences], step.lengths, step.samples))
    assert steps == [
        ("mixed", [0], [25], [False]),  # the first 25 tokens of 30: nothing to sample yet
        ("mixed", [0, 1, 2], [5, 10, 10], [True] * 3),  # the rest of the first prompt, then two whole prompts
        ("mixed", [0, 1, 2, 3], [1, 1, 1, 10], [True] * 4),  # three decodes beside the last prompt
        ("decode", [0, 1, 2, 3], [1] * 4, [True] * 4),
    ]
    assert [len(s.tokens) for s in scheduler.running] == [3, 3, 3, 2]
    assert all(s.num_cached == len(s.context) - 1 for s in scheduler.running)


def test_whole_prompts_within_the_budget_are_a_prefill_step():
    scheduler = Scheduler(num_blocks=64, block_size=4, max_batch_tokens=25)
    scheduler.add(seq(0, 10))
    scheduler.add(seq(1, 12))
    step, _ = run(scheduler)
    assert step.kind == "prefill" and step.lengths == [10, 12] and step.starts == [0, 0]


def test_sequences_retire_on_eos_and_on_length_and_free_their_blocks():
    scheduler = Scheduler(num_blocks=16, block_size=4)
    a, b = seq(0, 5, new=3), seq(1, 6, new=10)
    scheduler.add(a)
    scheduler.add(b)
    run(scheduler)  # prefill: one token each
    _, left = run(scheduler, token=lambda s: EOS if s is b else 7)
    assert left == [b] and b.finish_reason == "stop" and b.tokens == [7, EOS]
    _, left = run(scheduler)
    assert left == [a] and a.finish_reason == "length" and len(a.tokens) == 3
    assert scheduler.idle and scheduler.schedule() is None
    assert scheduler.allocator.num_free == 16 and not scheduler.allocator.tables


def test_a_full_cache_preempts_the_newest_and_recomputes_its_whole_context():
    # 6 blocks of 4 tokens: two sequences of 8 tokens take 3 blocks each once they reach 9 tokens
    scheduler = Scheduler(num_blocks=6, block_size=4)
    first, second = seq(0, 7, new=8), seq(1, 7, new=8)
    scheduler.add(first)
    scheduler.add(second)
    step, _ = run(scheduler)
    assert step.kind == "prefill" and len(step.sequences) == 2
    steps = []
    while second.finish_reason is None or first.finish_reason is None:
        step, _ = run(scheduler)
        steps.append((step.kind, [s.seq_id for s in step.sequences], len(step.sequences[0].context)))
    assert scheduler.preemptions >= 1
    readmitted = next(s for s in steps if s[0] == "prefill")
    assert readmitted[1] == [1] and readmitted[2] > 7  # its prompt and the tokens it had made, recomputed
    assert len(first.tokens) == len(second.tokens) == 8
    assert scheduler.allocator.num_free == 6


def test_cancelled_sequences_leave_at_the_next_step_and_a_token_made_meanwhile_is_dropped():
    scheduler = Scheduler(num_blocks=16, block_size=4)
    running, waiting = seq(0, 5), seq(1, 5)
    scheduler.add(running)
    run(scheduler)
    scheduler.add(waiting)
    scheduler.cancel(waiting)
    step = scheduler.schedule()
    assert step.retired == [waiting] and waiting.finish_reason == "cancelled"
    scheduler.cancel(running)  # while the step runs
    left = scheduler.postprocess(step, [7])
    assert left == [running] and running.tokens == [7] and running.finish_reason == "cancelled"
    assert scheduler.idle and scheduler.allocator.num_free == 16


def test_a_failed_token_ends_only_its_sequence():
    scheduler = Scheduler(num_blocks=16, block_size=4)
    a, b = seq(0, 4), seq(1, 4)
    scheduler.add(a)
    scheduler.add(b)
    step = scheduler.schedule()
    b.finish_reason = "error"  # its sampling failed
    left = scheduler.postprocess(step, [7, None])
    assert left == [b] and b.finish_reason == "error" and scheduler.running == [a]


def test_refusals_name_the_problem():
    scheduler = Scheduler(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="empty"):
        scheduler.add(Sequence(0, [], 4))
    with pytest.raises(ValueError, match="needs 5 KV cache blocks; the cache holds 4"):
        scheduler.add(seq(1, 10, new=10))


def test_abort_finishes_everyone_and_frees_the_cache():
    scheduler = Scheduler(num_blocks=16, block_size=4)
    a, b = seq(0, 4), seq(1, 4)
    scheduler.add(a)
    run(scheduler)
    scheduler.add(b)
    assert set(scheduler.abort("error")) == {a, b}
    assert a.finish_reason == b.finish_reason == "error" and scheduler.allocator.num_free == 16


def test_a_long_prompt_arriving_never_stalls_the_running_decodes():
    scheduler = Scheduler(num_blocks=32, block_size=4, max_batch_tokens=8)
    running, long = seq(0, 4, new=10), seq(1, 20)
    scheduler.add(running)
    run(scheduler)
    scheduler.add(long)
    chunks = []
    while not long.tokens:
        before = len(running.tokens)
        step, _ = run(scheduler)
        assert len(running.tokens) == before + 1  # a token every step
        chunks.append(step.lengths[step.sequences.index(long)])
    assert chunks == [7, 7, 6] and long.num_cached == 20


def test_a_group_is_queued_whole_or_not_at_all_and_blocks_wanted_fit_it_without_preemption():
    scheduler = Scheduler(num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="empty"):
        scheduler.add(seq(0, 3), Sequence(1, [], 4))
    assert not scheduler.waiting  # the good one was not queued either
    group = [seq(i, length, new=6) for i, length in enumerate((3, 11, 6))]
    wanted = scheduler.blocks_wanted(*group)
    assert wanted == (3 + 1) + (5 + 1) + (3 + 1)  # ceil((prompt + 6) / 4) + 1 headroom each
    scheduler.allocator.grow(wanted)
    assert scheduler.allocator.num_free == wanted
    scheduler.add(*group)
    steps = 0
    while not scheduler.idle:
        run(scheduler)
        steps += 1
    assert scheduler.preemptions == 0 and steps == 6  # all admitted at once, in step to the end
    assert scheduler.allocator.num_free == wanted


def test_blocks_are_handed_out_in_order_again_once_all_are_free():
    """A lone sequence after others left gets consecutive blocks (its attention reads the cache as a view)."""
    allocator = BlockAllocator(16, 4)
    allocator.reserve(0, 12)
    allocator.reserve(1, 8)
    allocator.release(0)
    assert allocator.reserve(2, 8) == [5, 6]  # while blocks are in use, freed ones go last
    allocator.release(1)
    allocator.release(2)
    assert allocator.reserve(3, 20) == [0, 1, 2, 3, 4]
