"""Autoregressive generation over the paged KV cache: one prefill, then one decode step per token.

Every sequence runs packed and on its own: its positions count its own tokens, it attends to its own
cache blocks, and it leaves the batch as soon as it emits EOS, so finished sequences cost nothing.
"""

from __future__ import annotations

import torch

from energon_hf import kernels

from .batch import AttentionMetadata, PackedBatch
from .kv_cache import BlockAllocator, slot_mapping
from .params import GenerationParams
from .runner import LocalRunner
from .sampler import Sampler

BLOCK_SIZE = 16


@torch.inference_mode()
def generate_tokens(runner: LocalRunner, prompts: list[torch.Tensor], params: GenerationParams,
                    sampler: Sampler) -> list[list[int]]:
    """prompts: 1-D token tensors (no padding). Returns the new tokens of each, EOS included."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    batch_size = len(prompts)
    # Each sequence reserves the blocks for its prompt and all its new tokens up front.
    num_blocks = sum(-(-(n + params.max_new_tokens) // BLOCK_SIZE) for n in lengths.tolist())
    runner.ensure_cache(num_blocks, BLOCK_SIZE)
    allocator = BlockAllocator(num_blocks, BLOCK_SIZE)
    for row, n in enumerate(lengths.tolist()):
        allocator.reserve(row, n + params.max_new_tokens)
    block_tables = allocator.block_table_tensor(list(range(batch_size)), "cpu")
    sampler.observe_prompts(prompts)

    # Prefill: all prompts packed into one step; only each sequence's last token reaches the LM head.
    cu_seqlens = torch.zeros(batch_size + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu_seqlens[1:])
    positions = kernels.positions_from_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]))
    rows = torch.repeat_interleave(torch.arange(batch_size), lengths)
    attn = AttentionMetadata(cu_seqlens, int(lengths.max()),
                             slot_mapping=slot_mapping(block_tables, rows, positions, BLOCK_SIZE), is_prefill=True)
    logits = runner.run(PackedBatch(torch.cat(prompts), positions, attn, logits_indices=cu_seqlens[1:].long() - 1),
                        use_cache=True)["logits"]

    generated: list[list[int]] = [[] for _ in range(batch_size)]
    active = torch.arange(batch_size)
    context = lengths.clone()
    eos = torch.tensor(params.eos_token_ids, dtype=torch.long)
    for step in range(params.max_new_tokens):
        tokens = sampler(logits, active.to(logits.device), step).cpu()
        for row, token in zip(active.tolist(), tokens.tolist(), strict=True):
            generated[row].append(token)
        running = ~torch.isin(tokens, eos)
        active, tokens = active[running], tokens[running]
        if step + 1 == params.max_new_tokens or active.numel() == 0:
            break
        # Decode: one new token per running sequence, at position = its current length.
        positions = context[active]
        context[active] += 1
        ctx = context[active].to(torch.int32)
        width = -(-int(ctx.max()) // BLOCK_SIZE)
        attn = AttentionMetadata(
            torch.arange(active.numel() + 1, dtype=torch.int32), 1,
            slot_mapping=slot_mapping(block_tables, active, positions, BLOCK_SIZE),
            block_tables=block_tables[active, :width], context_lens=ctx, is_prefill=False,
        )
        logits = runner.run(PackedBatch(tokens, positions, attn), use_cache=True)["logits"]
    return generated
