"""OPT on packed tokens (OPTForCausalLM): learned positions offset by 2, pre- or post-LayerNorm layers,
optional projections between the embedding width and the hidden width."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from energon_hf.batch import PackedBatch
from energon_hf.converters import WeightSpec, opt_causal_lm_specs
from energon_hf.nn import Linear, Linear1D_Col, Linear1D_Row, VocabParallelEmbedding, attend
from energon_hf.nn.lm_head import rows_for_logits, untied_head, vocab_logits
from energon_hf.nn.norm import LayerNorm
from energon_hf.parallel import divide

from .staged import StagedModel

if TYPE_CHECKING:
    from transformers import OPTConfig

POSITION_OFFSET = 2  # OPT's position table starts with two unused rows


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int):
        super().__init__()
        hidden, bias = config.hidden_size, config.enable_bias
        affine = config.layer_norm_elementwise_affine
        self.num_heads = divide(config.num_attention_heads, "attention heads")  # this rank's heads
        self.head_dim = hidden // config.num_attention_heads
        self.layer_idx = layer_idx
        self.pre_norm = config.do_layer_norm_before
        self.self_attn_layer_norm = LayerNorm(hidden, elementwise_affine=affine)
        self.qkv = Linear1D_Col(hidden, 3 * hidden, bias=bias, parts=(hidden,) * 3, step_buffer="qkv")
        self.out_proj = Linear1D_Row(hidden, hidden, bias=bias)
        self.final_layer_norm = LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = Linear1D_Col(hidden, config.ffn_dim, bias=bias, activation=config.activation_function,
                                step_buffer="mlp")
        self.fc2 = Linear1D_Row(config.ffn_dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        q, k, v = self.qkv(h, batch.buffers).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        x = x + self.out_proj(attend(q, k, v, batch.attn, self.layer_idx, causal=True, scale=None).flatten(1))
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.fc1(h, batch.buffers))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTForCausalLM(StagedModel):
    hf_output = CausalLMOutputWithPast
    token_outputs = ("logits",)
    base_prefix = "model."
    learned_positions = True  # position ids past max_position_embeddings do not exist
    positions_count_real_tokens = True  # HF's OPT numbers positions by the mask's cumsum, even in forward
    head_modules = ("final_layer_norm", "project_out", "lm_head")

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        width, hidden = config.word_embed_proj_dim, config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, width)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, hidden)
        self.project_in = Linear(width, hidden, bias=False) if width != hidden else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        final_norm = config.do_layer_norm_before and not config._remove_final_layer_norm
        self.final_layer_norm = (LayerNorm(hidden, elementwise_affine=config.layer_norm_elementwise_affine)
                                 if final_norm else None)
        self.project_out = Linear(hidden, width, bias=False) if width != hidden else None
        self.lm_head = untied_head(config, width)

    def weight_specs(self) -> dict[str, WeightSpec]:
        return opt_causal_lm_specs(self.config)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.embed_positions(batch.positions + POSITION_OFFSET)

    def tied_embedding(self) -> str | None:
        return "embed_tokens" if self.lm_head is None else None

    def finish(self, x: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        x = rows_for_logits(x, batch)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return {"logits": vocab_logits(x, self.embed_tokens, self.lm_head)}

    def kv_cache_layout(self) -> tuple[int, int, int]:
        c = self.config
        heads = divide(c.num_attention_heads, "attention heads")
        return c.num_hidden_layers, heads, c.hidden_size // c.num_attention_heads
