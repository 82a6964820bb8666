"""Fused activations and normalizations in Triton (CUDA; tested on CPU under TRITON_INTERPRET=1).

Rows are the last dimension; each program handles one row (norms) or one block of a row (activations),
computing in float32 and storing in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SQRT_HALF = 0.7071067811865476
SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _bias_gelu(x, bias, out, width, TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < width
    v = tl.load(x + row * width + cols, mask=keep).to(tl.float32) + tl.load(bias + cols, mask=keep).to(tl.float32)
    if TANH:
        inner = SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)
        gelu = 0.5 * v * (2.0 * tl.sigmoid(2.0 * inner))  # 1 + tanh(z) = 2 * sigmoid(2z)
    else:
        gelu = 0.5 * v * (1.0 + tl.math.erf(v * SQRT_HALF))
    tl.store(out + row * width + cols, gelu.to(out.dtype.element_ty), mask=keep)


@triton.jit
def _silu_and_mul(x, out, half, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < half
    gate = tl.load(x + row * 2 * half + cols, mask=keep).to(tl.float32)
    up = tl.load(x + row * 2 * half + half + cols, mask=keep).to(tl.float32)
    tl.store(out + row * half + cols, (gate * tl.sigmoid(gate) * up).to(out.dtype.element_ty), mask=keep)


@triton.jit
def _norm(x, weight, bias, out, width, eps, RMS: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program; BLOCK >= width (rows of transformer hidden sizes fit one block)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keep = cols < width
    v = tl.load(x + row * width + cols, mask=keep, other=0.0).to(tl.float32)
    if RMS:
        normed = v * tl.rsqrt(tl.sum(v * v, axis=0) / width + eps)
        w = tl.load(weight + cols, mask=keep).to(tl.float32)
        result = w * normed.to(out.dtype.element_ty).to(tl.float32)  # HF casts before the weight
    else:
        mean = tl.sum(v, axis=0) / width
        centered = tl.where(keep, v - mean, 0.0)
        normed = centered * tl.rsqrt(tl.sum(centered * centered, axis=0) / width + eps)
        w = tl.load(weight + cols, mask=keep).to(tl.float32)
        b = tl.load(bias + cols, mask=keep).to(tl.float32)
        result = normed * w + b
    tl.store(out + row * width + cols, result.to(out.dtype.element_ty), mask=keep)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    x = x.contiguous()
    width = x.shape[-1]
    return x, x.numel() // width if width else 0, width


def _block(width: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(width)))


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    x, rows, width = _rows(x)
    out = torch.empty_like(x)
    if rows:
        block = _block(width)
        _bias_gelu[(rows, triton.cdiv(width, block))](x, bias.contiguous(), out, width,
                                                      TANH=approximate == "tanh", BLOCK=block)
    return out


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """cuBLAS for the matmul, then one pass that adds the bias and applies GELU (instead of two)."""
    out = F.linear(x, weight)
    return F.gelu(out, approximate=approximate) if bias is None else bias_gelu(out, bias, approximate)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    x, rows, width = _rows(x)
    half = width // 2
    out = x.new_empty(*x.shape[:-1], half)
    if rows:
        block = _block(half)
        _silu_and_mul[(rows, triton.cdiv(half, block))](x, out, half, BLOCK=block)
    return out


def _normalize(x, weight, bias, eps, rms: bool) -> torch.Tensor:
    x, rows, width = _rows(x)
    out = torch.empty_like(x)
    if rows:
        block = max(16, triton.next_power_of_2(width))
        _norm[(rows,)](x, weight.contiguous(), weight if bias is None else bias.contiguous(), out, width, eps,
                       RMS=rms, BLOCK=block)
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return _normalize(x, weight, bias, eps, rms=False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _normalize(x, weight, None, eps, rms=True)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor,
                   beta: torch.Tensor, eps: float) -> torch.Tensor:
    """As kernels.elementwise.add_layer_norm: the sums in torch (a GPU's GEMM takes the bias in its epilogue anyway),
    the normalization in Triton."""
    return layer_norm(x + residual if bias is None else (x + bias) + residual, weight, beta, eps)
