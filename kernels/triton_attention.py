"""Attention over packed tokens in Triton (CUDA; tested on CPU under TRITON_INTERPRET=1).

One flash-attention kernel serves both entry points: `varlen_attention` reads keys from the packed K/V of
the same sequence, `paged_attention` reads them from the paged cache through the block table. Each program
owns one block of query rows of one sequence and one key/value head; a row is (query token, query head of
that KV head's group), so grouped-query heads share every K/V load, and a decode step (one token, GROUP
heads) still fills the rows. Softmax runs online in float32 with exp2.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention import check_paged, check_qkv

LOG2E = 1.4426950408889634


@triton.jit
def _flash_attention(
    Q, K, V, Out, cu_seqlens_q, context_lens, block_tables,
    qk_scale, head_dim, block_size, window, log2_softcap,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kt, stride_kh, stride_kb, stride_bt,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, PAGED: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len * GROUP:
        return
    # Keys 0..ctx-1; the new queries are the last q_len of them (ctx == q_len for varlen).
    ctx = q_len
    if PAGED:
        ctx = tl.load(context_lens + seq)

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = token < q_len
    query_pos = ctx - q_len + token
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q_offsets = (q_start + token).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(Q + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    key_begin = 0
    key_end = ctx
    if CAUSAL:  # keys past this block's last query are masked for every row: skip them
        last_token = tl.minimum((m_block + 1) * BLOCK_M - 1, q_len * GROUP - 1) // GROUP
        key_end = tl.minimum(ctx, ctx - q_len + last_token + 1)
    if WINDOWED:  # and keys before the first query's window, from the key block that holds its first
        first_token = (m_block * BLOCK_M) // GROUP
        key_begin = tl.maximum(ctx - q_len + first_token - window + 1, 0) // BLOCK_N * BLOCK_N
    for key_start in range(key_begin, key_end, BLOCK_N):
        key_pos = key_start + tl.arange(0, BLOCK_N)
        key_ok = key_pos < ctx
        if PAGED:
            block = tl.load(block_tables + seq * stride_bt + key_pos // block_size, mask=key_ok, other=0)
            kv_offsets = block.to(tl.int64) * stride_kb + (key_pos % block_size) * stride_kt
        else:
            kv_offsets = (q_start + key_pos).to(tl.int64) * stride_kt
        kv_offsets = kv_offsets[:, None] + kv_head * stride_kh + dims[None, :]
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)

        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if SOFTCAP:  # softcap * tanh(s / softcap), in the log2(e)-scaled units (tanh(y) = 2 / (1 + e^-2y) - 1)
            capped = scores / log2_softcap
            scores = (2.0 / (1.0 + tl.exp(-2.0 * capped)) - 1.0) * log2_softcap
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (key_pos[None, :] <= query_pos[:, None])
        if WINDOWED:
            visible = visible & (key_pos[None, :] > query_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        # Without a window every real row sees key 0 in the first block, so m_new is finite for it from then on;
        # a window may hide a whole block from a row: it then subtracts 0 (p = 0, alpha = 1 until a key shows).
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_shift = m_new
        if WINDOWED:
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if WINDOWED:  # rows past the sequence (not stored) may see no key in the window: no 0 / 0 for them
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_offsets = (q_start + token).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(Out + o_offsets, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def _launch(q, k, v, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, causal, paged, scale, window,
            softcap=None):
    """Shared launcher; k/v are [T, Hkv, D] (varlen) or [num_blocks, block_size, Hkv, D] (paged)."""
    q = q.contiguous()
    out = torch.empty_like(q)
    batch = cu_seqlens_q.shape[0] - 1
    if q.shape[0] == 0 or batch == 0:
        return out
    head_dim, kv_heads = q.shape[2], k.shape[-2]
    group = q.shape[1] // kv_heads
    rows = max_seqlen_q * group
    block_m = 16 if rows <= 16 else 64
    block_n = 64 if q.is_cuda else 16  # small key blocks under the interpreter exercise the online softmax
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k, v = k.contiguous(), v.contiguous()
    grid = (triton.cdiv(rows, block_m), batch, kv_heads)
    _flash_attention[grid](
        q, k, v, out, cu_seqlens_q.to(torch.int32), context_lens.to(torch.int32) if paged else cu_seqlens_q,
        block_tables.contiguous() if paged else cu_seqlens_q,
        scale * LOG2E, head_dim, k.shape[1] if paged else 1, window or 0, (softcap or 1.0) * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k.stride(-3), k.stride(-2), k.stride(0) if paged else 0, block_tables.stride(0) if paged else 0,
        GROUP=group, CAUSAL=causal, PAGED=paged, WINDOWED=window is not None, SOFTCAP=softcap is not None,
        BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 keeps fp32 products (parity)
    )
    return out


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale=None, window=None, softcap=None) -> torch.Tensor:
    """Same contract as kernels.attention.varlen_attention."""
    check_qkv(q, k, v)
    if window is not None and not causal:
        raise ValueError("sliding-window attention is causal only")
    return _launch(q, k, v, cu_seqlens, None, None, max_seqlen, causal, False, scale, window, softcap)


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, scale=None,
                    scratch=None, window=None, softcap=None):
    """Same contract as kernels.attention.paged_attention (one launch per layer: nothing to share in `scratch`)."""
    check_paged(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q)
    return _launch(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, True, True, scale,
                   window, softcap)
