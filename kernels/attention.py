"""Attention over packed tokens (CPU implementation: torch, plus one compiled op).

`varlen_attention` attends within each sequence of a packed batch (prefill, encoders).
`paged_attention` attends from new tokens to keys held in the paged KV cache (decode). Its one-token rows run
the compiled kernel (compiled.py) where it built, which reads the cache in place; prompt chunks, and every row
where it did not build, gather their blocks and run SDPA.
Both never read a pad key: there are none in the packed layout, and cache slots beyond a sequence's
context length are masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import compiled


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def check_paged(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [blocks, block_size, heads, head_dim], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {k_cache.shape[2]} heads x {k_cache.shape[3]}")
    batch = cu_seqlens_q.shape[0] - 1
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
                         f"must have one row per sequence ({batch})")
    if block_tables.dtype.is_floating_point or context_lens.dtype.is_floating_point:
        raise ValueError("block_tables and context_lens must be integer tensors")


# The longest sequence the compiled varlen op takes (longer ones run SDPA, whose blocked kernel wins on them), by
# measurement on the 2-core Xeon. Head sizes the op tiles in registers (TILED_HEAD_SIZES, on AVX-512 hosts), with its
# softmax on 16 lanes and two key tiles per q feature (16 sequences of L and L/2 tokens, 12 heads, against one SDPA
# call per sequence): head size 32 at L = 128 1.4x, 240 1.1x, 384 0.99x; head size 64 1.1x, 0.97x, 0.9x. Whole
# forwards also leave SDPA's per-sequence calls and their q/k/v copies behind: batch 32 of U[16, 240], interleaved,
# limit 64 / 128 / 256: MiniLM 2.10x / 2.18x / 2.29x transformers, bert-base 1.96x / 2.07x / 2.14x. Equal lengths
# too: ViT-base's 197 tokens x 32 images 1.1x SDPA's one batched call (8 images 1.2x). Causal (prompts),
# SmolLM2's 9 / 3 heads of 64 (before the rework): 4.5x at 16, 1.6x at 128, 1.4x at 256, 1.2x at about 500.
COMPILED_VARLEN_TOKENS = {False: 256, True: 512}
TILED_HEAD_SIZES = (32, 64)
# Half precision: SDPA's own kernel multiplies bfloat16 on the matrix units (AMX) where the op widens to float32, so
# it wins from shorter sequences on: 16 sequences of L and L/2 tokens, bfloat16, SDPA's time over the op's at L = 64
# / 128 / 256: 12 heads of 32 1.95x / 1.06x / 0.69x, 12 heads of 64 1.31x / 0.73x / 0.43x, causal 9 / 3 heads of 64
# 1.74x / 0.97x / 0.67x (float32 at the same sizes: 2.41x / 1.62x / 1.25x, 1.80x / 1.31x / 1.00x, 2.41x / 2.05x /
# 1.53x).
HALF_VARLEN_TOKENS = 64
# Other head sizes and hosts run the op's portable loops: the limits measured before the tiles were reworked (head
# size 32 then: 2.0x SDPA at 64 tokens, 1.2x at 128), not re-measured.
PORTABLE_VARLEN_TOKENS = {False: 64, True: 512}


def _compiled_limit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> int:
    """The longest sequence the compiled varlen op takes for these (0: none)."""
    if not _compiled_varlen(q, k, v):
        return 0
    tiled = q.shape[-1] in TILED_HEAD_SIZES and "avx512f" in compiled.cpu_flags()
    limit = (COMPILED_VARLEN_TOKENS if tiled else PORTABLE_VARLEN_TOKENS)[causal]
    return limit if q.dtype == torch.float32 else min(limit, HALF_VARLEN_TOKENS)


def _compiled_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the compiled varlen op takes these: float32, bfloat16 or float16 on CPU, dense head dims, k and v
    alike, outside autograd (the op has no backward)."""
    if q.dtype not in compiled.DTYPES or not q.is_cpu or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride() != v.stride():
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return compiled.available()


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] packed; returns [T, Hq, D]. `window`: sliding-window attention (causal
    only), each query sees its own and the window - 1 keys before it (`window_mask`). `softcap`: scores capped
    as softcap * tanh(scores / softcap) before the mask (Gemma 2; `attention`).

    One SDPA call per sequence: it does exactly sum(len_i^2) work and lets SDPA pick its fused CPU
    kernel (no mask tensor needed), which measured faster than one padded call with a mask. Sequences of up to
    COMPILED_VARLEN_TOKENS tokens in float32 (PORTABLE_VARLEN_TOKENS for untiled head sizes; HALF_VARLEN_TOKENS in
    bfloat16 and float16) on CPU run the compiled op instead (csrc/varlen_attention.cpp): one call
    for them all, where SDPA's fixed cost per call dominated short sequences (all-MiniLM-L6-v2, 128 sequences of
    8-64 tokens: 4.9 against 12.1 ms a layer). Longer ones still run SDPA, into the same output.
    """
    check_qkv(q, k, v)
    if binds(window, max_seqlen):
        return _windowed_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale, window, softcap)
    gqa = q.shape[1] != k.shape[1]
    batch = cu_seqlens.shape[0] - 1
    compiled_len = _compiled_limit(q, k, v, causal) if softcap is None else 0
    compiled_scale = q.shape[-1] ** -0.5 if scale is None else scale
    if max_seqlen <= compiled_len:  # every sequence (no length limit: the output is never left unwritten)
        return torch.ops.energon_hf.varlen_attention(q, k, v, cu_seqlens, causal, compiled_scale, q.shape[0])
    if batch * max_seqlen == q.shape[0]:
        # All sequences have the same length (images, unpadded batches): one batched call.
        qb, kb, vb = (t.view(batch, max_seqlen, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        out = attention(qb, kb, vb, is_causal=causal, scale=scale, softcap=softcap, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(q.shape)
    if compiled_len:  # the short sequences; the loop below runs the others
        out = torch.ops.energon_hf.varlen_attention(q, k, v, cu_seqlens, causal, compiled_scale, compiled_len)
    else:
        out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start or end - start <= compiled_len:
            continue
        # 4-D [1, heads, len, dim]: SDPA's fused CPU kernel only takes batched inputs (3-D runs the math path).
        qi, ki, vi = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        oi = attention(qi, ki, vi, is_causal=causal, scale=scale, softcap=softcap, enable_gqa=gqa)
        out[start:end] = oi[0].transpose(0, 1)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, scale: float | None = None, softcap: float | None = None,
              enable_gqa: bool = False) -> torch.Tensor:
    """torch's SDPA (`mask`: True where a key is seen), or with soft-capped logits (Gemma 2's
    softcap * tanh(scores / softcap) before the mask) the same in explicit ops, as transformers' eager attention
    computes them (SDPA has no cap; its softmax in float32)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    if enable_gqa and q.shape[-3] != k.shape[-3]:
        k, v = (t.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3) for t in (k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:  # top-left aligned, as SDPA's
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def binds(window: int | None, longest: int) -> bool:
    """Whether a sliding window hides any key from a query of sequences up to `longest` keys (else the windowed
    attention is the full one, and runs the full one's faster paths)."""
    return window is not None and longest > window


def window_mask(query_pos: torch.Tensor, keys: int, window: int | None) -> torch.Tensor:
    """[..., keys] bool: which key positions 0..keys-1 each query position sees, causally and within the
    sliding window as transformers draws it (key > query - window)."""
    key_pos = torch.arange(keys, device=query_pos.device)
    visible = key_pos <= query_pos[..., None]
    return visible if window is None else visible & (key_pos > query_pos[..., None] - window)


def _windowed_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, causal: bool, scale: float | None, window: int,
                     softcap: float | None) -> torch.Tensor:
    """varlen_attention where the window binds: one SDPA call per sequence with the window's mask (a window
    mask depends only on the distance between positions, so every sequence takes a corner of the longest's)."""
    if not causal:
        raise ValueError("sliding-window attention is causal only")
    mask = window_mask(torch.arange(max_seqlen, device=q.device), max_seqlen, window)
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        qi, ki, vi = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        n = end - start
        oi = attention(qi, ki, vi, mask[:n, :n], scale=scale, softcap=softcap, enable_gqa=gqa)
        out[start:end] = oi[0].transpose(0, 1)
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    scale: float | None = None,
    scratch: dict | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of new tokens to the cache (`window` and `softcap` as varlen_attention's).

    q [T, Hq, D] packed new tokens (their K/V already written to the cache); k_cache/v_cache
    [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]; context_lens [B] = tokens in the
    cache for each sequence, this step's included. Query i of a sequence with q_len new tokens sits at
    position context_len - q_len + i and sees keys 0..that position.

    `scratch`: a dict that lives for one model step. What depends only on the step's tables (the gather index,
    the mask) is computed by the first layer and reused by the others: at one token per step every op counts
    (SmolLM2 runs this 30 times per token).
    """
    plan = step_plan(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, scratch, window,
                     softcap)
    return plan.attend(q, k_cache, v_cache, scale)


def step_plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
              context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int, scratch: dict | None,
              window: int | None = None, softcap: float | None = None):
    """The step's attention plan (its `.attend(q, k_cache, v_cache, scale)`), checked and made by the first layer
    and kept in `scratch` for the others (paged_attention's arguments; Llama's decode loop asks for it too). Layers
    with another window (Gemma's local and global ones) have their own plan."""
    key = ("paged_attention", window, softcap)
    plan = None if scratch is None else scratch.get(key)
    if plan is None:
        check_paged(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q)
        block_size = k_cache.shape[1]
        window = window if window is not None and binds(window, int(context_lens.max())) else None
        plan = decode_plan(block_tables, context_lens, block_size, q.dtype, window, softcap) if max_seqlen_q == 1 \
            else _MixedPlan(block_tables, context_lens, cu_seqlens_q, block_size, q.dtype, window, softcap)
        if scratch is not None:
            scratch[key] = plan
    return plan


def _first_of_consecutive(blocks: torch.Tensor) -> int | None:
    """The first block when `blocks` are consecutive (one sequence, as a lone generate gets them: the allocator
    hands blocks out in order whenever all are free): its cache is then a view, not a gathered copy."""
    first = int(blocks[0])
    ids = torch.arange(first, first + len(blocks), dtype=blocks.dtype, device=blocks.device)
    return first if torch.equal(blocks, ids) else None


class _DecodePlan:
    """The per-step part of attention for sequences with one new token each: which cache blocks to gather
    and which slots each sequence sees."""

    def __init__(self, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                 window: int | None = None, softcap: float | None = None):
        self.batch, self.softcap = block_tables.shape[0], softcap
        self.max_ctx = block_tables.shape[1] * block_size
        # index_select on the flat block list: ~6x faster than advanced indexing with the 2-D table.
        self.blocks = block_tables.flatten()
        self.first_block = _first_of_consecutive(self.blocks) if self.batch == 1 else None
        ctx = context_lens.long()
        self.keys = int(ctx.max())  # gathered slots past the longest context are never looked at
        # Only slots past a shorter context (or before a sliding window) are hidden; with one sequence (or equal
        # contexts) and no window none are, and SDPA runs without a mask (faster).
        equal = int(ctx.min()) == self.keys and window is None
        self.mask = None if equal else window_mask(ctx - 1, self.keys, window)[:, None, None, :]

    def keys_values(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's keys and values [batch, kv heads, keys, D], in block-table order."""
        return tuple(self._gather(cache).view(self.batch, self.max_ctx, *cache.shape[2:])[:, : self.keys]
                     .transpose(1, 2) for cache in (k_cache, v_cache))

    def _gather(self, cache: torch.Tensor) -> torch.Tensor:
        if self.first_block is not None:
            return cache.narrow(0, self.first_block, len(self.blocks))
        return cache.index_select(0, self.blocks)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        # The query heads that share a key/value head attend as that head's "rows" (q [B, kv heads, group, D]),
        # so no K/V is expanded: bfloat16 at 32 sequences took 0.31 ms per layer this way against 1.74 ms with
        # enable_gqa (float32: the same 0.36 ms).
        keys, values = self.keys_values(k_cache, v_cache)
        kv_heads = k_cache.shape[2]
        grouped = q.view(self.batch, kv_heads, q.shape[1] // kv_heads, q.shape[2])
        return attention(grouped, keys, values, self.mask, scale=scale, softcap=self.softcap).view(q.shape)


# What one more group of decodes costs, in key slots (gathered and attended): two gathers, one SDPA call and the
# output's scatter, about 50 us a layer, against about 0.24 us a slot (SmolLM2 float32, 64 decodes).
DECODE_GROUP_COST = 256


def length_groups(context_lens: list[int], block_size: int, group_cost: int) -> list[list[int]]:
    """The decodes of a step grouped by context length, each group padded to its longest in whole blocks: the
    grouping (of the rows sorted by length) with the fewest key slots plus `group_cost` per group, found over
    the distinct block counts. 64 decodes of contexts U[28, 310] in one padded batch gather 1.8x the keys there
    are, in 5 groups 1.13x; their 30 layers of attention (SmolLM2's shapes) took a median of 136-154 ms
    against 150-162 ms (three runs, noisy), the smaller gathers also staying below glibc's mmap threshold."""
    order = sorted(range(len(context_lens)), key=context_lens.__getitem__)
    blocks = [-(-context_lens[i] // block_size) for i in order]
    ends = [j + 1 for j in range(len(order)) if j + 1 == len(order) or blocks[j + 1] != blocks[j]]
    best, cut = {0: 0}, {}
    for end in ends:  # the cheapest grouping of the first `end` rows, its last group from cut[end] on
        best[end], cut[end] = min((best[start] + (end - start) * blocks[end - 1] * block_size + group_cost, start)
                                  for start in [0, *ends] if start < end)
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


class _GroupedDecodePlan:
    """Decodes attended in groups of similar context length (`length_groups`), each gathering its blocks up to
    its own longest context, instead of every sequence padded to the step's longest."""

    def __init__(self, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                 groups: list[list[int]], window: int | None = None, softcap: float | None = None):
        self.parts = []
        for rows in groups:
            index = torch.tensor(rows, dtype=torch.long, device=block_tables.device)
            width = -(-int(context_lens[index].max()) // block_size)
            self.parts.append((index, _DecodePlan(block_tables[index, :width], context_lens[index], block_size,
                                                  window, softcap)))

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        out = torch.empty_like(q)
        for index, plan in self.parts:
            out[index] = plan.attend(q[index], k_cache, v_cache, scale)
        return out


class _InPlaceDecodePlan:
    """Decodes read by the compiled kernel (csrc/paged_decode.cpp), which walks each sequence's block table and
    reads its keys and values where they lie: no gathered copy, no padding, no mask. One step of SmolLM2-shaped
    attention (30 layers, 9 query and 3 key/value heads of 64, contexts U[28, 310], float32; bench/cpu_attention.py
    on a 2-core Xeon): 2.2 / 15.3 / 52.5 ms at 4 / 16 / 64 decodes, against 3.7 / 33.3 / 135.7 ms gathered in
    groups and 3.7 / 18.0 / 70.6 ms for transformers' padded cache with SDPA. A sliding `window` reads each
    sequence's last `window` keys only; a `softcap` caps the scores as varlen_attention's."""

    def __init__(self, block_tables: torch.Tensor, context_lens: torch.Tensor, window: int | None = None,
                 softcap: float | None = None):
        self.tables = block_tables.long().contiguous()  # once per step; every layer reads the same tables
        self.lens = context_lens.long().contiguous()
        self.window, self.softcap = window, softcap

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return torch.ops.energon_hf.paged_decode(q, k_cache, v_cache, self.tables, self.lens, scale, self.window,
                                                 self.softcap)


def decode_plan(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                dtype: torch.dtype = torch.float32, window: int | None = None, softcap: float | None = None):
    """The plan for a step's one-token sequences: read in place by the compiled kernel where it is available
    (CPU; float32, bfloat16 or float16 caches), else gathered in one padded batch, or in groups by length when that
    gathers fewer key slots (`length_groups`). `window` (where it binds: `binds`) and `softcap` as
    varlen_attention's."""
    if block_tables.device.type == "cpu" and dtype in compiled.DTYPES and compiled.available():
        return _InPlaceDecodePlan(block_tables, context_lens, window, softcap)
    return gathering_decode_plan(block_tables, context_lens, block_size, window, softcap)


def gathering_decode_plan(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                          window: int | None = None, softcap: float | None = None):
    """The torch-only plan: one padded batch, or groups by length when that gathers fewer key slots."""
    groups = length_groups(context_lens.tolist(), block_size, DECODE_GROUP_COST) if block_tables.shape[0] > 1 else []
    if len(groups) <= 1:
        return _DecodePlan(block_tables, context_lens, block_size, window, softcap)
    return _GroupedDecodePlan(block_tables, context_lens, block_size, groups, window, softcap)


class _MixedPlan:
    """A step where some sequences bring several new tokens (prompt chunks, on top of what their earlier chunks
    cached) beside sequences with one (decodes): the one-token sequences attend together as in a decode, each
    chunk on its own with the causal mask aligned to its last key, so no query is padded to the longest chunk
    (a padded batch of one 256-token chunk and 63 decodes would attend 64 x 256 query rows)."""

    def __init__(self, block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 block_size: int, dtype: torch.dtype, window: int | None = None, softcap: float | None = None):
        bounds = cu_seqlens_q.tolist()
        single = [i for i in range(len(bounds) - 1) if bounds[i + 1] - bounds[i] == 1]
        self.single_rows = torch.tensor([bounds[i] for i in single], dtype=torch.long, device=block_tables.device)
        self.singles = decode_plan(block_tables[single], context_lens[single], block_size, dtype, window,
                                   softcap) if single else None
        self.softcap = softcap
        self.chunks = []  # (first row, end row, its keys' plan, mask or None for a chunk that is its whole context)
        for i in range(len(bounds) - 1):
            start, end = bounds[i], bounds[i + 1]
            if end - start < 2:
                continue
            ctx = int(context_lens[i])
            query_pos = torch.arange(ctx - (end - start), ctx, device=block_tables.device)
            mask = None if ctx == end - start and not binds(window, ctx) else window_mask(query_pos, ctx, window)
            self.chunks.append((start, end, _DecodePlan(block_tables[i:i + 1], context_lens[i:i + 1], block_size),
                                mask))

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        out = torch.empty_like(q)
        if self.singles is not None:
            out[self.single_rows] = self.singles.attend(q[self.single_rows], k_cache, v_cache, scale)
        gqa = q.shape[1] != k_cache.shape[2]
        for start, end, plan, mask in self.chunks:
            keys, values = plan.keys_values(k_cache, v_cache)
            chunk = attention(q[start:end].transpose(0, 1)[None], keys, values, mask, is_causal=mask is None,
                              scale=scale, softcap=self.softcap, enable_gqa=gqa)
            out[start:end] = chunk[0].transpose(0, 1)
        return out
