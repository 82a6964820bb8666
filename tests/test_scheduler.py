"""Continuous batching on a real model: requests of mixed lengths arriving together give the tokens each
would get alone, also when prompts go in chunks beside decodes (with transformers' logits) and on tp=2 and
pp=2 engines; a full cache preempts and recomputes without changing results; a cancelled request leaves the
batch and frees its blocks."""

import threading

import pytest
import torch
import transformers
from helpers import ATOL
from test_parity_llama import LLAMA_TINY

from energon_hf import EnergonModel
from energon_hf.batch import cached_batch
from energon_hf.engine.batcher import ContinuousBatcher
from energon_hf.engine.params import GenerationParams
from energon_hf.engine.sampler import Draw, Sampler, sample
from energon_hf.engine.sampling import SampleRow, Samplers, SamplerSpec, SamplingPlan
from energon_hf.kv_cache import BlockAllocator


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_TINY)).save_pretrained(path)
    return EnergonModel.from_pretrained(path)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def _alone(model: EnergonModel, prompt: list[int], new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _params(new: int) -> GenerationParams:
    return GenerationParams(max_new_tokens=new, eos_token_ids=[])


@pytest.mark.parametrize("num_blocks,max_batch_tokens", [(256, 64), (16, 64), (256, 8)],
                         ids=["roomy", "preempting", "chunked"])
def test_concurrent_requests_match_their_solo_results(llama, num_blocks, max_batch_tokens):
    prompts = _prompts(12)
    new_tokens = [4 + (i * 7) % 20 for i in range(12)]
    expected = [_alone(llama, p, n) for p, n in zip(prompts, new_tokens, strict=True)]
    batcher = llama.start_batcher(num_blocks, block_size=4, max_batch_tokens=max_batch_tokens)
    steps, schedule = [], batcher.scheduler.schedule

    def recorded():  # the steps the batcher runs, seen as they are scheduled
        step = schedule()
        steps.append(step)
        return step

    batcher.scheduler.schedule = recorded
    try:
        requests = [None] * 12
        def submit(i):  # from several threads at once, like server handlers
            requests[i] = batcher.submit(prompts[i], _params(new_tokens[i]))
        threads = [threading.Thread(target=submit, args=(i,)) for i in range(12)]
        # All twelve are queued before the first step runs (the loop waits for its step lock), so whether the
        # small cache preempts does not depend on how fast the first requests finish.
        with batcher._stepping:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        results = [r.result(timeout=120) for r in requests]
        assert results == expected
        assert all(r.finish_reason == "length" for r in requests)
        assert list(requests[0].stream(timeout=1)) == expected[0]  # the stream saw the same tokens
        assert batcher.allocator.num_free == num_blocks  # every block came back
        assert (batcher.preemptions > 0) == (num_blocks == 16)
        ran = [step for step in steps if step is not None and step.sequences]
        assert all(sum(n for n in step.lengths if n > 1) <= max_batch_tokens for step in ran)
        if max_batch_tokens == 8:  # most prompts go in chunks
            assert any(not all(step.samples) for step in ran)
    finally:
        batcher.close()


def test_prompt_chunks_beside_a_decode_give_transformers_logits(llama):
    """One step runs a whole prompt and the first chunk of another; the next runs the first's decode token
    beside the rest of the second: each sampled row equals transformers' logits for the same context."""
    hf = transformers.LlamaForCausalLM.from_pretrained(llama.folder).eval()
    short, long = _prompts(1, seed=3)[0][:12], torch.randint(3, 128, (30,)).tolist()
    allocator = BlockAllocator(64, 4)
    allocator.reserve(0, len(short) + 1)
    allocator.reserve(1, len(long) + 1)
    tables = [allocator.tables[0], allocator.tables[1]]
    llama.start_batcher(64, block_size=4).close()  # the model's batcher owns the cache: a stopped one leaves it

    def step(tokens, lengths, starts, rows):
        batch = cached_batch(tokens, lengths, starts, tables, 4, rows)
        return llama.runner.run(batch, use_cache=True)["logits"]

    def reference(ids):
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0, -1]

    first = step(short + long[:10], [len(short), 10], [0, 0], [0])  # the long prompt's chunk samples nothing
    assert first.shape[0] == 1 and (first[0] - reference(short)).abs().max() <= ATOL
    token = int(first[0].argmax())
    second = step([token] + long[10:], [1, 20], [len(short), 10], [0, 1])
    assert (second[0] - reference(short + [token])).abs().max() <= ATOL
    assert (second[1] - reference(long)).abs().max() <= ATOL


def test_cancel_frees_the_request(llama):
    batcher = llama.start_batcher(128, block_size=4)
    try:
        long = batcher.submit(_prompts(1)[0], _params(400))
        stream = long.stream(timeout=30)
        next(stream)
        batcher.cancel(long)
        long.result(timeout=30)
        assert long.finish_reason == "cancelled" and len(long.tokens) < 400
        short = batcher.submit([5, 6, 7], _params(3))
        assert short.result(timeout=30) == _alone(llama, [5, 6, 7], 3)
        assert batcher.allocator.num_free == 128
    finally:
        batcher.close()


def test_request_larger_than_the_cache_is_refused(llama):
    batcher = llama.start_batcher(4, block_size=4)
    try:
        with pytest.raises(ValueError, match="KV cache blocks"):
            batcher.submit(list(range(3, 20)), _params(8))
        with pytest.raises(ValueError, match="empty"):
            batcher.submit([], _params(8))
    finally:
        batcher.close()


def _mixed_requests(batcher: ContinuousBatcher) -> tuple[list[list[int]], list[tuple[float, list]]]:
    """Greedy requests, a seeded one that samples with a repetition penalty and asks for logprobs, and one
    whose sampling fails (a penalty that makes its scores infinite) and ends alone with the error. Returns
    the tokens of the others and the sampled one's logprobs."""
    sampling = dict(max_new_tokens=6, eos_token_ids=[], do_sample=True)
    greedy = [batcher.submit(p, _params(6)) for p in _prompts(5, seed=1)]
    sampled = batcher.submit(_prompts(1, seed=2)[0], GenerationParams(**sampling, top_k=20, repetition_penalty=1.3),
                             torch.Generator().manual_seed(3), logprobs=2)
    bad = batcher.submit(list(range(3, 40)), GenerationParams(**sampling, top_k=0, repetition_penalty=1e-45),
                         torch.Generator().manual_seed(4))
    tokens = [r.result(timeout=120) for r in [*greedy, sampled]]
    with pytest.raises(RuntimeError, match="probability tensor"):
        bad.result(timeout=120)
    return tokens, [(lp.logprob, lp.top) for lp in sampled.token_logprobs]


@pytest.mark.parametrize("parallel", [dict(tp=2), dict(pp=2)], ids=["tp2", "pp2"])
def test_on_a_parallel_engine_with_prompt_chunks(llama, parallel):
    """The output rank samples (only ids and logprobs come back): greedy, seeded and failing requests give
    what they give on one process, and generate's unseeded draws repeat under torch.manual_seed."""
    batcher = llama.start_batcher(64, block_size=4, max_batch_tokens=16)
    try:
        tokens, logprobs = _mixed_requests(batcher)
    finally:
        batcher.close()
    assert tokens[:5] == [_alone(llama, p, 6) for p in _prompts(5, seed=1)]
    with EnergonModel.from_pretrained(llama.folder, threads_per_rank=1, **parallel) as engine:
        batcher = engine.start_batcher(64, block_size=4, max_batch_tokens=16)
        try:
            got_tokens, got_logprobs = _mixed_requests(batcher)
        finally:
            batcher.close()
        ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
        draws = []
        for seed in (5, 5):
            torch.manual_seed(seed)
            draws.append(engine.generate(ids, max_new_tokens=8, do_sample=True, top_k=0, eos_token_id=None))
        assert torch.equal(draws[0], draws[1])
        assert not torch.equal(draws[1], engine.generate(ids, max_new_tokens=8, do_sample=True, top_k=0,
                                                          eos_token_id=None))
    assert got_tokens == tokens
    for (logprob, top), (want, want_top) in zip(got_logprobs, logprobs, strict=True):
        assert abs(logprob - want) < 1e-4 and [t for t, _ in top] == [t for t, _ in want_top]


def test_concurrent_generate_calls_batch_together_and_keep_their_seeded_results(llama):
    """Three generate calls from three threads share the model's batcher: some steps run rows of several
    calls, the cache grows under running sequences (each later call adds to what the first asked), and every
    call, greedy or seeded sampling, returns what it returns alone."""
    calls = [(torch.tensor(_prompts(3, seed=4)[0][:9]).repeat(3, 1), dict(do_sample=True, seed=5, top_k=20)),
             (torch.tensor([_prompts(1, seed=5)[0][:7]]), dict(do_sample=False)),
             (torch.tensor([[5, 9, 11, 3], [7, 7, 8, 30]]), dict(do_sample=True, seed=9, temperature=0.7))]
    run = lambda ids, kw: llama.generate(ids, max_new_tokens=40, eos_token_id=None, **kw)  # noqa: E731
    alone = [run(ids, kw) for ids, kw in calls]
    batcher = llama.batcher
    widest, barrier, results = [], threading.Barrier(len(calls)), [None] * len(calls)
    batcher.on_step = lambda kind, sequences: widest.append(sequences)

    def call(i):
        barrier.wait()
        results[i] = run(*calls[i])
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        batcher.on_step = None
    assert all(torch.equal(got, want) for got, want in zip(results, alone, strict=True))
    assert max(widest) > 3  # rows of different calls ran in one step
    assert batcher.preemptions == 0 and batcher.allocator.num_free == batcher.allocator.num_blocks_total
    run(*calls[0])  # its first step drops the finished calls' samplers; only its own is left
    assert len(llama.runner.samplers.groups) == 1


def test_a_generate_cut_short_by_closing_the_batcher_raises(llama):
    """Closing the model's batcher (a server replacing it, or model.close) while a generate runs makes that
    generate raise instead of returning short rows; the next generate gets a new batcher."""
    errors, started = [], threading.Event()
    batcher = llama.batcher
    batcher.on_step = lambda kind, sequences: started.set()

    def long_generate():
        try:
            llama.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=200, do_sample=False, eos_token_id=None)
        except RuntimeError as e:
            errors.append(e)
    thread = threading.Thread(target=long_generate)
    thread.start()
    assert started.wait(30)
    batcher.close()
    thread.join(30)
    assert len(errors) == 1 and "before the requests finished" in str(errors[0])
    assert batcher.allocator.num_free == batcher.allocator.num_blocks_total
    assert llama.batcher is not batcher and _alone(llama, [5, 6, 7], 3) == _alone(llama, [5, 6, 7], 3)


class _Hooked:
    """The model's own runner, with a hook called before each step (the test's way into a step in flight)."""

    def __init__(self, runner, before_step):
        self.runner, self.before_step, self.plans = runner, before_step, []

    def ensure_cache(self, *args):
        self.runner.ensure_cache(*args)

    def step(self, batch, plan):
        self.plans.append(plan)
        self.before_step(len(self.plans))
        return self.runner.step(batch, plan)


def test_a_request_cancelled_while_its_step_runs_gets_no_token(llama):
    """A request cancelled while the step that samples for it runs hears of no token from that step (nor a
    logprob); the other request of the step gets its token."""
    def cancel_the_first(step: int) -> None:
        if step == 2:
            batcher.cancel(requests[0])

    batcher = ContinuousBatcher(_Hooked(llama.runner, cancel_the_first), 128, num_blocks=64, block_size=4,
                                background=False)
    requests = [batcher.submit([5, 6, 7], _params(4), logprobs=1) for _ in range(2)]
    batcher.step()  # the prompts: a token each
    batcher.step()  # the first is cancelled while this step runs
    assert requests[0].finish_reason == "cancelled" and len(requests[0].token_logprobs) == 1
    events = []
    while not requests[0].events.empty():
        events.append(requests[0].events.get()[1])
    assert events[:-1] == requests[0].tokens and len(requests[0].tokens) == 1  # then DONE
    assert len(requests[1].tokens) == 2
    batcher.close()


def test_groups_to_drop_are_sent_again_after_a_failed_step(llama):
    """The runner may not have applied a failed step's plan: the groups it dropped (and a new batcher's reset)
    go with the next plan, so the output rank forgets every finished group."""
    fail = {2}
    def before(n):
        if n in fail:
            raise RuntimeError("the engine failed")
    hooked = _Hooked(llama.runner, before)
    batcher = ContinuousBatcher(hooked, 128, num_blocks=64, block_size=4, background=False)
    first = batcher.submit_group([[5, 6, 7]], _params(1))
    batcher.wait(first)  # plan 1 (reset, the group is new); it finishes: its drop waits for the next plan
    with pytest.raises(RuntimeError, match="the engine failed"):
        batcher.wait(batcher.submit_group([[8, 9]], _params(1)))  # plan 2 carries the drop and fails
    batcher.wait(last := batcher.submit_group([[4, 5]], _params(1)))  # plan 3
    assert hooked.plans[0].reset and hooked.plans[1].dropped == [first[0].group]
    assert set(hooked.plans[2].dropped) == {first[0].group, hooked.plans[1].new[0].key}
    assert list(llama.runner.samplers.groups) == [last[0].group]
    batcher.close()


def test_a_group_whose_sampling_fails_ends_alone():
    """A step's batched draw fails on one group's row (NaN logits): the samplers draw group by group, that group
    gets the error and no token, the other the token its own seeded generator draws alone, with the logprobs
    it asked for; a group the plan drops is forgotten."""
    params = GenerationParams(max_new_tokens=4, eos_token_ids=[], do_sample=True, top_k=0)
    samplers = Samplers(torch.device("cpu"))
    new = [SamplerSpec(key, params, 128, torch.Generator().manual_seed(key)) for key in (1, 2)]
    logits = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    logits[1] = float("nan")
    alone = Sampler(params, 128, torch.device("cpu"), torch.Generator().manual_seed(1))
    expected = int(sample(logits[:1], [Draw(alone, 0, 0)])[0])
    got = samplers.sample(logits, SamplingPlan([SampleRow(1, 0, 0, logprobs=2), SampleRow(2, 0, 0)], new))
    assert got.tokens == [expected, None] and list(got.errors) == [2] and "nan" in str(got.errors[2])
    logp = torch.log_softmax(logits[0], dim=-1)
    assert got.logprobs[1] is None and got.logprobs[0].logprob == pytest.approx(float(logp[expected]))
    assert [token for token, _ in got.logprobs[0].top] == logp.topk(2).indices.tolist()
    samplers.sample(logits[:0], SamplingPlan([], dropped=[1, 2]))
    assert samplers.groups == {}
