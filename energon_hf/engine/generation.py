"""Autoregressive generation over the paged KV cache: one prefill, then one decode step per token.

Every sequence runs packed and on its own: its positions count its own tokens, it attends to its own
cache blocks, and it leaves the batch as soon as it emits EOS, so finished sequences cost nothing.
"""

from __future__ import annotations

import torch

from energon_hf.batch import decode_batch, prefill_batch
from energon_hf.kv_cache import BLOCK_SIZE, BlockAllocator

from .params import GenerationParams
from .runner import LocalRunner
from .sampler import Sampler


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

    logits = runner.run(prefill_batch(prompts, block_tables, BLOCK_SIZE), use_cache=True)["logits"]

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
        context[active] += 1
        logits = runner.run(decode_batch(tokens, context[active], block_tables[active], BLOCK_SIZE),
                            use_cache=True)["logits"]
    return generated
