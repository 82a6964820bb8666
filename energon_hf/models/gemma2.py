"""Gemma 2 (Gemma2ForCausalLM): Llama's layers with RMSNorm weights as offsets from 1, norms around both blocks,
GeGLU, embeddings scaled by sqrt(hidden size), query_pre_attn_scalar, soft-capped attention and final logits, and
local (sliding-window) layers alternating with global ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from energon_hf import kernels
from energon_hf.batch import PackedBatch
from energon_hf.errors import UnsupportedModelError
from energon_hf.nn.norm import RMSNorm

from .llama import DecoderOptions, LlamaDecoderLayer, LlamaForCausalLM

if TYPE_CHECKING:
    from transformers import Gemma2Config


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + weight) in float32, cast back after the weight, as transformers' Gemma norms."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x.float(), 1.0 + self.weight.float(), self.eps).to(x.dtype)


class Gemma2DecoderLayer(LlamaDecoderLayer):
    """Norms around both blocks: post_attention_layernorm normalizes the attention's output (Llama's name for the
    MLP's input norm), pre_ and post_feedforward_layernorm the MLP's input and output."""

    def __init__(self, config: Gemma2Config, layer_idx: int, options: DecoderOptions):
        super().__init__(config, layer_idx, options)
        self.pre_feedforward_layernorm = options.norm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = options.norm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: PackedBatch, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), batch, cos_sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), batch.buffers))


class Gemma2ForCausalLM(LlamaForCausalLM):
    layer_cls = Gemma2DecoderLayer

    @staticmethod
    def decoder_options(config: Gemma2Config) -> DecoderOptions:
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(f"{type(config).__name__}: use_bidirectional_attention is not supported")
        return DecoderOptions(qkv_bias=config.attention_bias, o_bias=config.attention_bias, norm=GemmaRMSNorm,
                              activation=config.hidden_activation,
                              attention_scale=config.query_pre_attn_scalar**-0.5,
                              softcap=config.attn_logit_softcapping, sliding="layer types")

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        x = super().embed(batch)
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)  # rounded to the dtype, as transformers

    def finish(self, x: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        out = super().finish(x, batch)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            out["logits"] = torch.tanh(out["logits"] / cap) * cap
        return out
