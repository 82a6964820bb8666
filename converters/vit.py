"""HF ViT checkpoint names -> ours. Separate query/key/value projections are fused into qkv."""

from __future__ import annotations

from transformers import ViTConfig

from .weights import WeightSpec, concat

_LAYER_MODULES = {
    "norm_before": "layernorm_before",
    "attn_out": "attention.output.dense",
    "norm_after": "layernorm_after",
    "fc": "intermediate.dense",
    "out": "output.dense",
}


def _weight_and_bias(ours: str, theirs: str, bias: bool = True) -> dict[str, WeightSpec]:
    return {f"{ours}.{p}": WeightSpec(f"{theirs}.{p}") for p in (("weight", "bias") if bias else ("weight",))}


def vit_model_specs(config: ViTConfig, prefix: str = "", pooler: bool = True) -> dict[str, WeightSpec]:
    specs = {
        prefix + "cls_token": WeightSpec(prefix + "embeddings.cls_token"),
        prefix + "position_embeddings": WeightSpec(prefix + "embeddings.position_embeddings"),
    }
    specs |= _weight_and_bias(prefix + "patch_embed", prefix + "embeddings.patch_embeddings.projection")
    specs |= _weight_and_bias(prefix + "norm", prefix + "layernorm")
    for i in range(config.num_hidden_layers):
        ours, theirs = f"{prefix}layers.{i}.", f"{prefix}encoder.layer.{i}."
        for p in ("weight", "bias") if config.qkv_bias else ("weight",):
            qkv = tuple(f"{theirs}attention.attention.{n}.{p}" for n in ("query", "key", "value"))
            specs[f"{ours}qkv.{p}"] = WeightSpec(qkv, concat)
        for our_module, their_module in _LAYER_MODULES.items():
            specs |= _weight_and_bias(ours + our_module, theirs + their_module)
    if pooler:
        specs |= _weight_and_bias(prefix + "pooler", prefix + "pooler.dense")
    return specs


def vit_image_classification_specs(config: ViTConfig, prefix: str = "") -> dict[str, WeightSpec]:
    specs = vit_model_specs(config, prefix + "vit.", pooler=False)
    specs |= _weight_and_bias(prefix + "classifier", prefix + "classifier")
    return specs
