"""energon_hf.kernels: padding removal, variable-length and paged attention, behind one dispatch.

Imported only as `energon_hf.kernels` (the folder sits at the top of the repository).
"""

from .dispatch import (
    add_layer_norm,
    backend_for,
    bias_gelu,
    int4_linear,
    int8_linear,
    layer_norm,
    linear_gelu,
    paged_attention,
    prepare,
    rebuild_padding,
    remove_padding,
    rms_norm,
    rotary,
    silu_and_mul,
    varlen_attention,
)
from .dispatch import linear_op as linear
from .padding import check_attention_mask, positions_from_cu_seqlens

__all__ = [
    "add_layer_norm",
    "backend_for",
    "bias_gelu",
    "check_attention_mask",
    "int4_linear",
    "int8_linear",
    "layer_norm",
    "linear",
    "linear_gelu",
    "paged_attention",
    "positions_from_cu_seqlens",
    "prepare",
    "rebuild_padding",
    "remove_padding",
    "rms_norm",
    "rotary",
    "silu_and_mul",
    "varlen_attention",
]
