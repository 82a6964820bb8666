"""HF Llama checkpoint names -> ours: q/k/v fused into qkv, gate/up fused into gate_up."""

from __future__ import annotations

from transformers import LlamaConfig

from .weights import WeightSpec, concat


def llama_causal_lm_specs(config: LlamaConfig, prefix: str = "") -> dict[str, WeightSpec]:
    body = prefix + "model."
    names = ["embed_tokens.weight", "norm.weight"]
    biases = []
    for i in range(config.num_hidden_layers):
        layer = f"layers.{i}."
        names += [layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight",
                  layer + "self_attn.o_proj.weight", layer + "mlp.down_proj.weight"]
        if config.attention_bias:
            biases.append(layer + "self_attn.o_proj.bias")
        if config.mlp_bias:
            biases.append(layer + "mlp.down_proj.bias")
    specs = {body + n: WeightSpec(body + n) for n in names + biases}
    params = ["weight"] + (["bias"] if config.attention_bias else [])
    mlp_params = ["weight"] + (["bias"] if config.mlp_bias else [])
    for i in range(config.num_hidden_layers):
        layer = f"{body}layers.{i}."
        for p in params:
            qkv = tuple(f"{layer}self_attn.{n}_proj.{p}" for n in ("q", "k", "v"))
            specs[f"{layer}self_attn.qkv.{p}"] = WeightSpec(qkv, concat)
        for p in mlp_params:
            gate_up = (f"{layer}mlp.gate_proj.{p}", f"{layer}mlp.up_proj.{p}")
            specs[f"{layer}mlp.gate_up.{p}"] = WeightSpec(gate_up, concat)
    if not config.tie_word_embeddings:
        specs[prefix + "lm_head.weight"] = WeightSpec(prefix + "lm_head.weight")
    return specs
