"""Vocabulary logits, shared by every language-model head."""

from __future__ import annotations

import torch
from torch import nn

from energon_hf import kernels
from energon_hf.engine.batch import PackedBatch


def rows_for_logits(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """All token rows, or only `batch.logits_indices` (generation needs each sequence's last token)."""
    return hidden if batch.logits_indices is None else hidden.index_select(0, batch.logits_indices)


def vocab_logits(hidden: torch.Tensor, embedding: nn.Embedding, head: nn.Linear | None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """hidden @ W^T (+ bias); a tied head (None) reads the embedding matrix in place, so loading never has
    to re-tie parameters."""
    weight = embedding.weight if head is None else head.weight
    return kernels.linear(hidden, weight, bias)
