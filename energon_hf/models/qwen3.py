"""Qwen3 (Qwen3ForCausalLM): Llama's layers with an RMSNorm over each query and key head before the rotary."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .llama import DecoderOptions, LlamaForCausalLM

if TYPE_CHECKING:
    from transformers import Qwen3Config


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def decoder_options(config: Qwen3Config) -> DecoderOptions:
        return DecoderOptions(qkv_bias=config.attention_bias, o_bias=config.attention_bias, qk_norm=True,
                              sliding="layer types")
