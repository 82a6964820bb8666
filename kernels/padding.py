"""Padding removal and rebuilding (torch implementation).

The engine computes on packed `[T, ...]` real tokens. Padding is removed once at the API boundary and
rebuilt once at the end; these two functions are that boundary. Any mask layout works (left, right, or
holes): a token is kept exactly where its mask is non-zero, in row-major order.
"""

from __future__ import annotations

import torch

_MASK_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def check_attention_mask(attention_mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Validate a [B, S] 0/1 mask and return it as bool."""
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the input has shape {tuple(shape)}"
        )
    if attention_mask.dtype not in _MASK_DTYPES:
        raise ValueError(f"attention_mask must be bool or integer, got {attention_mask.dtype}")
    if attention_mask.dtype != torch.bool:
        if attention_mask.numel() and ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("attention_mask must contain only 0 and 1")
        attention_mask = attention_mask != 0
    return attention_mask


def padding_layout(hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The bookkeeping every remove_padding shares: (indices [T] into B*S, cu_seqlens [B+1] int32, max_seqlen).
    Implementations differ only in how they copy the rows."""
    if hidden.dim() < 2:
        raise ValueError(f"remove_padding expects [B, S, ...], got shape {tuple(hidden.shape)}")
    batch, seqlen = hidden.shape[:2]
    mask = check_attention_mask(attention_mask, (batch, seqlen)).to(hidden.device)
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=hidden.device)
    torch.cumsum(seqlens, dim=0, out=cu_seqlens[1:])
    return indices, cu_seqlens, int(seqlens.max()) if batch else 0


def check_rebuild(packed: torch.Tensor, indices: torch.Tensor) -> None:
    if packed.shape[0] != indices.shape[0]:
        raise ValueError(f"packed has {packed.shape[0]} tokens but indices has {indices.shape[0]}")


def remove_padding(
    hidden: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """[B, S, ...] -> (packed [T, ...], indices [T] into B*S, cu_seqlens [B+1] int32, max_seqlen)."""
    indices, cu_seqlens, max_seqlen = padding_layout(hidden, attention_mask)
    packed = hidden.flatten(0, 1).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen


def rebuild_padding(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """(packed [T, ...], indices) -> [B, S, ...] with zeros at the padded positions."""
    check_rebuild(packed, indices)
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    out.index_copy_(0, indices, packed)
    return out.view(batch, seqlen, *packed.shape[1:])


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of each packed token inside its own sequence: 0, 1, ... restarting at every sequence."""
    starts = cu_seqlens[:-1].long()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.arange(total, device=cu_seqlens.device) - torch.repeat_interleave(starts, lengths, output_size=total)
