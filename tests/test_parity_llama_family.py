"""Llama-like architectures (Qwen2, Qwen3, Mistral, Phi-3, Gemma 2, Gemma 3) against transformers on the same
weights: forward within 1e-4 on real tokens and equal greedy tokens for 32 new tokens on mixed-length batches,
sliding windows, capped logits and rope variants included. tp=2 and pp=2 runs are in test_parallel_parity.py."""

import pytest
import torch
import transformers
from helpers import (
    MIXED_LENGTHS,
    assert_forward_matches,
    assert_greedy_matches,
    greedy_gap,
    max_diff_on_real,
    padded_batch,
)
from test_parity_llama import LLAMA_TINY

from energon_hf import EnergonModel
from energon_hf.loading import empty_model
from energon_hf.models import ARCHITECTURES
from energon_hf.models.phi3 import Phi3ForCausalLM

VOCAB = LLAMA_TINY["vocab_size"]
# Each architecture's tiny config: Llama's sizes, with what sets the variant apart switched on. The windows are
# shorter than the test batches' longer prompts (up to 64 tokens) and generations: Qwen2's second layer slides
# (layer_types from max_window_layers), the first attends fully; every Mistral layer slides.
FAMILY = {
    "Qwen2ForCausalLM": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "Qwen3ForCausalLM": dict(head_dim=32, attention_bias=True),
    "MistralForCausalLM": dict(head_dim=32, sliding_window=12),
    # longrope on half of each 16-feature head; its short factors here (the long ones: test_phi3_longrope_*)
    "Phi3ForCausalLM": dict(original_max_position_embeddings=256, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 256, "short_factor": [1.0, 1.5, 2.0, 3.0],
        "long_factor": [2.0, 4.0, 6.0, 9.0]}),
    # local (sliding) and global layers, scores scaled by query_pre_attn_scalar, capped logits, a tied head
    "Gemma2ForCausalLM": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=3.0,
                              final_logit_softcapping=8.0, tie_word_embeddings=True),
    "Gemma3ForCausalLM": dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"],
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                               "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                  "rope_theta": 1000000.0}}),
}
WINDOWS = {"Qwen2ForCausalLM": [None, 8], "Qwen3ForCausalLM": [None, None], "MistralForCausalLM": [12, 12],
           "Phi3ForCausalLM": [None, None], "Gemma2ForCausalLM": [8, None], "Gemma3ForCausalLM": [8, None]}
CONFIGS = {"Gemma3ForCausalLM": transformers.Gemma3TextConfig}


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    config_cls = CONFIGS.get(arch) or getattr(transformers, arch.replace("ForCausalLM", "Config"))
    return config_cls(**{**LLAMA_TINY, **FAMILY[arch], **overrides})


def save_tiny(path, arch: str, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A random model of `arch` saved to `path` in `dtype`; biases and q/k norm weights are drawn too
    (transformers initializes them to 0 and 1, which would hide a bias or a norm that is not applied)."""
    torch.manual_seed(0)
    model = getattr(transformers, arch)(tiny_config(arch, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.2)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(1, 0.3)
    model.to(dtype).save_pretrained(path)
    return getattr(transformers, arch).from_pretrained(path).eval()


@pytest.fixture(scope="module", params=list(FAMILY))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny(path, request.param)
    return EnergonModel.from_pretrained(path), hf, path


def test_forward_matches_transformers(family):
    ours, hf, _ = family
    for side in ("left", "right"):
        ids, mask = padded_batch(MIXED_LENGTHS, VOCAB, side)
        assert_forward_matches(ours, hf, ids, mask)


def test_greedy_generate_equals_transformers(family):
    ours, hf, _ = family
    ids, mask = padded_batch(MIXED_LENGTHS, VOCAB, "left", seed=2)
    assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=32)


@pytest.mark.parametrize("arch", list(FAMILY))
def test_bfloat16_checkpoint_matches_transformers_in_bfloat16(arch, tmp_path):
    """Each architecture saved in bfloat16 (as hub checkpoints are) loads and runs in it, and matches transformers
    in bfloat16: logits within 4 units in the last place of their magnitude, and every greedy token within that
    of transformers' largest logit (helpers.greedy_gap), its windows and caps decoding through the in-place
    kernel on half-precision caches."""
    hf = save_tiny(tmp_path, arch, torch.bfloat16)
    ours = EnergonModel.from_pretrained(tmp_path)
    assert ours.dtype == torch.bfloat16 and {p.dtype for p in ours.model.parameters()} == {torch.bfloat16}
    ids, mask = padded_batch(MIXED_LENGTHS[:5], VOCAB, "left")
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
    got = ours(input_ids=ids, attention_mask=mask).logits
    bound = 4 * torch.finfo(torch.bfloat16).eps * expected[mask.bool()].abs().max().item()
    assert got.dtype == torch.bfloat16 and max_diff_on_real(got, expected, mask) <= bound
    assert greedy_gap(ours, hf, ids, mask, 24) <= bound


def test_variant_layers_are_built(family):
    """What sets each variant apart is there (a bias or norm that is loaded but not applied fails the parity)."""
    ours, hf, _ = family
    attention = ours.model.model.layers[0].self_attn
    name = type(hf).__name__
    assert (attention.qkv.bias is not None) == (name in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"))
    assert (attention.o_proj.bias is not None) == (name == "Qwen3ForCausalLM")
    assert (attention.q_norm is not None) == (name in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"))
    assert [layer.self_attn.window for layer in ours.model.model.layers] == WINDOWS[name]
    assert ARCHITECTURES[name].model_cls is type(ours.model)


def long_after(positions: int) -> dict:
    """Phi-3's tiny config with the long factors past `positions` (Phi3Config's own original_max_position_embeddings
    wins over rope_parameters': both are set)."""
    rope = {**FAMILY["Phi3ForCausalLM"]["rope_parameters"], "original_max_position_embeddings": positions}
    return dict(original_max_position_embeddings=positions, rope_parameters=rope)


def test_phi3_longrope_switches_past_the_original_length(tmp_path):
    """Long factors past 32 positions: a 28-token prompt starts with the short ones and its generation crosses into
    the long ones, as transformers (the keys cached before keep their rotation); a left-padded batch runs every row
    to the last column, where transformers' choice for the batch and ours per sequence agree. Without the switch
    the tokens differ."""
    hf = save_tiny(tmp_path, "Phi3ForCausalLM", **long_after(32))
    ours = EnergonModel.from_pretrained(tmp_path)
    ids, mask = padded_batch([40, 20, 9], VOCAB, "left", seed=3)
    assert_forward_matches(ours, hf, ids, mask)
    prompt = ids[1:2, -28:]
    got = assert_greedy_matches(ours, hf, prompt, torch.ones_like(prompt), max_new_tokens=12)
    ours.model.rotary.long_inv_freq = None  # short factors throughout
    assert not torch.equal(ours.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                         eos_token_id=None), got)


def test_phi3_longrope_decides_per_sequence(tmp_path):
    """In a packed step each sequence takes the long factors by its own length: a 40-token prompt (past 32) beside a
    10-token one generate what transformers generates for each alone."""
    hf = save_tiny(tmp_path, "Phi3ForCausalLM", **long_after(32))
    ours = EnergonModel.from_pretrained(tmp_path)
    ids, mask = padded_batch([40, 10], VOCAB, "left", seed=8)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = ours.generate(ids, attention_mask=mask, **kwargs)
    for row in range(2):
        prompt = ids[row][mask[row].bool()][None]
        with torch.no_grad():
            alone = hf.generate(prompt, **kwargs)
        assert torch.equal(got[row, -8:], alone[0, -8:])


def test_default_weight_map_reads_fused_projections(family):
    """The map a model derives from its own parameter names (StagedModel.weight_specs): packed modules read
    their checkpoint parts in order, everything else its own name."""
    model = empty_model(family[1].config)  # as loading builds it (a loaded layer's weight is held in a format)
    specs = model.weight_specs()
    parts = {"qkv": [f"{p}_proj" for p in "qkv"], "gate_up": ["gate_proj", "up_proj"]}
    if isinstance(model, Phi3ForCausalLM):  # stored fused
        parts = {"qkv": ["qkv_proj"], "gate_up": ["gate_up_proj"]}
    assert specs["model.layers.1.self_attn.qkv.weight"].names == tuple(
        f"model.layers.1.self_attn.{p}.weight" for p in parts["qkv"])
    assert specs["model.layers.0.mlp.gate_up.weight"].names == tuple(
        f"model.layers.0.mlp.{p}.weight" for p in parts["gate_up"])
    assert specs["model.norm.weight"].names == ("model.norm.weight",)
    assert set(specs) == {n for n, _ in model.named_parameters()}


def write_family_gguf(source, path, arch: str, rng: torch.Generator, vocab: int = 512):
    """SmolLM2's GGUF (`source`) cut to one layer and its first `vocab` tokens (the merges among them kept), and
    labelled `arch`, with the tensors that architecture adds (Qwen2's q/k/v biases, Qwen3's q/k norms) drawn at
    random: a small file that transformers' GGUF reader reads as that architecture (the whole vocabulary's header
    took it 6 s per read)."""
    import gguf
    from gguf import GGUFValueType

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(path), arch)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    kept = set(tokens)
    cut = {"llama.block_count": 1, "llama.vocab_size": vocab, "tokenizer.ggml.tokens": tokens,
           "tokenizer.ggml.token_type": reader.fields["tokenizer.ggml.token_type"].contents()[:vocab],
           "tokenizer.ggml.merges": [m for m in reader.fields["tokenizer.ggml.merges"].contents()
                                     if m.replace(" ", "") in kept and set(m.split(" ")) <= kept]}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = cut[key] if key in cut else field.contents()
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key.replace("llama.", f"{arch}.", 1), value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            writer.add_tensor(tensor.name, tensor.data[:vocab], raw_dtype=tensor.tensor_type)
        elif not tensor.name.startswith("blk.") or tensor.name.startswith("blk.0."):
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    head_dim, heads, kv_heads = 64, 9, 3
    extra = {"qwen2": {f"attn_{p}.bias": (n * head_dim,) for p, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))},
             "qwen3": {"attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)}}[arch]
    for name, shape in extra.items():
        writer.add_tensor(f"blk.0.{name}", (1 + 0.2 * torch.randn(shape, generator=rng)).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_qwen2_gguf_file_loads(tmp_path, smollm2_gguf):
    """A Qwen2 GGUF file (4-bit blocks and float biases) loads as Qwen2 and generates transformers' tokens on the
    weights transformers' GGUF reader gave (the converted folder). Qwen3 files are read too, untested here:
    transformers 5.25 reads no head size from a qwen3 GGUF (it takes Qwen3Config's 128), and SmolLM2's is 64."""
    path = write_family_gguf(smollm2_gguf, tmp_path / "tiny-qwen2.gguf", "qwen2", torch.Generator().manual_seed(0))
    ours = EnergonModel.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ours.folder, dtype=torch.float32).eval()
    assert type(ours.model).__name__ == type(hf).__name__ == "Qwen2ForCausalLM"
    assert hf.model.layers[0].self_attn.q_proj.bias.std() > 0.1  # the file's biases, not a fresh init
    prompt = torch.tensor([[1, 504, 314, 17, 30, 258, 421, 99]])
    assert_forward_matches(ours, hf, prompt, torch.ones_like(prompt))
    assert_greedy_matches(ours, hf, prompt, torch.ones_like(prompt), max_new_tokens=8)
