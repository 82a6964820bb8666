"""GPT-2 on packed tokens (GPT2Model, GPT2LMHeadModel)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithCrossAttentions

from energon_hf.batch import PackedBatch
from energon_hf.converters import WeightSpec, gpt2_lm_head_specs, gpt2_model_specs
from energon_hf.nn import Linear1D_Col, Linear1D_Row, VocabParallelEmbedding, attend
from energon_hf.nn.lm_head import rows_for_logits, untied_head, vocab_logits
from energon_hf.nn.norm import LayerNorm
from energon_hf.parallel import divide

from .staged import StagedModel

if TYPE_CHECKING:
    from transformers import GPT2Config


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.num_heads = divide(config.num_attention_heads, "attention heads")  # this rank's heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.layer_idx = layer_idx
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)
        hidden = config.hidden_size
        # HF's fused c_attn, kept fused
        self.qkv = Linear1D_Col(hidden, 3 * hidden, parts=(hidden,) * 3, step_buffer="qkv")
        self.proj = Linear1D_Row(hidden, hidden)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        q, k, v = self.qkv(x, batch.buffers).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        out = attend(q, k, v, batch.attn, self.layer_idx, causal=True, scale=self.scale)
        return self.proj(out.reshape(x.shape[0], -1))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.hidden_size, eps=eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.hidden_size, eps=eps)
        self.fc = Linear1D_Col(config.hidden_size, inner, activation=config.activation_function, feeds_product=True,
                               step_buffer="mlp")
        self.proj = Linear1D_Row(inner, config.hidden_size)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), batch)
        return x + self.proj(self.fc(self.ln_2(x), batch.buffers))


class GPT2Model(StagedModel):
    hf_output = BaseModelOutputWithPastAndCrossAttentions
    token_outputs = ("last_hidden_state",)
    learned_positions = True  # position ids past max_position_embeddings do not exist
    base_prefix = "transformer."  # HF checkpoints hold the body with or without this prefix
    layers_path = "h"
    head_modules = ("ln_f",)

    def __init__(self, config: GPT2Config):
        super().__init__()
        if config.add_cross_attention:
            raise ValueError("GPT-2 with add_cross_attention=True (encoder-decoder use) is not supported")
        self.config = config
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def weight_specs(self) -> dict[str, WeightSpec]:
        return gpt2_model_specs(self.config)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        x = self.wte(batch.input_ids) + self.wpe(batch.positions)
        if batch.token_type_ids is not None:  # HF GPT-2 embeds token types with the word embeddings
            x = x + self.wte(batch.token_type_ids)
        return x

    def finish(self, x: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        return {"last_hidden_state": self.ln_f(x)}


class GPT2LMHeadModel(StagedModel):
    hf_output = CausalLMOutputWithCrossAttentions
    token_outputs = ("logits",)
    learned_positions = True  # position ids past max_position_embeddings do not exist
    base_prefix = "transformer."
    layers_path = "transformer.h"
    head_modules = ("transformer.ln_f", "lm_head")

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = untied_head(config)

    def weight_specs(self) -> dict[str, WeightSpec]:
        return gpt2_lm_head_specs(self.config)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        return self.transformer.embed(batch)

    def finish(self, x: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        hidden = self.transformer.ln_f(rows_for_logits(x, batch))
        return {"logits": vocab_logits(hidden, self.transformer.wte, self.lm_head)}

    def tied_embedding(self) -> str | None:
        return "transformer.wte" if self.lm_head is None else None

    def kv_cache_layout(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of the KV cache this model fills."""
        c = self.config
        heads = divide(c.num_attention_heads, "attention heads")
        return c.num_hidden_layers, heads, c.hidden_size // c.num_attention_heads
