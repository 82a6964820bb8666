"""The attention core shared by every model: packed q/k/v in, packed context out."""

from __future__ import annotations

import torch

from energon_hf import kernels
from energon_hf.batch import AttentionMetadata


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionMetadata, layer_idx: int,
           causal: bool, scale: float | None, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] for this step's tokens -> [T, Hq, D]; `window`: a sliding window, `softcap`:
    capped scores (kernels.varlen_attention)."""
    cache = attn.kv_cache
    if cache is not None:
        cache.write(layer_idx, k, v, attn.slot_mapping)
        if not attn.is_prefill:
            keys, values = cache.layer(layer_idx)
            return kernels.paged_attention(q, keys, values, attn.block_tables, attn.context_lens, attn.cu_seqlens,
                                           attn.max_seqlen, scale, attn.scratch, window, softcap)
    return kernels.varlen_attention(q, k, v, attn.cu_seqlens, attn.max_seqlen, causal, scale, window, softcap)
