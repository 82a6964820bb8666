"""Every model on real worker processes (gloo) at tp=2, pp=2 and tp=2 x pp=2 against transformers on the same
weights: the parity of tp=pp=1 (fp32 max abs diff <= 1e-4 on real tokens, equal greedy tokens), with padded
vocabularies, uneven stages, micro-batches, tied heads on the last stage and each stage's KV cache."""

import threading

import pytest
import torch
import transformers
from helpers import MIXED_LENGTHS, assert_forward_matches, assert_greedy_matches, padded_batch
from test_parity_llama import LLAMA_TINY
from test_parity_llama_family import FAMILY, save_tiny
from test_parity_opt import OPT_TINY
from test_parity_vit import VIT_TINY

from energon_hf import EnergonModel
from energon_hf.batch import AttentionMetadata, PackedBatch
from energon_hf.engine.pipeline import split_batch
from energon_hf.parallel import stage_layers

LENGTHS = MIXED_LENGTHS[:5]
GRID = [(2, 1), (1, 2), (2, 2)]  # (tp, pp)


def _engine(path, tp, pp):
    return EnergonModel.from_pretrained(path, tp=tp, pp=pp, threads_per_rank=1)


def _saved(tmp_path_factory, model_cls, config):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(model_cls.__name__)
    model_cls(config).save_pretrained(path)
    return path, model_cls.from_pretrained(path).eval()


def _pixels():
    return torch.randn(3, 3, VIT_TINY["image_size"], VIT_TINY["image_size"], generator=torch.Generator().manual_seed(0))


def test_stage_layers_are_contiguous_and_cover_every_layer():
    assert [stage_layers(7, 3, r) for r in range(3)] == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(ValueError, match="pp=4 needs at least 4 layers"):
        stage_layers(3, 4, 0)


def test_split_batch_keeps_every_sequence_once():
    lengths = torch.tensor([5, 1, 9, 3, 2])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    total = int(cu[-1])
    batch = PackedBatch(torch.arange(total), torch.arange(total), AttentionMetadata(cu, 9),
                        logits_indices=cu[1:].long() - 1)
    parts = split_batch(batch, 2)
    assert len(parts) == 2
    assert torch.equal(torch.cat([p.input_ids for p in parts]), batch.input_ids)
    assert torch.equal(torch.cat([p.logits_indices + int(p.input_ids[0]) for p in parts]), batch.logits_indices)
    assert sum(p.attn.num_seqs for p in parts) == 5
    assert len(split_batch(batch, 8)) <= 5


def test_gpt2_padded_vocabulary_concurrency_and_bad_input(tiny):
    """tp=2: vocab 127 is padded to 128 rows, 64 per rank, untied head (vocabulary-parallel)."""
    config = dict(vocab_size=127, tie_word_embeddings=False)
    path, hf = tiny.make("GPT2LMHeadModel", **config), tiny.hf("GPT2LMHeadModel", **config)
    with _engine(path, 2, 1) as ours:
        ids, mask = padded_batch(LENGTHS, 127, "left")
        assert_forward_matches(ours, hf, ids, mask)
        expected = assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=12)
        with pytest.raises(ValueError, match="outside"):  # checked in the driver: the workers never see it
            ours(input_ids=[[5, 127]])
        # Callers on several threads share the engine safely (their generate calls batch together).
        results = [None] * 3
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ours.generate(
            ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)))
            for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(r is not None and torch.equal(r, expected) for r in results)


@pytest.mark.parametrize("tp,pp", GRID[1:])
def test_gpt2_uneven_stages_and_tied_head(tiny, tp, pp):
    """3 layers over 2 stages (2 + 1); the tied head on the last stage reads its own copy of wte."""
    path, hf = tiny.make("GPT2LMHeadModel", n_layer=3), tiny.hf("GPT2LMHeadModel", n_layer=3)
    with _engine(path, tp, pp) as ours:
        stats = ours.runner.rank_stats()
        assert [s["layers"] for s in stats] == [[0, 2]] * tp + [[2, 3]] * tp
        ids, mask = padded_batch(LENGTHS, 128, "left")
        assert_forward_matches(ours, hf, ids, mask)
        assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=12)
    full = sum(p.numel() * 4 for p in hf.parameters())
    assert max(s["param_bytes"] for s in stats) < full / tp  # no rank holds the whole model


@pytest.mark.parametrize("tp,pp", GRID)
def test_llama_gqa(tmp_path_factory, tp, pp):
    path, hf = _saved(tmp_path_factory, transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA_TINY))
    with _engine(path, tp, pp) as ours:
        ids, mask = padded_batch(LENGTHS, 128, "left")
        assert_forward_matches(ours, hf, ids, mask)
        assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=12)


@pytest.mark.parametrize("arch", list(FAMILY))
@pytest.mark.parametrize("tp,pp", GRID[:2])
def test_llama_family(tmp_path_factory, arch, tp, pp):
    """Every Llama-like architecture (test_parity_llama_family.FAMILY: q/k/v biases and q/k norms split by head,
    sliding and capped attention, Phi-3's fused checkpoint projections split per rank): tp=2 and pp=2."""
    path = tmp_path_factory.mktemp(arch)
    hf = save_tiny(path, arch)
    with _engine(path, tp, pp) as ours:
        ids, mask = padded_batch(LENGTHS, 128, "left")
        assert_forward_matches(ours, hf, ids, mask)
        assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=12)


def test_beam_search_on_the_engine(tmp_path_factory):
    """tp=2 x pp=2: the output rank sends each beam's best tokens back; the beams' shared cache blocks are copied
    on every rank (the first micro-batch carries the copies); the prompts cross a cache block."""
    path, hf = _saved(tmp_path_factory, transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA_TINY))
    ids, mask = padded_batch([14, 5, 9], 128, "left", seed=7)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None, num_beams=3,
                  num_return_sequences=2, length_penalty=0.7)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
    with _engine(path, 2, 2) as ours:
        assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), expected)


@pytest.mark.parametrize("tp,pp", GRID)
def test_bert_masked_lm(tiny, tp, pp):
    with _engine(tiny.make("BertForMaskedLM"), tp, pp) as ours:
        ids, mask = padded_batch(LENGTHS, 100, "right")
        assert_forward_matches(ours, tiny.hf("BertForMaskedLM"), ids, mask)


def test_bert_sequence_classification(tiny):
    ids, mask = padded_batch(LENGTHS, 100, "right")
    with _engine(tiny.make("BertForSequenceClassification"), 2, 1) as ours:
        got = ours(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        expected = tiny.hf("BertForSequenceClassification")(input_ids=ids, attention_mask=mask).logits
    assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("tp,pp", GRID[:2])
def test_opt(tmp_path_factory, tp, pp):
    path, hf = _saved(tmp_path_factory, transformers.OPTForCausalLM, transformers.OPTConfig(**OPT_TINY))
    with _engine(path, tp, pp) as ours:
        ids, mask = padded_batch(LENGTHS, OPT_TINY["vocab_size"], "left")
        assert_forward_matches(ours, hf, ids, mask)
        assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=12)


def test_vit_classification_tp(tmp_path_factory):
    path, hf = _saved(tmp_path_factory, transformers.ViTForImageClassification, transformers.ViTConfig(**VIT_TINY))
    with _engine(path, 2, 1) as ours:
        got = ours(pixel_values=_pixels()).logits
    with torch.no_grad():
        expected = hf(pixel_values=_pixels()).logits
    assert (got - expected).abs().max() <= 1e-4


def test_vit_model_pp(tmp_path_factory):
    path, hf = _saved(tmp_path_factory, transformers.ViTModel, transformers.ViTConfig(**VIT_TINY))
    with _engine(path, 1, 2) as ours:
        got = ours(pixel_values=_pixels())
    with torch.no_grad():
        expected = hf(pixel_values=_pixels())
    assert (got.last_hidden_state - expected.last_hidden_state).abs().max() <= 1e-4
    assert (got.pooler_output - expected.pooler_output).abs().max() <= 1e-4


def test_heads_not_divisible_by_tp_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"attention heads \(3\) is not divisible by tp=2"):
        _engine(tiny.make("GPT2Model", n_head=3, n_embd=48), 2, 1)
