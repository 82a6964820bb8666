"""HF Llama checkpoint names -> ours: q/k/v fused into qkv, gate/up fused into gate_up."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .weights import WeightSpec, fused, params_of, renamed

if TYPE_CHECKING:
    from transformers import LlamaConfig


def llama_causal_lm_specs(config: LlamaConfig, prefix: str = "") -> dict[str, WeightSpec]:
    body = prefix + "model."
    specs = renamed(body + "embed_tokens", body + "embed_tokens", ("weight",))
    specs |= renamed(body + "norm", body + "norm", ("weight",))
    attn, mlp = params_of(config.attention_bias), params_of(config.mlp_bias)
    for i in range(config.num_hidden_layers):
        layer = f"{body}layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            specs |= renamed(layer + norm, layer + norm, ("weight",))
        specs |= fused(layer + "self_attn.qkv", tuple(f"{layer}self_attn.{n}_proj" for n in "qkv"), attn)
        specs |= renamed(layer + "self_attn.o_proj", layer + "self_attn.o_proj", attn)
        specs |= fused(layer + "mlp.gate_up", (layer + "mlp.gate_proj", layer + "mlp.up_proj"), mlp)
        specs |= renamed(layer + "mlp.down_proj", layer + "mlp.down_proj", mlp)
    if not config.tie_word_embeddings:
        specs |= renamed(prefix + "lm_head", prefix + "lm_head", ("weight",))
    return specs
