"""HF OPT checkpoint names -> ours. Separate q/k/v projections are fused into qkv."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .weights import WeightSpec, fused, params_of, renamed

if TYPE_CHECKING:
    from transformers import OPTConfig


def opt_causal_lm_specs(config: OPTConfig, prefix: str = "") -> dict[str, WeightSpec]:
    ours, theirs = prefix, prefix + "model.decoder."
    same = lambda module, params: renamed(ours + module, theirs + module, params)
    linear = params_of(config.enable_bias)
    norm = ("weight", "bias") if config.layer_norm_elementwise_affine else ()
    specs = same("embed_tokens", ("weight",)) | same("embed_positions", ("weight",))
    if config.word_embed_proj_dim != config.hidden_size:
        specs |= same("project_in", ("weight",)) | same("project_out", ("weight",))
    if config.do_layer_norm_before and not config._remove_final_layer_norm:
        specs |= same("final_layer_norm", norm)
    for i in range(config.num_hidden_layers):
        layer = f"layers.{i}."
        specs |= fused(f"{ours}{layer}qkv", tuple(f"{theirs}{layer}self_attn.{n}_proj" for n in "qkv"), linear)
        specs |= renamed(f"{ours}{layer}out_proj", f"{theirs}{layer}self_attn.out_proj", linear)
        specs |= same(layer + "fc1", linear) | same(layer + "fc2", linear)
        specs |= same(layer + "self_attn_layer_norm", norm) | same(layer + "final_layer_norm", norm)
    if not config.tie_word_embeddings:
        specs |= renamed(ours + "lm_head", prefix + "lm_head", ("weight",))
    return specs
