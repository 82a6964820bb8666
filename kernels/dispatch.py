"""The one place that chooses a kernel implementation.

Every op has a torch implementation (used on CPU, and the reference) and a GPU one (Triton kernels, or
cuBLAS where a Triton kernel would not beat it). CUDA tensors take the GPU one, everything else torch;
`ENERGON_HF_KERNELS=triton|torch` forces a choice (the tests run Triton on CPU through its interpreter).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

from . import attention, compiled, elementwise, linear, padding, quantized

BACKENDS = ("torch", "triton")


def _triton(module: str, name: str) -> Callable:
    """A Triton kernel, imported on first use (importing triton costs start-up time and needs the package)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)(*args, **kwargs)

    return call


_IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {
    "remove_padding": {"torch": padding.remove_padding, "triton": _triton("triton_padding", "remove_padding")},
    "rebuild_padding": {"torch": padding.rebuild_padding, "triton": _triton("triton_padding", "rebuild_padding")},
    **{op: {"torch": getattr(attention, op), "triton": _triton("triton_attention", op)}
       for op in ("varlen_attention", "paged_attention")},
    # On CUDA the GEMM is cuBLAS's (F.linear); a Triton GEMM would not beat it.
    "linear": {"torch": linear.linear, "triton": F.linear},
    "linear_gelu": {"torch": linear.linear_gelu, "triton": _triton("triton_elementwise", "linear_gelu")},
    **{op: {"torch": getattr(elementwise, op), "triton": _triton("triton_elementwise", op)}
       for op in ("bias_gelu", "silu_and_mul", "layer_norm", "add_layer_norm", "rms_norm")},
    "rotary": {"torch": elementwise.rotary, "triton": elementwise.rotary},  # no Triton kernel: torch's four ops
    # weight-only quantized products off the CPU (the CPU's own kernels are the formats' business: nn/formats.py)
    **{op: {"torch": getattr(quantized, op), "triton": _triton("triton_quantized", op)}
       for op in ("int4_linear", "int8_linear")},
}


def forced_backend(setting: str | None = None) -> str | None:
    """The backend ENERGON_HF_KERNELS forces (`setting`: its value, when the caller already read it)."""
    choice = (os.environ.get("ENERGON_HF_KERNELS", "") if setting is None else setting).strip().lower()
    if choice and choice not in BACKENDS:
        raise ValueError(f"ENERGON_HF_KERNELS={choice!r} is not one of {BACKENDS}")
    return choice or None


def backend_for(device: torch.device, setting: str | None = None) -> str:
    forced = forced_backend(setting)
    if forced:
        return forced
    return "triton" if device.type == "cuda" else "torch"


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def get_kernel(op: str, device: torch.device) -> Callable:
    return _kernel(op, device.type, os.environ.get("ENERGON_HF_KERNELS", ""))


@cache
def _kernel(op: str, device_type: str, setting: str) -> Callable:
    """Memoized per (op, device type, ENERGON_HF_KERNELS): a decode step calls the dispatch about 120 times."""
    impls = _IMPLEMENTATIONS[op]
    backend = backend_for(torch.device(device_type), setting)
    if backend == "triton" and not triton_installed():
        if forced_backend(setting) == "triton":
            raise NotImplementedError("ENERGON_HF_KERNELS=triton but the triton package is not installed")
        backend = "torch"
    return impls[backend]


def prepare(device: torch.device) -> None:
    """Build what the device's kernels compile before a step needs it: the CPU's compiled ops take seconds to
    build once per machine, which belongs in loading, not in a first decode."""
    if device.type == "cpu" and backend_for(device) == "torch":
        compiled.available()


def remove_padding(hidden: torch.Tensor, attention_mask: torch.Tensor):
    return get_kernel("remove_padding", hidden.device)(hidden, attention_mask)


def rebuild_padding(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    return get_kernel("rebuild_padding", packed.device)(packed, indices, batch, seqlen)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale=None, window=None, softcap=None) -> torch.Tensor:
    """`window`: sliding-window attention (each query sees its last `window` keys, itself included); `softcap`:
    scores capped as softcap * tanh(scores / softcap)."""
    return get_kernel("varlen_attention", q.device)(q, k, v, cu_seqlens, max_seqlen, causal, scale, window, softcap)


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, scale=None,
                    scratch=None, window=None, softcap=None):
    """`scratch`: a dict living for one model step, where the kernel may keep what every layer shares."""
    return get_kernel("paged_attention", q.device)(
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, scale, scratch, window, softcap
    )


def linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """`out`: a buffer the torch implementation may write the result into (a hint: use the returned tensor)."""
    kernel = get_kernel("linear", x.device)
    return kernel(x, weight, bias, out) if kernel is linear.linear else kernel(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """As linear_op, then GELU."""
    kernel = get_kernel("linear_gelu", x.device)
    return kernel(x, weight, bias, approximate, out) if kernel is linear.linear_gelu else \
        kernel(x, weight, bias, approximate)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return get_kernel("bias_gelu", x.device)(x, bias, approximate)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return get_kernel("silu_and_mul", x.device)(x)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return get_kernel("layer_norm", x.device)(x, weight, bias, eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor,
                   beta: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm((x + bias) + residual)."""
    return get_kernel("add_layer_norm", x.device)(x, residual, bias, weight, beta, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return get_kernel("rms_norm", x.device)(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return get_kernel("rotary", x.device)(x, cos, signed_sin)


def _differentiable(op: str, x: torch.Tensor) -> Callable:
    """The op's kernel, or its torch reference where autograd records the product (the kernels have no backward)."""
    if quantized.records_grad(x):
        return _IMPLEMENTATIONS[op]["torch"]
    return get_kernel(op, x.device)


def int4_linear(x: torch.Tensor, nibbles: torch.Tensor, table: torch.Tensor, group_size: int) -> torch.Tensor:
    """x @ W^T, W in nibbles and a (scale, min) table per group (quantized.pack_nibbles, scales_and_mins)."""
    return _differentiable("int4_linear", x)(x, nibbles, table, group_size)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ W^T, W = q * scale (scale [out, groups] float32)."""
    return _differentiable("int8_linear", x)(x, q, scale)
