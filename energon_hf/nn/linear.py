"""nn.Linear whose matmul (and optional activation) goes through the kernel dispatch."""

from __future__ import annotations

import torch
from torch import nn

from energon_hf import kernels

# HF activation names that are one of torch's two GELU forms: these fuse with the bias (kernels.linear_gelu).
GELU_FORMS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


class Linear(nn.Linear):
    """x @ W^T + b, then `activation` (an HF activation name) if given.

    A GELU activation runs fused with the bias add where the device has the kernel (Triton on CUDA);
    any other activation is HF's own module applied after the projection.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.gelu = GELU_FORMS.get(activation) if activation else None
        self.act = None
        if activation and self.gelu is None:
            # imported here: transformers.activations pulls in torch.distributed.tensor (seconds of start-up
            # in every worker process), and only non-GELU activations need it
            from transformers.activations import get_activation

            self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu is not None:
            return kernels.linear_gelu(x, self.weight, self.bias, self.gelu)
        out = kernels.linear(x, self.weight, self.bias)
        return out if self.act is None else self.act(out)
