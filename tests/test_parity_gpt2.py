"""GPT-2 against transformers on the same weights: forward on packed tokens, and KV-cache generate."""

import pytest
import torch
from helpers import ATOL, MIXED_LENGTHS, assert_forward_matches, assert_greedy_matches, max_diff_on_real, padded_batch

from energon_hf import EnergonModel

VOCAB = 128


@pytest.fixture(scope="module")
def lm(tiny):
    return EnergonModel.from_pretrained(tiny.make("GPT2LMHeadModel"), dtype="float32"), tiny.hf("GPT2LMHeadModel")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch,field", [("GPT2LMHeadModel", "logits"), ("GPT2Model", "last_hidden_state")])
def test_forward_matches_transformers(tiny, arch, field, side):
    ours = EnergonModel.from_pretrained(tiny.make(arch), dtype="float32")
    hf = tiny.hf(arch)
    ids, mask = padded_batch(MIXED_LENGTHS, VOCAB, side)
    got = assert_forward_matches(ours, hf, ids, mask, field)
    assert (getattr(got, field)[mask == 0] == 0).all()  # pads rebuilt as zeros


def test_untied_head_and_explicit_positions(tiny):
    path = tiny.make("GPT2LMHeadModel", tie_word_embeddings=False)
    ours, hf = EnergonModel.from_pretrained(path), tiny.hf("GPT2LMHeadModel", tie_word_embeddings=False)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    ids, mask = padded_batch(MIXED_LENGTHS, VOCAB, "left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF generate passes
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    got = ours(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert max_diff_on_real(got, expected, mask) <= ATOL


def test_return_dict_false_gives_tuple(lm):
    ours, _ = lm
    ids, mask = padded_batch([3, 5], VOCAB, "right")
    out = ours(input_ids=ids, attention_mask=mask, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (2, 5, VOCAB)


def test_greedy_generate_equals_transformers(lm):
    ours, hf = lm
    ids, mask = padded_batch(MIXED_LENGTHS, VOCAB, "left", seed=1)
    got = assert_greedy_matches(ours, hf, ids, mask)
    assert got.shape == (len(MIXED_LENGTHS), 64 + 32)


def test_right_padding_generates_the_same_new_tokens(lm):
    """Each sequence continues from its own last token whatever the padding side."""
    ours, _ = lm
    left_ids, left_mask = padded_batch(MIXED_LENGTHS, VOCAB, "left", seed=2)
    right_ids = torch.zeros_like(left_ids)
    right_mask = torch.zeros_like(left_mask)
    for row, n in enumerate(MIXED_LENGTHS):
        right_ids[row, :n] = left_ids[row, left_ids.shape[1] - n:]
        right_mask[row, :n] = 1
    kwargs = dict(max_new_tokens=8, eos_token_id=None)
    new_left = ours.generate(left_ids, attention_mask=left_mask, **kwargs)[:, -8:]
    new_right = ours.generate(right_ids, attention_mask=right_mask, **kwargs)[:, -8:]
    assert torch.equal(new_left, new_right)


def test_each_sequence_stops_on_its_own_eos(lm):
    ours, hf = lm
    ids, mask = padded_batch(MIXED_LENGTHS, VOCAB, "left", seed=1)
    free_run = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)[:, ids.shape[1]:]
    eos = [int(free_run[0, 3]), int(free_run[1, 5])]  # two ids that some sequences emit early
    got = assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=12, eos_token_id=eos)
    new = got[:, ids.shape[1]:]
    first_eos = [next(i for i, t in enumerate(row.tolist()) if t in eos) for row in new[:2]]
    assert (new[0, first_eos[0] + 1:] == 0).all() and first_eos[0] <= 3


def test_repetition_penalty_matches_transformers(lm):
    ours, hf = lm
    ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))  # no padding
    assert_greedy_matches(ours, hf, ids, torch.ones_like(ids), max_new_tokens=16, repetition_penalty=1.7)


def test_min_new_tokens_and_max_length(lm):
    ours, _ = lm
    ids, mask = padded_batch([4, 9], VOCAB, "left")
    first = ours.generate(ids, attention_mask=mask, max_new_tokens=1, eos_token_id=None)[:, -1]
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=4, eos_token_id=first.tolist())
    assert out.shape[1] >= ids.shape[1] + 4
    assert not torch.isin(out[:, ids.shape[1]: ids.shape[1] + 4], first).any()
    assert ours.generate(ids, attention_mask=mask, max_length=ids.shape[1] + 5, eos_token_id=None).shape[1] == 14


def test_sampling_is_seeded_and_follows_warpers(lm):
    ours, _ = lm
    ids, mask = padded_batch([6, 3, 9], VOCAB, "left")
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    top1 = ours.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=1, eos_token_id=None)
    assert torch.equal(greedy, top1)
    sample = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, eos_token_id=None)
    a = ours.generate(ids, attention_mask=mask, seed=7, **sample)
    b = ours.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(7), **sample)
    c = ours.generate(ids, attention_mask=mask, seed=8, **sample)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, greedy)


WARPERS = [dict(temperature=1.5, top_p=0.9), dict(top_k=20, temperature=0.7), dict(repetition_penalty=1.3, top_p=0.8)]


@pytest.mark.parametrize("warpers", WARPERS, ids=["temperature-top_p", "top_k", "penalty-top_p"])
def test_seeded_sampling_equals_transformers_manual_seed_then_generate(lm, warpers):
    """generate(do_sample=True, seed=s) draws what torch.manual_seed(s) + transformers' generate draws on the
    same (unpadded) batch: the same processed distributions and the same random stream."""
    ours, hf = lm
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=12, eos_token_id=None,
                  pad_token_id=0, **warpers)
    torch.manual_seed(11)
    with torch.no_grad():
        expected = hf.generate(ids, **kwargs)
    assert torch.equal(ours.generate(ids, seed=11, **kwargs), expected)


def test_seeded_sampling_of_a_batch_beyond_a_step_budget_equals_transformers(lm):
    """40 prompts of 110 tokens (4,400 tokens, more than a server step holds): generate admits and prefills a
    call's prompts together, so its rows draw together from the first token, as transformers' batch does."""
    ours, hf = lm
    ids = torch.randint(3, VOCAB, (40, 110), generator=torch.Generator().manual_seed(2))
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=8, eos_token_id=None,
                  pad_token_id=0, top_k=20)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = hf.generate(ids, **kwargs)
    assert torch.equal(ours.generate(ids, seed=5, **kwargs), expected)


def test_a_bad_row_fails_the_batched_draw_before_any_generator_moves():
    """One generator's rows with NaN logits fail the step's batched draw before any other generator has drawn
    (the batcher then retries group by group), so a seeded request's stream never depends on another's error."""
    from energon_hf.engine.sampler import Draw, Sampler, sample

    good, bad = (Sampler(_sampling_params({}), VOCAB, torch.device("cpu"), torch.Generator().manual_seed(s))
                 for s in (1, 2))
    logits = torch.randn(2, VOCAB)
    logits[1] = float("nan")
    state = good.generator.get_state()
    with pytest.raises(RuntimeError, match="nan"):
        sample(logits, [Draw(good, 0, 0), Draw(bad, 0, 0)])
    assert torch.equal(good.generator.get_state(), state)


def _hf_processors(params):
    """transformers' processors for our parameters, in generate's order."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.do_sample and params.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(params.temperature))
    if params.do_sample and params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.do_sample and params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    return processors


def _sampling_params(warpers: dict, do_sample: bool = True):
    from energon_hf.engine.params import GenerationParams

    return GenerationParams(max_new_tokens=4, do_sample=do_sample, top_k=warpers.get("top_k", 0),
                            **{k: v for k, v in warpers.items() if k != "top_k"})


@pytest.mark.parametrize("warpers", WARPERS, ids=["temperature-top_p", "top_k", "penalty-top_p"])
def test_processed_distributions_equal_transformers_processors_with_padded_prompts(warpers):
    """The scores a sampler draws from equal transformers' logits processors on the same logits, row by row,
    for prompts of several lengths (transformers sees each prompt unpadded: it would penalize pad ids)."""
    from energon_hf.engine.sampler import Sampler

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (2, 9, 5)]
    logits = torch.randn(3, VOCAB, generator=gen) * 3
    params = _sampling_params(warpers)
    sampler = Sampler(params, VOCAB, torch.device("cpu"))
    sampler.observe_prompts(prompts)
    got = sampler.process(logits, torch.arange(3), generated=0)
    for row, prompt in enumerate(prompts):
        expected = _hf_processors(params)(prompt[None], logits[row:row + 1].clone())
        assert torch.equal(torch.softmax(got[row], -1), torch.softmax(expected[0], -1))


def test_one_step_of_rows_with_different_parameters_equals_transformers_row_by_row():
    """A server step holds rows of many requests: processed in one batch, each row under its own parameters
    (every WARPERS setting, and greedy with a penalty) equals transformers' processors with those parameters;
    each generator's rows draw together, as transformers' batch would with that generator."""
    from energon_hf.engine.sampler import Draw, Sampler, process, sample

    gen = torch.Generator().manual_seed(5)
    settings = [(w, True) for w in WARPERS] + [(dict(repetition_penalty=1.5), False)]
    groups = []
    for seed, (warpers, do_sample) in enumerate(settings):
        prompts = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (3, 7)]
        sampler = Sampler(_sampling_params(warpers, do_sample), VOCAB, torch.device("cpu"),
                          torch.Generator().manual_seed(seed))
        sampler.observe_prompts(prompts)
        groups.append((sampler, prompts))
    draws = [Draw(sampler, row, 0) for row in (0, 1) for sampler, _ in groups]  # the groups' rows interleaved
    logits = torch.randn(len(draws), VOCAB, generator=gen) * 3
    got = process(logits, draws)
    for i, draw in enumerate(draws):
        prompt = dict(groups)[draw.sampler][draw.row]
        expected = _hf_processors(draw.params)(prompt[None], logits[i:i + 1].clone())[0]
        assert torch.equal(torch.softmax(got[i], -1), torch.softmax(expected, -1))

    tokens = sample(logits, draws)
    for seed, (sampler, prompts) in enumerate(groups):
        rows = [i for i, d in enumerate(draws) if d.sampler is sampler]
        scores = torch.cat([_hf_processors(sampler.params)(prompts[draws[i].row][None], logits[i:i + 1].clone())
                            for i in rows])
        if sampler.params.do_sample:
            expected = torch.multinomial(torch.softmax(scores, -1), 1,
                                         generator=torch.Generator().manual_seed(seed)).squeeze(1)
        else:
            expected = scores.argmax(-1)
        assert torch.equal(tokens[rows], expected)
        assert all(sampler.seen[draws[i].row, tokens[i]] for i in rows if sampler.seen is not None)


def test_greedy_rows_hold_back_eos_as_transformers():
    """Greedy rows before min_new_tokens (the fast path: argmax, masked only where it picks EOS): equal to
    transformers' MinNewTokensLengthLogitsProcessor then argmax, for rows whose maximum is an EOS token, rows
    whose maximum is not, ties with EOS first, and rows past min_new_tokens."""
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    from energon_hf.engine.params import GenerationParams
    from energon_hf.engine.sampler import Draw, Sampler, sample

    eos = [3, 7]
    sampler = Sampler(GenerationParams(max_new_tokens=8, min_new_tokens=2, eos_token_ids=eos), VOCAB,
                      torch.device("cpu"))
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(2))
    logits[0, 7] = logits[1, 3] = logits[4, 3] = 50.0  # EOS on top
    logits[2, 3] = logits[2, 11] = 60.0  # a tie, EOS first
    generated = [0, 1, 1, 0, 2]  # row 4 is past min_new_tokens: its EOS stands
    tokens = sample(logits, [Draw(sampler, row, n) for row, n in enumerate(generated)])
    for row, n in enumerate(generated):
        processor = MinNewTokensLengthLogitsProcessor(5, 2, eos)  # prompt of 5: `n` new tokens so far
        expected = processor(torch.zeros(1, 5 + n, dtype=torch.long), logits[row:row + 1].clone()).argmax(-1)
        assert int(tokens[row]) == int(expected)
    assert int(tokens[4]) == 3 and int(tokens[2]) == 11


def test_unseeded_cheap_draws_follow_the_processed_distribution():
    """A server request without a seed draws by inverse CDF (hf_draws=False): over 20,000 draws the token
    frequencies match the processed probabilities (transformers' top-k and temperature), and a token top-k
    removed is never drawn."""
    from energon_hf.engine.sampler import Draw, Sampler, process, sample

    sampler = Sampler(_sampling_params(dict(top_k=3, temperature=0.8)), 8, torch.device("cpu"), hf_draws=False)
    logits = torch.tensor([[1.0, 2.5, 0.2, 2.0, -1.0, 2.2, 0.0, 1.9]]).expand(20_000, 8)
    draws = [Draw(sampler, 0, 0)] * logits.shape[0]
    probs = torch.softmax(process(logits[:1], draws[:1])[0], -1)
    torch.manual_seed(0)
    counts = torch.bincount(sample(logits, draws), minlength=8) / logits.shape[0]
    assert set(counts.nonzero().flatten().tolist()) == {1, 3, 5}  # the top 3
    assert (counts - probs).abs().max() < 0.015


def test_top_p_among_candidates_keeps_the_tokens_transformers_keeps():
    """Unseeded server rows find the nucleus among their 256 most likely tokens when those hold top_p of the
    mass, and sort the vocabulary when they do not (a flat row): both keep transformers' tokens."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from energon_hf.engine import sampler as sampling

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 2000, generator=gen)
    logits[:3, torch.randint(0, 2000, (40,), generator=gen)] += 6  # a peaked row's nucleus: among 40 tokens
    cheap = sampling.Sampler(_sampling_params(dict(top_p=0.85)), 2000, torch.device("cpu"), hf_draws=False)
    draws = [sampling.Draw(cheap, 0, 0)] * 4
    covered = sampling._top_p_among_candidates(logits.clone(), list(range(4)), [0.85] * 4)
    assert covered == [0, 1, 2]  # the flat row needs the sort
    got = sampling.process(logits, draws)
    expected = TopPLogitsWarper(0.85)(None, logits.clone())
    assert torch.equal(got.isfinite(), expected.isfinite())
    assert torch.equal(torch.softmax(got, -1), torch.softmax(expected, -1))


def test_pytorch_bin_checkpoint_and_unprefixed_names(tiny, tmp_path):
    """pytorch_model.bin read with weights_only, keys without the `transformer.` prefix (original GPT-2)."""
    hf = tiny.hf("GPT2LMHeadModel")
    hf.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = EnergonModel.from_pretrained(tmp_path)
    ids, mask = padded_batch(MIXED_LENGTHS, VOCAB, "right")
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
    assert max_diff_on_real(ours(input_ids=ids, attention_mask=mask).logits, expected, mask) <= ATOL
