"""Fused activations and normalizations (torch implementations, the reference for the Triton ones)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias); approximate="tanh" is GPT-2's gelu_new, "none" the exact erf form (BERT, ViT)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return F.gelu(x + bias, approximate=approximate)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate then up, as Llama's fused gate_up projection) -> silu(gate) * up, [..., I]."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, computed in float32 and cast back, as HF's LlamaRMSNorm does. torch's fused
    F.rms_norm gives bit-identical results to HF's five-op formula (checked on float32, bfloat16 and float16
    inputs) in one op: it runs twice per layer, so the op count matters at decode."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return weight * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)  # HF rounds before the weight
