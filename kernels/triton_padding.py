"""Padding removal and rebuilding in Triton (CUDA; tested on CPU under TRITON_INTERPRET=1).

Both directions are one row-copy kernel: remove gathers the real rows into the packed tensor, rebuild
scatters them back into a zeroed padded tensor. The index bookkeeping (which rows are real, cu_seqlens)
is `padding.padding_layout`, shared with the torch version, so the backends differ only in the copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .padding import check_rebuild, padding_layout


@triton.jit
def _copy_rows(src, dst, src_rows, dst_rows, width, BLOCK: tl.constexpr):
    """dst[dst_rows[r], :] = src[src_rows[r], :] for row r = program 0, a BLOCK of columns per program 1."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < width
    src_row = tl.load(src_rows + row).to(tl.int64)
    dst_row = tl.load(dst_rows + row).to(tl.int64)
    values = tl.load(src + src_row * width + cols, mask=keep)
    tl.store(dst + dst_row * width + cols, values, mask=keep)


def _launch(src: torch.Tensor, dst: torch.Tensor, src_rows: torch.Tensor, dst_rows: torch.Tensor, width: int) -> None:
    rows = src_rows.numel()
    if rows == 0 or width == 0:
        return
    block = max(16, min(1024, triton.next_power_of_2(width)))
    _copy_rows[(rows, triton.cdiv(width, block))](src, dst, src_rows, dst_rows, width, BLOCK=block)


def remove_padding(hidden: torch.Tensor, attention_mask: torch.Tensor):
    indices, cu_seqlens, max_seqlen = padding_layout(hidden, attention_mask)
    src = hidden.contiguous()
    width = src[0, 0].numel() if src.numel() else 0
    packed = src.new_empty(indices.numel(), *hidden.shape[2:])
    _launch(src, packed, indices, torch.arange(indices.numel(), device=hidden.device), width)
    return packed, indices, cu_seqlens, max_seqlen


def rebuild_padding(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    check_rebuild(packed, indices)
    src = packed.contiguous()
    out = src.new_zeros(batch * seqlen, *packed.shape[1:])
    width = src[0].numel() if src.numel() else 0
    _launch(src, out, torch.arange(indices.numel(), device=packed.device), indices, width)
    return out.view(batch, seqlen, *packed.shape[1:])
