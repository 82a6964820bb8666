"""Continuous batching on a real model: requests of mixed lengths arriving together give the tokens each
would get alone; a full cache preempts and recomputes without changing results; a cancelled request
leaves the batch and frees its blocks."""

import threading

import pytest
import torch
import transformers
from test_parity_llama import LLAMA_TINY

from energon_hf import EnergonModel
from energon_hf.engine.batcher import ContinuousBatcher
from energon_hf.engine.params import GenerationParams


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


@pytest.mark.parametrize("num_blocks", [256, 16], ids=["roomy", "preempting"])
def test_concurrent_requests_match_their_solo_results(llama, num_blocks):
    prompts = _prompts(12)
    new_tokens = [4 + (i * 7) % 20 for i in range(12)]
    expected = [_alone(llama, p, n) for p, n in zip(prompts, new_tokens, strict=True)]
    batcher = ContinuousBatcher(llama.runner, 128, num_blocks=num_blocks, block_size=4, max_batch_tokens=64)
    try:
        requests = [None] * 12
        def submit(i):  # from several threads at once, like server handlers
            requests[i] = batcher.submit(prompts[i], _params(new_tokens[i]))
        threads = [threading.Thread(target=submit, args=(i,)) for i in range(12)]
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
    finally:
        batcher.close()


def test_cancel_frees_the_request(llama):
    batcher = ContinuousBatcher(llama.runner, 128, num_blocks=128, block_size=4)
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
    batcher = ContinuousBatcher(llama.runner, 128, num_blocks=4, block_size=4)
    try:
        with pytest.raises(ValueError, match="KV cache blocks"):
            batcher.submit(list(range(3, 20)), _params(8))
        with pytest.raises(ValueError, match="empty"):
            batcher.submit([], _params(8))
    finally:
        batcher.close()


def test_on_a_tensor_parallel_engine(llama):
    prompts = _prompts(5, seed=1)
    expected = [_alone(llama, p, 6) for p in prompts]
    with EnergonModel.from_pretrained(llama.folder, tp=2, threads_per_rank=1) as engine:
        batcher = ContinuousBatcher(engine.runner, 128, num_blocks=64, block_size=4)
        try:
            requests = [batcher.submit(p, _params(6)) for p in prompts]
            assert [r.result(timeout=120) for r in requests] == expected
        finally:
            batcher.close()
