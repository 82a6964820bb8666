"""Fused activations and normalizations (torch implementations, the reference for the Triton ones; on CPU the
decode-step ones run compiled ops, csrc/elementwise.cpp)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import compiled

_COMPILED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _compiled(*tensors: torch.Tensor) -> bool:
    """Whether the compiled CPU ops (csrc/elementwise.cpp) take these tensors: one float dtype on CPU, contiguous,
    outside autograd (the ops have no backward). One op instead of torch's three to five: SmolLM2's decode step
    runs 60 RMSNorms and 30 SiLU-and-muls, in float32 25 and 10 us each in torch, 3.2 and 8.5 us compiled; in
    half precision torch's RMSNorm also casts to float32 and back (50 us a call)."""
    dtype = tensors[0].dtype
    return (dtype in _COMPILED_DTYPES
            and all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and compiled.available())


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias); approximate="tanh" is GPT-2's gelu_new, "none" the exact erf form (BERT, ViT)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return F.gelu(x + bias, approximate=approximate)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate then up, as Llama's fused gate_up projection) -> silu(gate) * up, [..., I]."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    if _compiled(x):
        return torch.ops.energon_hf.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, computed in float32 and cast back, as HF's LlamaRMSNorm does. torch's fused
    F.rms_norm gives bit-identical results to HF's five-op formula (checked on float32, bfloat16 and float16
    inputs) in one op: it runs twice per layer, so the op count matters at decode. The compiled op (CPU) sums in
    another order: equal to float32 rounding before it rounds as HF does, not bit for bit."""
    if _compiled(x, weight):
        return torch.ops.energon_hf.rms_norm(x, weight, eps)
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return weight * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)  # HF rounds before the weight
