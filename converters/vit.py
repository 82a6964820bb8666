"""HF ViT checkpoint names -> ours. Separate query/key/value projections are fused into qkv."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .weights import WeightSpec, fused, params_of, renamed

if TYPE_CHECKING:
    from transformers import ViTConfig

# our sub-module -> HF sub-module, inside layer i
_LAYER_MODULES = {
    "norm_before": "layernorm_before",
    "attn_out": "attention.output.dense",
    "norm_after": "layernorm_after",
    "fc": "intermediate.dense",
    "out": "output.dense",
}


def vit_model_specs(config: ViTConfig, prefix: str = "", pooler: bool = True) -> dict[str, WeightSpec]:
    specs = {
        prefix + "cls_token": WeightSpec(prefix + "embeddings.cls_token"),
        prefix + "position_embeddings": WeightSpec(prefix + "embeddings.position_embeddings"),
    }
    specs |= renamed(prefix + "patch_embed", prefix + "embeddings.patch_embeddings.projection")
    specs |= renamed(prefix + "norm", prefix + "layernorm")
    for i in range(config.num_hidden_layers):
        ours, theirs = f"{prefix}layers.{i}.", f"{prefix}encoder.layer.{i}."
        qkv = tuple(f"{theirs}attention.attention.{n}" for n in ("query", "key", "value"))
        specs |= fused(ours + "qkv", qkv, params_of(config.qkv_bias))
        for our_module, their_module in _LAYER_MODULES.items():
            specs |= renamed(ours + our_module, theirs + their_module)
    if pooler:
        specs |= renamed(prefix + "pooler", prefix + "pooler.dense")
    return specs


def vit_image_classification_specs(config: ViTConfig, prefix: str = "") -> dict[str, WeightSpec]:
    return vit_model_specs(config, prefix + "vit.", pooler=False) | renamed(prefix + "classifier",
                                                                             prefix + "classifier")
