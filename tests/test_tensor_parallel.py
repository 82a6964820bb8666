"""Every model at tp=2 on real worker processes (gloo) against transformers on the same weights: the
parity of tp=1 (fp32 max abs diff <= 1e-4 on real tokens, equal greedy tokens)."""

import threading

import pytest
import torch
import transformers
from helpers import MIXED_LENGTHS, assert_forward_matches, assert_greedy_matches, padded_batch
from test_parity_llama import LLAMA_TINY
from test_parity_opt import OPT_TINY
from test_parity_vit import VIT_TINY

from energon_hf import EnergonModel

LENGTHS = MIXED_LENGTHS[:5]


def _engine(path):
    return EnergonModel.from_pretrained(path, tp=2, threads_per_rank=1)


def _saved(tmp_path_factory, model_cls, config):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(model_cls.__name__)
    model_cls(config).save_pretrained(path)
    return path, model_cls.from_pretrained(path).eval()


def test_gpt2_padded_vocabulary(tiny):
    """vocab 127 is padded to 128 rows, 64 per rank; untied head (vocabulary-parallel)."""
    path = tiny.make("GPT2LMHeadModel", vocab_size=127, tie_word_embeddings=False)
    hf = tiny.hf("GPT2LMHeadModel", vocab_size=127, tie_word_embeddings=False)
    with _engine(path) as ours:
        ids, mask = padded_batch(LENGTHS, 127, "left")
        assert_forward_matches(ours, hf, ids, mask)
        expected = assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=12)
        with pytest.raises(ValueError, match="outside"):  # checked in the driver: the workers never see it
            ours(input_ids=[[5, 127]])
        # Callers on several threads share the engine safely (generate owns the KV cache until it returns).
        results = [None] * 3
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ours.generate(
            ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)))
            for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(r is not None and torch.equal(r, expected) for r in results)


def test_bert_masked_lm_and_classification(tiny):
    ids, mask = padded_batch(LENGTHS, 100, "right")
    with _engine(tiny.make("BertForMaskedLM")) as ours:
        assert_forward_matches(ours, tiny.hf("BertForMaskedLM"), ids, mask)
    with _engine(tiny.make("BertForSequenceClassification")) as ours:
        got = ours(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        expected = tiny.hf("BertForSequenceClassification")(input_ids=ids, attention_mask=mask).logits
    assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-4


def test_llama_gqa(tmp_path_factory):
    path, hf = _saved(tmp_path_factory, transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA_TINY))
    with _engine(path) as ours:
        ids, mask = padded_batch(LENGTHS, 128, "left")
        assert_forward_matches(ours, hf, ids, mask)
        assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=12)


def test_opt(tmp_path_factory):
    path, hf = _saved(tmp_path_factory, transformers.OPTForCausalLM, transformers.OPTConfig(**OPT_TINY))
    with _engine(path) as ours:
        ids, mask = padded_batch(LENGTHS, OPT_TINY["vocab_size"], "left")
        assert_forward_matches(ours, hf, ids, mask)
        assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=12)


def test_vit(tmp_path_factory):
    path, hf = _saved(tmp_path_factory, transformers.ViTForImageClassification, transformers.ViTConfig(**VIT_TINY))
    pixels = torch.randn(3, 3, VIT_TINY["image_size"], VIT_TINY["image_size"])
    with _engine(path) as ours:
        got = ours(pixel_values=pixels).logits
    with torch.no_grad():
        expected = hf(pixel_values=pixels).logits
    assert (got - expected).abs().max() <= 1e-4


def test_heads_not_divisible_by_tp_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"attention heads \(3\) is not divisible by tp=2"):
        _engine(tiny.make("GPT2Model", n_head=3, n_embd=48))
