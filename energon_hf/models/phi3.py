"""Phi-3 and Phi-4-mini (Phi3ForCausalLM): Llama's layers, with q/k/v and gate/up stored fused in the checkpoint,
rotary positions on a `partial_rotary_factor` of each head, and longrope scaling (nn/rotary.py) with transformers'
recompute of a sequence that passes the original length."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .llama import DecoderOptions, LlamaForCausalLM

if TYPE_CHECKING:
    from transformers import Phi3Config


class Phi3ForCausalLM(LlamaForCausalLM):
    packed_modules = {"qkv": ("qkv_proj",), "gate_up": ("gate_up_proj",)}  # already fused, in our order

    @staticmethod
    def decoder_options(config: Phi3Config) -> DecoderOptions:
        return DecoderOptions(sliding="every layer")

    def recompute_at(self) -> int | None:
        """With longrope, a sequence that passes original_max_position_embeddings is computed again with the long
        factors, keys of its prompt included, as transformers' Phi-3 recomputes its cache there."""
        return self.config.original_max_position_embeddings + 1 if self.rotary.long_inv_freq is not None else None
