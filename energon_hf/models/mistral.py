"""Mistral (MistralForCausalLM): Llama's layers without biases."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .llama import DecoderOptions, LlamaForCausalLM

if TYPE_CHECKING:
    from transformers import MistralConfig


class MistralForCausalLM(LlamaForCausalLM):
    @staticmethod
    def decoder_options(config: MistralConfig) -> DecoderOptions:
        return DecoderOptions(sliding="every layer")
