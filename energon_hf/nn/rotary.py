"""Rotary position embeddings on packed tokens, with HF's rope_parameters (theta and scaling)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from energon_hf import kernels
from energon_hf.errors import UnsupportedModelError

# Scalings whose frequencies are fixed at load time. "dynamic" and "longrope" change them with the
# sequence length, which a packed batch of mixed lengths cannot share.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(config: PretrainedConfig) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_type", "default")
    return params


def check_rope(config: PretrainedConfig) -> None:
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )


class RotaryEmbedding:
    """cos/sin tables looked up by each packed token's position; applied with HF's rotate-half layout."""

    def __init__(self, config: PretrainedConfig, head_dim: int):
        check_rope(config)
        params = rope_parameters(config)
        if params["rope_type"] == "default":
            base = params.get("rope_theta", getattr(config, "default_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            self.scaling = 1.0
        else:
            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
        self.inv_freq = inv_freq

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> cos and signed sin of shape [T, 1, head_dim] (broadcast over heads), for
        `apply_rotary`: the sin's first half is negated, so that rotate-half becomes a roll."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin() * self.scaling
        sin[:, : freqs.shape[1]].neg_()
        return (emb.cos() * self.scaling).to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by its token's angle (`RotaryEmbedding.cos_sin`'s tables), HF's rotate-half
    layout: kernels.rotary."""
    return kernels.rotary(x, cos, signed_sin)
