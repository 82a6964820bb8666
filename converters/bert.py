"""HF BERT checkpoint names -> ours. Separate query/key/value projections are fused into qkv."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .weights import WeightSpec, fused, renamed

if TYPE_CHECKING:
    from transformers import BertConfig

# our sub-module -> HF sub-module, inside layer i
_LAYER_MODULES = {
    "attn_out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "fc": "intermediate.dense",
    "out": "output.dense",
    "out_norm": "output.LayerNorm",
}


def bert_model_specs(config: BertConfig, prefix: str = "", pooler: bool = True) -> dict[str, WeightSpec]:
    specs = {f"{prefix}{n}_embeddings.weight": WeightSpec(f"{prefix}embeddings.{n}_embeddings.weight")
             for n in ("word", "position", "token_type")}
    specs |= renamed(prefix + "embed_norm", prefix + "embeddings.LayerNorm")
    for i in range(config.num_hidden_layers):
        ours, theirs = f"{prefix}layers.{i}.", f"{prefix}encoder.layer.{i}."
        specs |= fused(ours + "qkv", tuple(f"{theirs}attention.self.{n}" for n in ("query", "key", "value")))
        for our_module, their_module in _LAYER_MODULES.items():
            specs |= renamed(ours + our_module, theirs + their_module)
    if pooler:
        specs |= renamed(prefix + "pooler", prefix + "pooler.dense")
    return specs


def bert_masked_lm_specs(config: BertConfig, prefix: str = "") -> dict[str, WeightSpec]:
    specs = bert_model_specs(config, prefix + "bert.", pooler=False)
    head = prefix + "cls.predictions."
    specs |= renamed(prefix + "transform", head + "transform.dense")
    specs |= renamed(prefix + "transform_norm", head + "transform.LayerNorm")
    # Older checkpoints keep the output bias only as cls.predictions.decoder.bias (HF ties the two).
    specs[prefix + "decoder_bias"] = WeightSpec((head + "bias",), alternatives=((head + "decoder.bias",),))
    if not config.tie_word_embeddings:
        specs[prefix + "decoder.weight"] = WeightSpec(head + "decoder.weight")
    return specs


def bert_sequence_classification_specs(config: BertConfig, prefix: str = "") -> dict[str, WeightSpec]:
    return bert_model_specs(config, prefix + "bert.") | renamed(prefix + "classifier", prefix + "classifier")


def bert_token_classification_specs(config: BertConfig, prefix: str = "") -> dict[str, WeightSpec]:
    return bert_model_specs(config, prefix + "bert.", pooler=False) | renamed(prefix + "classifier",
                                                                               prefix + "classifier")
