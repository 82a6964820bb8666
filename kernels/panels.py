"""float32 weights in column panels, for the compiled product of csrc/panel_gemm.cpp (its header has the numbers).

W [out, in] becomes panels [ceil(out / 32), in, 32]: panel p holds output features 32p .. 32p + 31 (zeros past
`out`), each input feature's 32 weights side by side, so a product reads each panel as one stream. The layout
serves the products a generating model runs most (decode steps of 2-128 rows: SmolLM2's float32 layers 1.1-1.8x
faster than F.linear's, on par at 1 and 512); at thousands of rows torch's GEMM stays ahead, so encoders keep the
plain weight (nn/formats.linear_format): bench/runtime.py at batch 32 (4,089 tokens), the layers in panels
against plain, two runs each, alternating: bert-base 1,513 / 1,576 against 1,810 / 1,667 tokens/s, GPT-2 1,548 /
1,542 against 1,706 / 1,545.
"""

from __future__ import annotations

import math

import torch

from . import compiled
from .linear import fits_buffer

PANEL = 32  # output features per panel (csrc/panel_gemm.cpp's PANEL)


def available() -> bool:
    """Whether panel products run here: the compiled ops loaded, built with AVX-512 (the kernel's vector code;
    its portable loop is the reference, slower than torch's GEMM)."""
    return "avx512f" in compiled.cpu_flags() and compiled.available()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 -> [ceil(out / PANEL), in, PANEL], a new tensor (the rows past `out` are zeros). One copy
    where `out` is a multiple of PANEL, so loading holds at most one layer's extra matrix at a time."""
    out_features, in_features = weight.shape
    count = -(-out_features // PANEL)
    if out_features % PANEL:
        weight = torch.cat([weight, weight.new_zeros(count * PANEL - out_features, in_features)])
    return weight.reshape(count, PANEL, in_features).transpose(1, 2).contiguous()


def unpack(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """The plain [out, in] weight again."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:out_features]


def linear(x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] (float32) @ W^T (+ bias) -> [..., out] through the compiled kernel. `out`: a [rows, out] buffer
    that products of enough rows write into (batch.StepBuffers; kernels/linear.fits_buffer), as linear.linear's."""
    flat = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()
    if fits_buffer(out, flat, out_features) and out.is_contiguous():
        torch.ops.energon_hf.panel_linear_out(flat, panels, out_features, bias, out)
    else:
        out = torch.ops.energon_hf.panel_linear(flat, panels, out_features, bias)
    return out.view(*x.shape[:-1], out_features)
