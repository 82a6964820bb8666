"""Gemma 3 text models (Gemma3ForCausalLM): Gemma 2's layers with per-head q/k norms, no soft-capping by default,
and rotary tables per layer type (the local layers' own theta)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from energon_hf.batch import PackedBatch
from energon_hf.nn.rotary import RotaryEmbedding

from .gemma2 import Gemma2DecoderLayer, Gemma2ForCausalLM
from .llama import DecoderOptions, head_dim

if TYPE_CHECKING:
    from transformers import Gemma3TextConfig


class LayerTypeRotary:
    """One rotary table per layer type ("sliding_attention", "full_attention"); `cos_sin` gives each type's."""

    def __init__(self, config: Gemma3TextConfig):
        self.tables = {t: RotaryEmbedding(config, head_dim(config), t) for t in sorted(set(config.layer_types))}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                cu_seqlens: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {t: table.cos_sin(positions, dtype, cu_seqlens) for t, table in self.tables.items()}


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    def __init__(self, config: Gemma3TextConfig, layer_idx: int, options: DecoderOptions):
        super().__init__(config, layer_idx, options)
        self.layer_type = config.layer_types[layer_idx]

    def forward(self, x: torch.Tensor, batch: PackedBatch,
                cos_sin: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        return super().forward(x, batch, cos_sin[self.layer_type])


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    layer_cls = Gemma3DecoderLayer

    @staticmethod
    def decoder_options(config: Gemma3TextConfig) -> DecoderOptions:
        return replace(Gemma2ForCausalLM.decoder_options(config), qk_norm=True)

    @staticmethod
    def rotary_embedding(config: Gemma3TextConfig) -> LayerTypeRotary:
        return LayerTypeRotary(config)
