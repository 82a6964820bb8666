"""OPT against transformers on the same weights: positions offset by 2 and counted over real tokens,
pre- and post-LayerNorm variants with embedding projections, and greedy generate."""

import pytest
import torch
import transformers
from helpers import MIXED_LENGTHS, assert_forward_matches, assert_greedy_matches, padded_batch

from energon_hf import EnergonModel

VOCAB = 128
OPT_TINY = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=64, init_std=0.2, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
VARIANTS = {
    "pre-ln (125m style)": {},
    "post-ln with projections (350m style)": dict(do_layer_norm_before=False, word_embed_proj_dim=32),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def opt(request, tmp_path_factory):
    config = transformers.OPTConfig(**{**OPT_TINY, **VARIANTS[request.param]})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("opt")
    transformers.OPTForCausalLM(config).eval().save_pretrained(path)
    return EnergonModel.from_pretrained(path), transformers.OPTForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_matches_transformers(opt, side):
    ours, hf = opt
    ids, mask = padded_batch(MIXED_LENGTHS, VOCAB, side)
    assert_forward_matches(ours, hf, ids, mask)


def test_greedy_generate_equals_transformers(opt):
    ours, hf = opt
    ids, mask = padded_batch(MIXED_LENGTHS, VOCAB, "left", seed=3)
    assert_greedy_matches(ours, hf, ids, mask)
