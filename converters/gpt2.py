"""HF GPT-2 checkpoint names -> ours. Conv1D weights are stored [in, out] and get transposed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .weights import WeightSpec

if TYPE_CHECKING:
    from transformers import GPT2Config

# our sub-module -> HF sub-module, inside block h.{i}
_BLOCK_LINEARS = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "fc": "mlp.c_fc", "proj": "mlp.c_proj"}


def gpt2_model_specs(config: GPT2Config, prefix: str = "") -> dict[str, WeightSpec]:
    names = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]
    for i in range(config.num_hidden_layers):
        names += [f"h.{i}.{ln}.{p}" for ln in ("ln_1", "ln_2") for p in ("weight", "bias")]
    specs = {prefix + n: WeightSpec(prefix + n) for n in names}
    for i in range(config.num_hidden_layers):
        for ours, theirs in _BLOCK_LINEARS.items():
            ours, theirs = f"{prefix}h.{i}.{ours}", f"{prefix}h.{i}.{theirs}"
            specs[ours + ".weight"] = WeightSpec(theirs + ".weight", "transposed")
            specs[ours + ".bias"] = WeightSpec(theirs + ".bias")
    return specs


def gpt2_lm_head_specs(config: GPT2Config, prefix: str = "") -> dict[str, WeightSpec]:
    specs = gpt2_model_specs(config, prefix + "transformer.")
    if not config.tie_word_embeddings:
        specs[prefix + "lm_head.weight"] = WeightSpec(prefix + "lm_head.weight")
    return specs
