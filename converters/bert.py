"""HF BERT checkpoint names -> ours. Separate query/key/value projections are fused into qkv."""

from __future__ import annotations

from transformers import BertConfig

from .weights import WeightSpec, concat

# our sub-module -> HF sub-module, inside layer i
_LAYER_MODULES = {
    "attn_out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "fc": "intermediate.dense",
    "out": "output.dense",
    "out_norm": "output.LayerNorm",
}


def _weight_and_bias(ours: str, theirs: str) -> dict[str, WeightSpec]:
    return {f"{ours}.{p}": WeightSpec(f"{theirs}.{p}") for p in ("weight", "bias")}


def bert_model_specs(config: BertConfig, prefix: str = "", pooler: bool = True) -> dict[str, WeightSpec]:
    specs = {f"{prefix}{n}_embeddings.weight": WeightSpec(f"{prefix}embeddings.{n}_embeddings.weight")
             for n in ("word", "position", "token_type")}
    specs |= _weight_and_bias(prefix + "embed_norm", prefix + "embeddings.LayerNorm")
    for i in range(config.num_hidden_layers):
        ours, theirs = f"{prefix}layers.{i}.", f"{prefix}encoder.layer.{i}."
        for p in ("weight", "bias"):
            qkv = tuple(f"{theirs}attention.self.{n}.{p}" for n in ("query", "key", "value"))
            specs[f"{ours}qkv.{p}"] = WeightSpec(qkv, concat)
        for our_module, their_module in _LAYER_MODULES.items():
            specs |= _weight_and_bias(ours + our_module, theirs + their_module)
    if pooler:
        specs |= _weight_and_bias(prefix + "pooler", prefix + "pooler.dense")
    return specs


def bert_masked_lm_specs(config: BertConfig, prefix: str = "") -> dict[str, WeightSpec]:
    specs = bert_model_specs(config, prefix + "bert.", pooler=False)
    head = prefix + "cls.predictions."
    specs |= _weight_and_bias(prefix + "transform", head + "transform.dense")
    specs |= _weight_and_bias(prefix + "transform_norm", head + "transform.LayerNorm")
    # Older checkpoints keep the output bias only as cls.predictions.decoder.bias (HF ties the two).
    specs[prefix + "decoder_bias"] = WeightSpec((head + "bias",), alternatives=((head + "decoder.bias",),))
    if not config.tie_word_embeddings:
        specs[prefix + "decoder.weight"] = WeightSpec(head + "decoder.weight")
    return specs


def bert_sequence_classification_specs(config: BertConfig, prefix: str = "") -> dict[str, WeightSpec]:
    specs = bert_model_specs(config, prefix + "bert.")
    specs |= _weight_and_bias(prefix + "classifier", prefix + "classifier")
    return specs
