"""Llama against transformers on the same weights: GQA, rope scalings, tied/untied heads, generate."""

import json

import pytest
import torch
import transformers
from helpers import ATOL, MIXED_LENGTHS, assert_forward_matches, assert_greedy_matches, max_diff_on_real, padded_batch

from energon_hf import EnergonModel, UnsupportedModelError

VOCAB = 128
LLAMA_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def make(tmp_path_factory, **overrides):
    config = transformers.LlamaConfig(**{**LLAMA_TINY, **overrides})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path, transformers.LlamaForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path, hf = make(tmp_path_factory)
    return EnergonModel.from_pretrained(path), hf


VARIANTS = {
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-kv1-bias": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    "head-dim": dict(head_dim=32),
    "linear-theta": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                    "rope_theta": 500000.0}),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                  "original_max_position_embeddings": 64}),
    "longrope": dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [2.0] * 8,
                                      "short_factor": [1.5] * 8, "original_max_position_embeddings": 32}),
    "stray-sliding-window": dict(sliding_window=4),  # transformers' Llama has no window: neither do we
}


@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_matches_transformers(llama, side):
    ours, hf = llama
    ids, mask = padded_batch(MIXED_LENGTHS, VOCAB, side)
    assert_forward_matches(ours, hf, ids, mask)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_match_transformers(tmp_path_factory, variant):
    path, hf = make(tmp_path_factory, **VARIANTS[variant])
    ours = EnergonModel.from_pretrained(path)
    # longrope: left padding runs every row to the last column (past 32), where transformers' choice for the batch
    # and ours per sequence agree
    ids, mask = padded_batch(MIXED_LENGTHS, VOCAB, "left" if variant == "longrope" else "right", seed=1)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
    assert max_diff_on_real(ours(input_ids=ids, attention_mask=mask).logits, expected, mask) <= ATOL


def test_greedy_generate_equals_transformers(llama):
    ours, hf = llama
    ids, mask = padded_batch(MIXED_LENGTHS, VOCAB, "left", seed=2)
    assert_greedy_matches(ours, hf, ids, mask)


def test_rotary_positions_may_exceed_max_position_embeddings(llama):
    ours, _ = llama
    out = ours.generate(torch.ones(1, 250, dtype=torch.long), max_new_tokens=10, eos_token_id=None)
    assert out.shape == (1, 260)


def test_unsupported_rope_scaling_is_named(llama, tmp_path):
    _, hf = llama
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="rope_scaling type 'dynamic'"):
        EnergonModel.from_pretrained(tmp_path)
