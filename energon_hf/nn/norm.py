"""Normalization layers whose math goes through the kernel dispatch (HF's exact numerics on the torch path)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from energon_hf import kernels
from energon_hf.kernels import compiled

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
    """norm(proj(h) + residual): a post-LayerNorm layer's close (BERT). In float32 on CPU the projection leaves its
    bias to the compiled add-and-normalize pass (kernels.add_layer_norm): bert-base's [4089, 768] closes, twice per
    layer, took addmm's bias broadcast, the add and LayerNorm (about 4 + 5.5 + 5 ms). Elsewhere (half precision,
    where the bias would round once more) the projection keeps its bias."""
    fused = residual.dtype == torch.float32 and residual.is_cpu and norm.weight is not None \
        and not torch.is_grad_enabled() and compiled.available()
    if fused:  # a quantized product fed bfloat16 (Linear's feeds_product) returns it: float32 holds it exactly
        out = proj(h, add_bias=False).to(residual.dtype)
        return kernels.add_layer_norm(out, residual, proj.bias, norm.weight, norm.bias, norm.eps)
    return norm(proj(h) + residual)
