"""Rotary position embeddings on packed tokens, with HF's rope_parameters (theta and scaling)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from energon_hf import kernels
from energon_hf.errors import UnsupportedModelError

# Scalings whose frequencies are fixed at load time, and "longrope" (Phi-3), which switches between two fixed sets
# per step. "dynamic" recomputes them from the sequence length, which a packed batch of mixed lengths cannot share.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def rope_parameters(config: PretrainedConfig, layer_type: str | None = None) -> dict:
    """The config's rope parameters, or those of one layer type where they differ by type (Gemma 3's local and
    global layers)."""
    params = getattr(config, "rope_parameters", None) or {}
    params = dict(params[layer_type] if layer_type is not None else params)
    params.setdefault("rope_type", "default")
    return params


def check_rope(config: PretrainedConfig, layer_type: str | None = None) -> None:
    rope_type = rope_parameters(config, layer_type)["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )


class RotaryEmbedding:
    """cos/sin tables looked up by each packed token's position; applied with HF's rotate-half layout to the first
    `partial_rotary_factor` of each head's features (all of them by default)."""

    def __init__(self, config: PretrainedConfig, head_dim: int, layer_type: str | None = None):
        check_rope(config, layer_type)
        params = rope_parameters(config, layer_type)
        rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        if params["rope_type"] == "default":
            base = params.get("rope_theta", getattr(config, "default_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
            self.scaling = 1.0
        else:
            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu", layer_type=layer_type)
        self.inv_freq = inv_freq
        # longrope: the short factors' frequencies up to original_max_position_embeddings, the long factors' past it
        self.long_after, self.long_inv_freq = None, None
        if params["rope_type"] == "longrope":
            self.long_after = params["original_max_position_embeddings"]
            self.long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=self.long_after + 1,
                                                                    layer_type=layer_type)

    def frequencies(self, positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Each token's inverse frequencies [T or 1, rotary_dim / 2]. longrope: a sequence takes the long factors
        once its context passes original_max_position_embeddings (a prompt longer than that throughout), as
        transformers does for one sequence (keys cached by earlier steps keep their rotation, but for Phi-3's, which
        transformers recomputes: Phi3ForCausalLM.recompute_at). transformers decides
        for a whole padded batch from its longest row; a packed step decides per sequence, so a request's tokens do
        not depend on what runs beside it (a prompt the server splits into chunks decides per chunk)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        if self.long_inv_freq is None or not positions.numel():
            return self.inv_freq[None, :]
        if self.long_inv_freq.device != positions.device:
            self.long_inv_freq = self.long_inv_freq.to(positions.device)
        ends = positions[cu_seqlens[1:].long() - 1]  # each sequence's last position in the step
        long = torch.repeat_interleave(ends + 1 > self.long_after, (cu_seqlens[1:] - cu_seqlens[:-1]).long())
        return torch.where(long[:, None], self.long_inv_freq, self.inv_freq)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions of the step's sequences (`cu_seqlens`) -> cos and signed sin of shape [T, 1, rotary_dim]
        (broadcast over heads), for `apply_rotary`: the sin's first half is negated, so that rotate-half becomes a
        roll."""
        freqs = positions[:, None].float() * self.frequencies(positions, cu_seqlens)
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin() * self.scaling
        sin[:, : freqs.shape[1]].neg_()
        return (emb.cos() * self.scaling).to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by its token's angle (`RotaryEmbedding.cos_sin`'s tables), HF's rotate-half
    layout: kernels.rotary. Tables narrower than the heads (a partial_rotary_factor) turn the first features;
    the others pass unchanged, as transformers' Phi-3."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return kernels.rotary(x, cos, signed_sin)
    return torch.cat((kernels.rotary(x[..., :rotary_dim], cos, signed_sin), x[..., rotary_dim:]), dim=-1)
