"""The models through the Triton kernels (the CUDA path), run by Triton's interpreter on CPU: the same parity
with transformers as the torch path, for an encoder (exact GELU, bidirectional), GPT-2 (tanh GELU, learned
positions, paged decode), Llama (GQA, RMSNorm, SiLU-and-multiply, rotary), Mistral (sliding windows) and Gemma 2
(capped scores), and Llama with int4 / int8 weights."""

import os

import pytest
import torch
import transformers
from helpers import assert_forward_matches, assert_greedy_matches, max_diff_on_real, padded_batch
from test_parity_llama import LLAMA_TINY
from test_parity_llama_family import save_tiny

from energon_hf import EnergonModel

pytest.importorskip("triton")
LENGTHS = [3, 17, 1, 9]
# On a GPU (bench/gpu_kernels.py runs this file with TRITON_INTERPRET=0) the models, transformers' and ours, and
# their inputs live on it; under the interpreter, on CPU.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def load(path, **kwargs) -> EnergonModel:
    return EnergonModel.from_pretrained(path, device=DEVICE, **kwargs)


def batch(vocab: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.to(DEVICE) for t in padded_batch(LENGTHS, vocab, side))


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("ENERGON_HF_KERNELS", "triton")


def test_bert_forward(tiny):
    path = tiny.make("BertModel")
    ids, mask = batch(100, "right")
    assert_forward_matches(load(path), tiny.hf("BertModel").to(DEVICE), ids, mask, "last_hidden_state")


def test_gpt2_forward_and_greedy(tiny):
    path = tiny.make("GPT2LMHeadModel")
    ours, hf = load(path), tiny.hf("GPT2LMHeadModel").to(DEVICE)
    ids, mask = batch(128, "left")
    assert_forward_matches(ours, hf, ids, mask)
    assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=6)


def test_llama_gqa_forward_and_greedy(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_TINY)).save_pretrained(tmp_path)
    ours = load(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval().to(DEVICE)
    ids, mask = batch(128, "left")
    assert_forward_matches(ours, hf, ids, mask)
    assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=6)


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Gemma2ForCausalLM"])
def test_windowed_and_capped_attention_forward_and_greedy(tmp_path, arch):
    """Mistral: every layer slides over 12 keys, shorter than the 17-token prompt and its decodes. Gemma 2:
    soft-capped scores in the kernel, local layers sliding over 8 keys."""
    hf = save_tiny(tmp_path, arch).to(DEVICE)
    ours = load(tmp_path)
    ids, mask = batch(128, "left")
    assert_forward_matches(ours, hf, ids, mask)
    assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=6)


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_llama_quantized_layers_on_the_triton_kernels(tmp_path, quantization, monkeypatch):
    """Weight-only int4 / int8 layers on the Triton path (kernels/triton_quantized.py, CUDA's): every product
    dequantizes its weight tiles in registers. Logits equal the torch path's exact products on the same quantized
    weights ("-exact": float32 GEMV and expansions) to float32 rounding, and greedy tokens are equal."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_TINY)).save_pretrained(tmp_path)
    ids, mask = batch(128, "left")
    kwargs = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    ours = load(tmp_path, quantization=quantization)
    assert ours.model.model.layers[0].mlp.down_proj.format.on_device
    logits, tokens = ours(input_ids=ids, attention_mask=mask).logits, ours.generate(ids, **kwargs)
    monkeypatch.setenv("ENERGON_HF_KERNELS", "torch")
    reference = load(tmp_path, quantization=f"{quantization}-exact")
    assert not reference.model.model.layers[0].mlp.down_proj.format.on_device
    assert max_diff_on_real(logits, reference(input_ids=ids, attention_mask=mask).logits, mask) <= 1e-4
    assert torch.equal(tokens, reference.generate(ids, **kwargs))
