"""Fused activations and normalizations (torch implementations, the reference for the Triton ones; on CPU the
decode-step ones run compiled ops, csrc/elementwise.cpp)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import compiled


def _compiled(*tensors: torch.Tensor, contiguous: bool = True) -> bool:
    """Whether the compiled CPU ops (csrc/elementwise.cpp) take these tensors: one float dtype on CPU, contiguous
    (unless the op checks its own layout), outside autograd (the ops have no backward). One op instead of torch's
    three to five: SmolLM2's decode step runs 60 RMSNorms, 30 SiLU-and-muls and 30 rotaries, in float32 25, 10
    and 20 us each in torch, 3.2, 8.5 and 3 us compiled; in half precision torch's RMSNorm also casts to float32
    and back (50 us a call)."""
    dtype = tensors[0].dtype
    if dtype not in compiled.DTYPES:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: this check runs about 120 times per decode step, at about 1 us
        if not t.is_cpu or t.dtype != dtype or (contiguous and not t.is_contiguous()) or (grad and t.requires_grad):
            return False
    return compiled.available()


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


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor,
                   beta: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm((x + bias) + residual): a post-LayerNorm layer's close, with its projection's bias (None: x has
    it). One compiled pass where `add_layer_norm_compiles` (csrc/elementwise.cpp says what it saves), torch's ops
    otherwise."""
    parts = (x, residual, weight, beta) if bias is None else (x, residual, weight, beta, bias)
    if x.dtype == torch.float32 and _compiled(*parts):
        return torch.ops.energon_hf.add_layer_norm(x, residual, bias, weight, beta, eps)
    total = x + residual if bias is None else (x + bias) + residual
    return F.layer_norm(total, x.shape[-1:], weight, beta, eps)


def add_layer_norm_compiles(residual: torch.Tensor) -> bool:
    """Whether add_layer_norm runs its compiled pass for a residual like this one: float32 on CPU, outside
    autograd (a caller that adds the bias itself otherwise keeps it in its product)."""
    return residual.dtype == torch.float32 and _compiled(residual)


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


def rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by its token's angle, HF's rotate-half layout: x * cos + cat(-x2, x1) * sin,
    computed as x * cos + roll(x) * signed_sin (`signed_sin`: the sin with its first half negated, so that
    rotate-half becomes a roll), bit-identical in every dtype (only signs move; addcmul would round half
    precision differently), in four ops instead of seven; one compiled op on CPU (the same roundings)."""
    tokens, _, head_dim = x.shape
    # q and k are a slice of the fused qkv rows: the op takes any token stride, with dense heads
    if x.stride(-1) == 1 and x.stride(-2) == head_dim and cos.numel() == tokens * head_dim \
            and _compiled(x, cos, signed_sin, contiguous=False) and cos.is_contiguous() and signed_sin.is_contiguous():
        return torch.ops.energon_hf.rotary(x, cos, signed_sin)
    return x * cos + x.roll(head_dim // 2, -1) * signed_sin
