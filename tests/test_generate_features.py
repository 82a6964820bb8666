"""HF generate's options beyond sampling parameters, each against transformers on the same weights: n-gram and
bad-word bans, num_return_sequences, stop strings (with the tokenizer), streamers and beam search, through generate
and the text-generation pipeline."""

import pytest
import torch
import transformers
from helpers import assert_greedy_matches, padded_batch

from energon_hf import EnergonModel, pipeline

LENGTHS = [3, 9, 5]


@pytest.fixture(scope="module")
def gpt2(tiny):
    return EnergonModel.from_pretrained(tiny.make("GPT2LMHeadModel")), tiny.hf("GPT2LMHeadModel")


@pytest.fixture(scope="module")
def chat(chat_llama):
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
    hf = transformers.LlamaForCausalLM.from_pretrained(chat_llama).eval()
    return EnergonModel.from_pretrained(chat_llama), hf, tokenizer


def test_no_repeat_ngram_size_equals_transformers(gpt2):
    """Greedy decoding of the tiny model repeats itself: the bans bind. Prompts without padding: transformers' n-grams
    also cover a padded prompt's pad tokens (as its repetition penalty does; ours count real tokens only)."""
    ours, hf = gpt2
    ids, mask = padded_batch([7, 7, 7], 128, "left", seed=4)
    free = assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=24)
    for n in (2, 3):
        banned = assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=24, no_repeat_ngram_size=n)
        assert not torch.equal(banned, free)


def test_bad_words_ids_equal_transformers(gpt2):
    """Banned: a token greedy decoding picks, and a two-token sequence it produces (its second token only
    after its first); the EOS token as a bad word is ignored, as transformers ignores it."""
    ours, hf = gpt2
    ids, mask = padded_batch(LENGTHS, 128, "left", seed=5)
    free = assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=16)
    new = free[0, ids.shape[1]:].tolist()
    bad = [[new[3]], new[6:8], [2]]
    banned = assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=16, bad_words_ids=bad, eos_token_id=2)
    assert not torch.equal(banned, free)
    with pytest.raises(ValueError, match="bad_words_ids"):
        ours.generate(ids, attention_mask=mask, bad_words_ids=[[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="bad_words_ids contain token id 128"):
        ours.generate(ids, attention_mask=mask, bad_words_ids=[[128]], max_new_tokens=2)


def test_num_return_sequences_samples_as_transformers(gpt2):
    """Each prompt's copies sample side by side: seeded, the tokens of transformers' manual_seed + generate."""
    ours, hf = gpt2
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(6))
    kwargs = dict(do_sample=True, num_return_sequences=3, max_new_tokens=10, top_k=0, pad_token_id=0,
                  eos_token_id=None)
    torch.manual_seed(11)
    with torch.no_grad():
        expected = hf.generate(ids, **kwargs)
    torch.manual_seed(11)
    got = ours.generate(ids, **kwargs)
    assert got.shape == (6, 16) and torch.equal(got, expected)
    with pytest.raises(ValueError, match="Greedy methods without beam search do not support `num_return_sequences`"):
        ours.generate(ids, num_return_sequences=2, max_new_tokens=2)


def test_stop_strings_stop_where_transformers_stops(chat):
    """A stop string cut from the middle of the greedy answer (spanning tokens) ends generation at the same token
    as transformers' StopStringCriteria; without the tokenizer it is transformers' error."""
    ours, hf, tokenizer = chat
    ids = tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=2, eos_token_id=None)
    free = ours.generate(ids, **kwargs)
    text = tokenizer.decode(free[0, ids.shape[1]:])
    stop = text[len(text) // 2: len(text) // 2 + 3]
    with torch.no_grad():
        expected = hf.generate(ids, stop_strings=[stop], tokenizer=tokenizer, **kwargs)
    got = ours.generate(ids, stop_strings=[stop], tokenizer=tokenizer, **kwargs)
    assert torch.equal(got, expected) and got.shape[1] < free.shape[1]
    with pytest.raises(ValueError, match="you must pass the model's tokenizer"):
        ours.generate(ids, stop_strings=[stop], **kwargs)


class Recorder:
    """A streamer that keeps what generate hands it."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def test_streamers_get_what_transformers_hands_them(chat):
    ours, hf, tokenizer = chat
    ids = tokenizer(["Once upon a time"], return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=2, eos_token_id=None)
    theirs, mine = Recorder(), Recorder()
    with torch.no_grad():
        hf.generate(ids, streamer=theirs, **kwargs)
    ours.generate(ids, streamer=mine, **kwargs)
    assert mine.puts == theirs.puts and mine.ended and len(mine.puts) == 9
    text = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True)
    out = ours.generate(ids, streamer=text, **kwargs)
    assert "".join(text) == tokenizer.decode(out[0, ids.shape[1]:])
    with pytest.raises(ValueError, match="a streamer takes a batch of one"):
        ours.generate(torch.cat([ids, ids]), streamer=Recorder(), **kwargs)


def test_text_generation_pipeline_takes_the_options(chat):
    ours, hf, tokenizer = chat
    pipe = pipeline("text-generation", model=ours, tokenizer=tokenizer)
    theirs = transformers.pipeline("text-generation", model=hf, tokenizer=tokenizer)
    kwargs = dict(max_new_tokens=12, do_sample=False, no_repeat_ngram_size=2)
    assert pipe("Once upon a time", **kwargs) == theirs("Once upon a time", **kwargs)
    free = pipe("Once upon a time", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    stop = free[len("Once upon a time") + 4:][:3]
    kwargs = dict(max_new_tokens=12, do_sample=False, stop_sequence=stop)
    assert pipe("Once upon a time", **kwargs) == theirs("Once upon a time", **kwargs)
    sampled = pipe(["Hello", "Goodbye"], do_sample=True, num_return_sequences=2, max_new_tokens=4)
    assert [len(answers) for answers in sampled] == [2, 2]
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    assert pipe("Once upon a time", **kwargs) == theirs("Once upon a time", **kwargs)


BEAMS = {
    "two": dict(num_beams=2),
    "return-two-of-three": dict(num_beams=3, num_return_sequences=2),
    "eos-short-penalty": dict(num_beams=3, eos_token_id=6, length_penalty=0.5),
    "two-eos-early": dict(num_beams=4, eos_token_id=[6, 61], early_stopping=True),
    "never-long-penalty": dict(num_beams=2, eos_token_id=6, early_stopping="never", length_penalty=2.0),
    "ngram-bans": dict(num_beams=3, eos_token_id=6, no_repeat_ngram_size=2, repetition_penalty=1.3),
}


@pytest.mark.parametrize("options", list(BEAMS))
def test_beam_search_equals_transformers(gpt2, options):
    """Left-padded prompts, beams finishing early on EOS (token 6 is frequent here), length penalties, early
    stopping modes, returned hypotheses, processors reading each beam's own tokens (on prompts without padding:
    transformers' n-grams cover pad tokens)."""
    ours, hf = gpt2
    ids, mask = padded_batch([7, 7, 7] if "no_repeat_ngram_size" in BEAMS[options] else LENGTHS, 128, "left", seed=4)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, "eos_token_id": None, **BEAMS[options]}
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), expected)


def test_beams_share_the_prompt_and_copy_blocks_on_write(tmp_path, monkeypatch):
    """A Llama (its decode loop) with beams past a cache block: each prompt is computed once (the first step runs
    exactly the prompts' tokens), and the beams' shared blocks are copied before one writes into them."""
    from test_parity_llama import LLAMA_TINY

    from energon_hf.engine.runner import LocalRunner
    from energon_hf.kv_cache import KVCache

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_TINY)).save_pretrained(tmp_path)
    ours, hf = EnergonModel.from_pretrained(tmp_path), transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    steps, copies = [], []
    run, copy = LocalRunner.run, KVCache.copy_blocks
    monkeypatch.setattr(LocalRunner, "run", lambda self, batch, *a, **k: steps.append(batch.input_ids.numel())
                        or run(self, batch, *a, **k))
    monkeypatch.setattr(KVCache, "copy_blocks", lambda self, pairs: copies.extend(pairs) or copy(self, pairs))
    ids, mask = padded_batch([14, 5], 128, "left", seed=7)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None, num_beams=3)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), expected)
    assert steps[0] == 14 + 5 and set(steps[1:]) == {6}  # the prompts once, then 2 x 3 beams a step
    assert copies  # the 14-token prompt's beams write past position 16 in a block they shared


def test_beam_search_refusals(gpt2):
    ours, _ = gpt2
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="beam sampling"):
        ours.generate(ids, num_beams=2, do_sample=True, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"`num_return_sequences` \(3\) has to be smaller or equal to `num_beams`"):
        ours.generate(ids, num_beams=2, num_return_sequences=3, max_new_tokens=2)
    with pytest.raises(ValueError, match="`streamer` cannot be used with beam search"):
        ours.generate(ids, num_beams=2, streamer=Recorder(), max_new_tokens=2)


def test_block_allocator_shares_and_copies_on_write():
    """Blocks shared by beams stay held until their last holder lets go; a copy is made only for a shared block."""
    from energon_hf.kv_cache import BlockAllocator

    allocator = BlockAllocator(8, 4)
    parent = list(allocator.reserve(0, 6))  # blocks 0, 1: the second holds positions 4, 5
    allocator.share({1: parent, 2: parent})  # two beams continue it
    assert allocator.num_free == 6 and allocator.writable(0, 5) is not None  # the parent's own copy of block 1
    src, dst = allocator.writable(1, 6)  # position 6 is in block 1, still shared by beams 1 and 2
    assert src == parent[1] and dst not in parent and allocator.writable(2, 6) is None  # beam 2 holds it alone now
    assert allocator.writable(1, 2) is not None  # block 0 is shared by all three
    allocator.release(2)  # its block 1 goes; block 0 is still the parent's
    assert parent[1] in allocator._free and parent[0] not in allocator._free
    assert len(set(allocator._free)) == len(allocator._free) == 8 - 4  # parent: 2 blocks, beam 1: 2 (no duplicates)
    allocator.share({1: allocator.tables[0]})  # beam 1 takes the parent's blocks: its own two are free again
    assert len(set(allocator._free)) == len(allocator._free) == 6 and allocator.sharing
    allocator.release(0)  # beam 1 holds the blocks alone: nothing to copy, nothing freed
    assert not allocator.sharing and allocator.writable(1, 6) is None and allocator.num_free == 6
    allocator.release(1)
    assert allocator.num_free == 8


def test_an_abandoned_beam_search_leaves_nothing_behind(gpt2):
    """Cancelled before a step (beams not running yet) and after one (beams running): every request finishes, the
    batcher forgets the search, and the next generate is transformers' again."""
    from energon_hf.engine.beam_search import BeamSettings
    from energon_hf.engine.params import GenerationParams

    ours, hf = gpt2
    batcher = ours.batcher
    params = GenerationParams(max_new_tokens=8, num_beams=3)
    for steps in (0, 2):
        requests = batcher.submit_group([[5, 6, 7], [9, 10]], params, beams=BeamSettings(3, 8))
        for _ in range(steps):
            batcher.step()
        for request in requests:
            batcher.cancel(request)
        while batcher.step():
            pass
        assert all(r.done for r in requests) and not batcher._beams and not batcher._reorders
        assert not batcher.running and not batcher.waiting and not batcher.allocator.tables
    ids, mask = padded_batch(LENGTHS, 128, "left", seed=4)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, num_beams=3)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), expected)
