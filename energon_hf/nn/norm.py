"""Normalization layers whose math goes through the kernel dispatch (HF's exact numerics on the torch path)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from energon_hf import kernels
from energon_hf.kernels.elementwise import add_layer_norm_compiles

if TYPE_CHECKING:
    from .parallel import Linear1D_Row


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back, as HF's LlamaRMSNorm does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:  # elementwise_affine=False (some OPT checkpoints)
            return super().forward(x)
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


def add_and_norm(norm: LayerNorm, proj: Linear1D_Row, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """norm(proj(h) + residual): a post-LayerNorm layer's close (BERT). Where the compiled add-and-normalize pass
    runs (float32 on CPU: kernels.add_layer_norm) the projection leaves its bias to it, which saves addmm's bias
    broadcast too. Elsewhere (half precision, where the bias would round once more) the projection keeps it."""
    if norm.weight is not None and add_layer_norm_compiles(residual):
        # a quantized product fed bfloat16 (Linear's feeds_product) returns it: float32 holds it exactly
        out = proj(h, add_bias=False).to(residual.dtype)
        return kernels.add_layer_norm(out, residual, proj.bias, norm.weight, norm.bias, norm.eps)
    return norm(proj(h) + residual)
