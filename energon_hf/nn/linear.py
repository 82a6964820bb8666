"""nn.Linear whose matmul (and optional activation) goes through the kernel dispatch, or through the weight
format it was given once loaded (packed, int8, int4: energon_hf.nn.formats)."""

from __future__ import annotations

import torch
from torch import nn

from energon_hf import kernels
from energon_hf.batch import StepBuffers
from energon_hf.kernels.linear import BUFFERED_ROWS

from .formats import FormatPlan, LinearWeight, linear_format

# HF activation names that are one of torch's two GELU forms: these fuse with the bias (kernels.linear_gelu).
GELU_FORMS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


class Linear(nn.Linear):
    """x @ W^T + b, then `activation` (an HF activation name) if given.

    A GELU activation runs fused with the bias add where the device has the kernel (Triton on CUDA);
    any other activation is HF's own module applied after the projection.

    `step_buffer`: a role ("qkv", "mlp") whose output is dead before the next layer's product of the same role:
    given the step's buffers, the product may write into the role's buffer (batch.StepBuffers says why).

    `feeds_product`: the (GELU) output only ever enters another linear product (an MLP's up-projection): a
    quantized weight's product, which computes in bfloat16 on CPU, then returns it in bfloat16, which the next
    product would have rounded it to anyway: the same numbers, without converting [tokens, 4 * hidden] to float32
    and back (all-MiniLM-L6-v2's int8 encode of 306 passages: 569 -> 463 ms, equal embeddings bit for bit).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 feeds_product: bool = False, step_buffer: str | None = None, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.feeds_product = feeds_product
        self.step_buffer = step_buffer
        self.gelu = GELU_FORMS.get(activation) if activation else None
        self.act = None
        if activation and self.gelu is None:
            # imported here: transformers.activations pulls in torch.distributed.tensor (seconds of start-up
            # in every worker process), and only non-GELU activations need it
            from transformers.activations import get_activation

            self.act = get_activation(activation)

    format: LinearWeight | None = None  # set once the weight is loaded; the plain parameter is then dropped

    def finish_loading(self, plan: FormatPlan, name: str) -> None:
        """Hold the loaded weight in the format `plan` asks for."""
        self.take_format(linear_format(self.weight, plan, name))

    def take_format(self, weight: LinearWeight | None) -> None:
        """Compute with `weight` from now on (None: keep the plain parameter)."""
        if weight is not None:
            if (weight.out_features, weight.in_features) != (self.out_features, self.in_features):
                raise ValueError(f"a [{weight.out_features}, {weight.in_features}] weight does not fit this "
                                 f"[{self.out_features}, {self.in_features}] layer")
            self.format, self.weight = weight, None

    def project(self, x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T (+ bias), without the activation (`out`: a buffer the product may write into)."""
        return kernels.linear(x, self.weight, bias, out) if self.format is None else self.format(x, bias, out=out)

    def forward(self, x: torch.Tensor, buffers: StepBuffers | None = None) -> torch.Tensor:
        """`buffers`: the step's (a layer with a `step_buffer` role writes into its role's buffer)."""
        buffer = None  # decode steps' few rows never write into one (kernels.linear): no buffer on their hot path
        if buffers is not None and self.step_buffer is not None and x.dim() == 2 and x.shape[0] >= BUFFERED_ROWS:
            buffer = buffers.take(self.step_buffer, x.shape[0], self.out_features, x)
        if self.gelu is not None:
            if self.format is None:
                return kernels.linear_gelu(x, self.weight, self.bias, self.gelu, buffer)
            return self.format(x, self.bias, self.gelu, self.feeds_product, buffer)
        out = self.project(x, self.bias, buffer)
        return out if self.act is None else self.act(out)
