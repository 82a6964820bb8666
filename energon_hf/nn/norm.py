"""Normalization layers whose math goes through the kernel dispatch (HF's exact numerics on the torch path)."""

from __future__ import annotations

import torch
from torch import nn

from energon_hf import kernels


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
