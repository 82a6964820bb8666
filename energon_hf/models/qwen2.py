"""Qwen2 and Qwen2.5 (Qwen2ForCausalLM): Llama's layers with biases on q, k and v (none on the output
projection or the MLP)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .llama import DecoderOptions, LlamaForCausalLM

if TYPE_CHECKING:
    from transformers import Qwen2Config


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def decoder_options(config: Qwen2Config) -> DecoderOptions:
        return DecoderOptions(qkv_bias=True, sliding="layer types")
