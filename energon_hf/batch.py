"""What one model step receives: packed tokens plus the attention layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch

from energon_hf import kernels

from .kv_cache import KVCache, sequence_slots, slot_mapping


@dataclass
class AttentionMetadata:
    """How the packed tokens of one step attend.

    Without a cache (encoders, plain forward) every sequence attends within its own packed tokens.
    With a cache, the step's K/V are written at `slot_mapping`; a prefill (no earlier context) still
    attends within its packed tokens, a decode attends to the cache through `block_tables`.
    """

    cu_seqlens: torch.Tensor  # [B+1] int32, boundaries of this step's tokens
    max_seqlen: int
    kv_cache: KVCache | None = None
    slot_mapping: torch.Tensor | None = None  # [T] int64 flat cache slot of each new token
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [B] int32, cached tokens after this step
    is_prefill: bool = True
    # Per-step values that attention kernels compute in the first layer and reuse in the others.
    scratch: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.shape[0] - 1


class StepBuffers:
    """Output buffers that live for one model step, one per role ("qkv", "mlp"), which every layer's product of
    that role writes into (a layer declares its role: Linear's `step_buffer`).

    Why: glibc serves an allocation over 32 MB with a fresh mmap and unmaps it when freed, so on CPU each layer's
    [tokens, 3 * hidden] q/k/v and [tokens, 4 * hidden] MLP outputs page-faulted on first touch, in every layer
    (bert-base at batch 32 of U[16, 240] tokens, 4089 in all: the q/k/v product 81 ms, 70 into a buffer; the
    up-projection with its GELU 104, 84; the whole forward 10-14 % faster without the faults, measured with
    glibc's mmap turned off). A role's output must be dead before the next layer computes the same role: q/k/v
    once attention has read them (or the cache holds its copy), an up-projection once its down-projection ran."""

    def __init__(self):
        self._held: dict[str, torch.Tensor] = {}

    def take(self, role: str, rows: int, features: int, like: torch.Tensor) -> torch.Tensor | None:
        """A [rows, features] buffer of `like`'s dtype for `role`; None off CPU (CUDA's caching allocator already
        reuses memory) or in grad mode (a product autograd records keeps its output)."""
        if like.device.type != "cpu" or torch.is_grad_enabled():
            return None
        numel = rows * features
        held = self._held.get(role)
        if held is None or held.numel() < numel or held.dtype != like.dtype:
            held = self._held[role] = torch.empty(numel, dtype=like.dtype)
        return held[:numel].view(rows, features)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    token_type_ids: torch.Tensor | None = None  # [T] int64
    pixel_values: torch.Tensor | None = None  # [B, C, H, W] for vision models (their tokens are patches)
    # Only these token rows go through an LM head (generation needs the last token of each sequence).
    logits_indices: torch.Tensor | None = None
    buffers: StepBuffers = field(default_factory=StepBuffers, repr=False, compare=False)
    # (source, destination) cache blocks to copy before the step writes: a shared block made a sequence's own
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    def to(self, device: torch.device | str) -> PackedBatch:
        move = lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t
        attn = AttentionMetadata(
            cu_seqlens=move(self.attn.cu_seqlens), max_seqlen=self.attn.max_seqlen,
            kv_cache=self.attn.kv_cache, slot_mapping=move(self.attn.slot_mapping),
            block_tables=move(self.attn.block_tables), context_lens=move(self.attn.context_lens),
            is_prefill=self.attn.is_prefill,
        )
        return PackedBatch(move(self.input_ids), move(self.positions), attn, move(self.token_type_ids),
                           move(self.pixel_values), move(self.logits_indices), block_copies=self.block_copies)


def packed_layout(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of `lengths` [B] packed one after another: cu_seqlens [B+1] int32, where each starts, and each
    token's position within its own sequence."""
    cu_seqlens = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu_seqlens[1:])
    return cu_seqlens, kernels.positions_from_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]))


def prefill_batch(prompts: list[torch.Tensor], block_tables: torch.Tensor, block_size: int) -> PackedBatch:
    """All prompts packed into one step that fills their KV cache slots (row i of `block_tables` belongs to
    prompts[i]); only each prompt's last token reaches the LM head."""
    lengths = torch.tensor([len(p) for p in prompts])
    cu_seqlens, positions = packed_layout(lengths)
    rows = torch.repeat_interleave(torch.arange(len(prompts)), lengths)
    attn = AttentionMetadata(cu_seqlens, int(lengths.max()),
                             slot_mapping=slot_mapping(block_tables, rows, positions, block_size))
    return PackedBatch(torch.cat(prompts), positions, attn, logits_indices=cu_seqlens[1:].long() - 1)


def cached_batch(tokens: list[int], lengths: list[int], starts: list[int], tables: list[list[int]], block_size: int,
                 logits_rows: list[int] | None = None) -> PackedBatch:
    """Sequence i's next `lengths[i]` tokens (packed in `tokens`), at positions `starts[i]` on, attending to its
    cache (block table `tables[i]`): what earlier steps cached and its own new tokens, causally. Decodes (one
    token) and prompt chunks (several, on top of the chunks before them) run together in one step. Only the
    last token of each sequence in `logits_rows` (None: every sequence) reaches the LM head: a chunk that does
    not end its prompt has nothing to sample.

    Built from Python lists, one tensor per field: the dozen small tensor ops that built it before took 0.5 ms
    of a 17 ms SmolLM2 decode step at batch 1."""
    cu_seqlens = list(accumulate(lengths, initial=0))
    spans = [range(start, start + n) for start, n in zip(starts, lengths, strict=True)]
    positions = [p for span in spans for p in span]
    slots = [slot for table, span in zip(tables, spans, strict=True)
             for slot in sequence_slots(table, span, block_size)]
    context_lens = [span.stop for span in spans]
    width = -(-max(context_lens) // block_size)
    block_tables = [table[:width] + [0] * (width - len(table)) for table in tables]
    attn = AttentionMetadata(
        torch.tensor(cu_seqlens, dtype=torch.int32), max(lengths), slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor(block_tables, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32), is_prefill=False,
    )
    last_rows = None if logits_rows is None else \
        torch.tensor([cu_seqlens[i + 1] - 1 for i in logits_rows], dtype=torch.long)
    return PackedBatch(torch.tensor(tokens), torch.tensor(positions), attn, logits_indices=last_rows)
